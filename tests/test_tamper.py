"""Tampering with a capture of a real gateway run (checkpoints on), and what
`gateway verify --capture --public-key` says about it.

The capture is made once per module: the off-gas simulator (real pymodbus), the
gateway with a key from `gateway keygen`, a real Mosquitto, a subscriber writing
what `gateway tail` writes. Each test alters a copy the way an attacker or a
faulty transfer would and reads the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import BrokerSection
from gateway.record import EV_CHECKPOINT, EV_STOP, Record, decode_payload, record_hash
from gateway.signing import (
    SignerKey,
    checkpoint_text,
    load_public,
    parse_checkpoint,
    parse_note,
    write_public,
)
from gateway.subscribe import subscribe
from gateway.verify import record_from_json, record_to_json
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.gateway import Device, GatewaySpec, running

DEV = "offgas"
STREAM = f"gw-test/{DEV}"


@dataclass
class Capture:
    lines: list[str]
    public_key: Path
    work: Path
    announced: dict[str, bytes]

    def records(self) -> list[Record]:
        return [record_from_json(line) for line in self.lines]


@pytest.fixture(scope="module")
async def capture(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Capture]:
    work = tmp_path_factory.mktemp("tamper")
    broker = Mosquitto(work / "mosquitto")
    broker.start()
    sim = OffGasSimulator(time_scale=600, update_interval=0.05)
    await sim.start()
    spec = GatewaySpec(
        work / "state",
        broker.port,
        [Device(DEV, sim.port, poll_interval=0.05)],
        outbox="[checkpoints]\nenabled = true\nevery_records = 10\nevery_seconds = 0.5\n",
    )
    config = spec.write()
    assert main(["keygen", "-c", str(config)]) == 0
    lines: list[str] = []
    announced: dict[str, bytes] = {}
    enough = asyncio.Event()
    stop_seq: list[int] = []

    def on_message(topic: str, payload: bytes) -> None:
        if "/$status" in topic:
            announced[topic] = payload
            return
        for r in decode_payload(payload):
            lines.append(record_to_json(r))
            if r["dev"] == DEV and r["seq"] >= 80:
                enough.set()
            if r["dev"] == DEV and r["tag"] == EV_STOP:
                stop_seq.append(r["seq"])
            if r["dev"] == DEV and r["tag"] == EV_CHECKPOINT and r["seq"] - 1 in stop_seq:
                done.set()

    done, stop, ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
    sub = asyncio.create_task(
        subscribe(
            BrokerSection(port=broker.port),
            "plant/#",
            on_message,
            stop=stop,
            ready=ready,
            client_id="tamper-capture",
            session_expiry=60,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with running(spec.config()):
            await asyncio.wait_for(enough.wait(), 20)
        await asyncio.wait_for(done.wait(), 10)  # the checkpoint after $stop
    finally:
        stop.set()
        await sub
        await sim.stop()
        broker.stop()
    yield Capture(lines, spec.state_dir / "checkpoint.pub", work, announced)


def verify(
    cap: Capture, records: list[Record], *keys: Path, real_process: bool = False
) -> tuple[int, str]:
    """`gateway verify --capture` (in this process, or as a user runs it)."""
    path = cap.work / f"capture-{random.randrange(1 << 30)}.jsonl"
    path.write_text("".join(record_to_json(r) + "\n" for r in records))
    args = ["verify", "--capture", str(path)]
    for k in keys:
        args += ["--public-key", str(k)]
    if real_process:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
        )
        return done.returncode, done.stdout + done.stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(args)
    return code, out.getvalue()


def of(records: list[Record], pred: Callable[[Record], bool]) -> list[Record]:
    return [r for r in records if r["dev"] == DEV and pred(r)]


def rechain(records: list[Record], *, notes: bool = False) -> None:
    """What a forger without the key does: make every hash and link consistent again
    (and, with ``notes``, every checkpoint's text, keeping the old signatures)."""
    stream = sorted(of(records, lambda r: True), key=lambda r: r["seq"])
    for before, r in zip([None, *stream], stream, strict=False):
        if before is not None:
            r["prev"] = before["hash"]
        if notes and r["tag"] == EV_CHECKPOINT and before is not None:
            note = r["info"]["note"]
            text, _ = parse_note(note)
            origin, _, _ = parse_checkpoint(text)
            new = checkpoint_text(origin, before["seq"], before["hash"])
            r["info"]["note"] = new + note[len(text) :]
        r["hash"] = record_hash(r)


def test_the_intact_capture_verifies_and_is_signed_to_the_end(capture: Capture) -> None:
    recs = capture.records()
    cps = of(recs, lambda r: r["tag"] == EV_CHECKPOINT)
    assert len(cps) >= 8, "every 10 records and after $stop"
    assert of(recs, lambda r: r["tag"] == EV_STOP)[0]["seq"] == cps[-1]["seq"] - 1
    code, out = verify(capture, recs, capture.public_key, real_process=True)
    assert code == 0, out
    assert f"{STREAM}: " in out and "PASS" in out and "UNSIGNED TAIL" not in out
    last = max(r["seq"] for r in of(recs, lambda r: True))
    assert f"{last} records signed through seq {last - 1}" in out
    code, out = verify(capture, recs)  # without a key: chain checks only, said so
    assert code == 0 and "signatures not checked" in out


def test_the_public_key_is_published_retained_with_its_fingerprint(capture: Capture) -> None:
    (key,) = load_public([capture.public_key])
    doc = json.loads(capture.announced["plant/gw-test/$status/key"])
    assert doc == {"algorithm": "ed25519", "fingerprint": key.fingerprint, "key": key.vkey}
    assert capture.announced["plant/gw-test/$status"] in (b"online", b"offline")


def test_one_flipped_byte_names_the_record(capture: Capture) -> None:
    lines = list(capture.lines)
    target = next(
        i
        for i, line in enumerate(lines)
        if f'"dev":"{DEV}"' in line and '"tag":"O2"' in line and '"seq":2' in line
    )
    seq = record_from_json(lines[target])["seq"]
    at = lines[target].index('"val":') + len('"val":') + 1  # a digit of the value
    digit = lines[target][at]
    assert digit.isdigit()
    lines[target] = lines[target][:at] + str((int(digit) + 1) % 10) + lines[target][at + 1 :]
    code, out = verify(capture, [record_from_json(line) for line in lines], capture.public_key)
    assert code == 1
    assert f"{STREAM}: " in out and f"BAD RECORD seq {seq}: hash does not match" in out


def test_a_deleted_record_is_a_gap(capture: Capture) -> None:
    recs = capture.records()
    victim = of(recs, lambda r: r["seq"] == 30)[0]
    recs.remove(victim)
    code, out = verify(capture, recs, capture.public_key)
    assert code == 1 and "UNEXPLAINED GAP seq 30..30 (1 records missing)" in out


def test_a_forged_record_with_a_taken_seq_is_a_conflict(capture: Capture) -> None:
    recs = capture.records()
    forged = copy.deepcopy(of(recs, lambda r: r["seq"] == 25)[0])
    forged["val"] = 99.0 if forged["tag"] != EV_CHECKPOINT else "forged"
    forged["hash"] = record_hash(forged)  # its own hash is valid
    code, out = verify(capture, [*recs, forged], capture.public_key)
    assert code == 1 and "CONFLICT seq 25" in out


def test_a_forged_record_inserted_breaks_the_chain(capture: Capture) -> None:
    recs = capture.records()
    after = of(recs, lambda r: r["seq"] == 20)[0]
    forged = {**copy.deepcopy(after), "val": 1.0, "seq": 21, "prev": after["hash"]}
    forged["hash"] = record_hash(forged)
    for r in of(recs, lambda r: r["seq"] > 20):
        r["seq"] += 1  # make room, hashes left as they were
    code, out = verify(capture, [*recs, forged], capture.public_key)
    assert code == 1 and "BAD RECORD seq 22: hash does not match" in out
    # A forger who re-hashes the rest of the chain still cannot make the
    # checkpoints agree: the signed heads name the original hashes...
    rechain([*recs, forged])
    code, out = verify(capture, [*recs, forged])
    assert code == 1 and "BAD CHECKPOINT" in out and "signed hash" in out
    # ...and rewriting the checkpoint notes too leaves signatures that fail.
    rechain([*recs, forged], notes=True)
    code, out = verify(capture, [*recs, forged])
    assert code == 0, "without the public key a consistent rewrite goes unnoticed"
    code, out = verify(capture, [*recs, forged], capture.public_key)
    assert code == 1 and "does not verify" in out


def test_a_forged_checkpoint_signature_is_named(capture: Capture) -> None:
    recs = capture.records()
    last_cp = of(recs, lambda r: r["tag"] == EV_CHECKPOINT)[-1]
    note = last_cp["info"]["note"]
    i = len(note) - 10  # inside the signature, past the 4-byte key id
    last_cp["info"]["note"] = note[:i] + ("A" if note[i] != "A" else "B") + note[i + 1 :]
    last_cp["hash"] = record_hash(last_cp)  # the record itself stays sound
    code, out = verify(capture, recs, capture.public_key)
    assert code == 1
    assert f"BAD CHECKPOINT seq {last_cp['seq']}: signature by gw-test+" in out
    assert "does not verify" in out


def test_the_wrong_public_key_fails_every_checkpoint(capture: Capture) -> None:
    other = capture.work / "other.pub"
    write_public(other, SignerKey.generate("gw-test").verifier)  # same name, other key
    code, out = verify(capture, capture.records(), other)
    assert code == 1 and "no signature by a trusted key (signed by gw-test+" in out


def test_reordered_and_duplicated_delivery_is_not_an_error(capture: Capture) -> None:
    recs = capture.records()
    rng = random.Random(8)
    messy = recs + [copy.deepcopy(r) for r in rng.sample(recs, 25)]
    rng.shuffle(messy)
    code, out = verify(capture, messy, capture.public_key)
    assert code == 0, out
    assert "duplicate deliveries (ignored)" in out and "UNSIGNED TAIL" not in out


def test_records_after_the_last_checkpoint_are_reported_unsigned(capture: Capture) -> None:
    recs = capture.records()
    cp = of(recs, lambda r: r["tag"] == EV_CHECKPOINT)[2]
    cut = [r for r in recs if r["dev"] != DEV or r["seq"] <= cp["seq"] + 3]
    code, out = verify(capture, cut, capture.public_key)
    assert code == 0, out
    a = cp["seq"] + 1
    assert f"UNSIGNED TAIL: seq {a}..{a + 2} (3 records after the last verified" in out
