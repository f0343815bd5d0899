"""Signed checkpoints: the signed-note format, key files, `gateway keygen`, and
checkpoints written by a real outbox (every N records, every T seconds, at $stop,
across a restart)."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.checkpoint import Checkpointer
from gateway.cli import main
from gateway.errors import ConfigError
from gateway.outbox import Outbox
from gateway.record import EV_CHECKPOINT, EV_STOP, FORMAT_VERSION, Record, decode_payload
from gateway.signing import (
    EM_DASH,
    NoteError,
    SignerKey,
    VerifierKey,
    checkpoint_text,
    key_id,
    load_private,
    load_public,
    open_note,
    parse_checkpoint,
    parse_note,
    sign_note,
    write_private,
)
from gateway.verify import Verifier

# Known answers published with Go's golang.org/x/mod/sumdb/note (the reference
# implementation of signed notes): Ed25519 is deterministic, so our key id, key
# encodings and signature must match byte for byte.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_SIG = (
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)
# The example of the C2SP signed-note specification.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n"
    f"{EM_DASH} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZX"
    "sYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)
GW = "gw-cp"


def test_signed_note_matches_the_go_reference_byte_for_byte() -> None:
    signer = SignerKey.parse(GO_SKEY)
    assert signer.skey == GO_SKEY
    assert signer.verifier.vkey == GO_VKEY
    assert signer.key_id.hex() == "c74f20a3"
    assert key_id("PeterNeumann", signer.verifier.public) == bytes.fromhex("c74f20a3")
    note = sign_note(GO_TEXT, signer)
    assert note == f"{GO_TEXT}\n{EM_DASH} PeterNeumann {GO_SIG}\n"
    text, by = open_note(note, [VerifierKey.parse(GO_VKEY)])
    assert text == GO_TEXT and by == [signer.verifier]


def test_the_c2sp_example_note_verifies_and_tampering_does_not() -> None:
    key = VerifierKey.parse(SPEC_VKEY)
    text, _ = open_note(SPEC_NOTE, [key])
    assert text == "This is an example message.\n"
    with pytest.raises(NoteError, match="does not verify"):
        open_note(SPEC_NOTE.replace("example message", "example massage"), [key])
    other = SignerKey.generate("example.com/foo").verifier  # same name, another key
    with pytest.raises(NoteError, match="no signature by a trusted key"):
        open_note(SPEC_NOTE, [other])


@pytest.mark.parametrize(
    "bad",
    [
        GO_VKEY.replace("c74f20a3", "c74f20a4"),  # key id does not match
        GO_VKEY[:-4],  # key too short
        "PeterNeumann+c74f20a3",  # no key
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # space
    ],
)
def test_mangled_verifier_keys_are_refused(bad: str) -> None:
    with pytest.raises(NoteError):
        VerifierKey.parse(bad)


def test_checkpoint_body_is_origin_size_and_hash() -> None:
    digest = bytes(range(32))
    text = checkpoint_text("gw-01/bioreactor-1", 1234, digest)
    assert text == f"gw-01/bioreactor-1\n1234\n{base64.b64encode(digest).decode()}\n"
    assert parse_checkpoint(text) == ("gw-01/bioreactor-1", 1234, digest)
    for broken in (text.replace("1234", "01234"), text.replace("1234", "-1"), "a\n1\n"):
        with pytest.raises(NoteError):
            parse_checkpoint(broken)
    with pytest.raises(NoteError, match="no blank line"):
        parse_note(text)


def test_private_key_file_is_0600_and_never_silently_replaced(tmp_path: Path) -> None:
    path = tmp_path / "state" / "checkpoint.key"
    key = SignerKey.generate(GW)
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        write_private(path, key)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_private(path).skey == key.skey
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_private(path, SignerKey.generate(GW))
    assert load_private(path).skey == key.skey
    write_private(path, SignerKey.generate(GW), force=True)
    assert load_private(path).skey != key.skey
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="mode 0640"):
        load_private(path)


def test_keygen_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.toml"
    state = tmp_path / "state"
    config.write_text(f'[gateway]\nid = "{GW}"\nstate_dir = "{state}"\n')
    assert main(["keygen", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    key = load_private(state / "checkpoint.key")
    assert key.name == GW and stat.S_IMODE((state / "checkpoint.key").stat().st_mode) == 0o600
    (pub,) = load_public([state / "checkpoint.pub"])
    assert pub == key.verifier and key.verifier.fingerprint in out
    assert key.skey.split("+")[-1] not in out, "the secret must not be printed"
    assert main(["keygen", "-c", str(config)]) == 2  # refuses to overwrite
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["keygen", "-c", str(config), "--export-public", str(tmp_path / "x.pub")]) == 0
    assert load_public([tmp_path / "x.pub"]) == [key.verifier]
    assert main(["keygen", "--out", str(tmp_path / "other"), "--name", "gw-2"]) == 0
    assert load_private(tmp_path / "other" / "checkpoint.key").name == "gw-2"


def test_the_gateway_refuses_to_start_without_a_usable_key(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    state = tmp_path / "state"
    config.write_text(
        f'[gateway]\nid = "{GW}"\nstate_dir = "{state}"\n[health]\nenabled = false\n'
        "[checkpoints]\nenabled = true\n"
    )

    def run() -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gateway", "run", "-c", str(config)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    done = run()
    assert done.returncode == 2 and "gateway keygen" in done.stderr
    assert main(["keygen", "-c", str(config)]) == 0
    (state / "checkpoint.key").chmod(0o644)
    done = run()
    assert done.returncode == 2 and "mode 0644" in done.stderr


# -- checkpoints written by the outbox ---------------------------------------------------
def reading(dev: str, i: int) -> Record:
    return {
        "v": FORMAT_VERSION,
        "gw": GW,
        "dev": dev,
        "tag": "O2",
        "val": 20.9 + i / 100,
        "unit": "%",
        "q": "good",
        "ts": time.time_ns(),
    }


async def all_records(box: Outbox) -> list[Record]:
    await box.flush()
    return [r for m in await box.read_after(0, 10_000) for r in decode_payload(m.payload)]


async def test_checkpoint_every_n_records_at_stop_and_across_a_restart(tmp_path: Path) -> None:
    signer = SignerKey.generate(GW)
    db = tmp_path / "outbox.db"
    records: list[Record] = []
    for _run in range(2):
        box = await Outbox.open(db, gateway_id=GW)
        cp = Checkpointer(GW, signer, every_records=5, every_seconds=3600)
        box.after_seal = cp.after_seal
        for i in range(4):  # cycles of 3 records
            assert await box.submit("dev", [reading("dev", 3 * i + k) for k in range(3)])
        stop = {**reading("dev", 0), "tag": EV_STOP, "val": "acquisition stopped", "unit": ""}
        await box.submit("dev", [stop])
        records = await all_records(box)
        await box.close()
        assert cp.written == 3  # after 6, after 12 (counted from the start) and at $stop
    seqs = [r["seq"] for r in records if r["tag"] == EV_CHECKPOINT]
    # Run 1: seq 7 covers 6 (>= 5 since 0), 14 covers 13 (12 + cp), 16 covers $stop.
    # Run 2 counts from the head it found (16) and goes on in the same chain.
    assert seqs == [7, 14, 16, 23, 30, 32]
    assert [r["seq"] for r in records] == list(range(1, 33))
    report = Verifier([signer.verifier])
    for r in records:
        report.add(r)
    rep = report.report()
    (s,) = rep.streams
    assert rep.ok, rep.summary()
    assert (s.checkpoints, s.signed, s.signed_through, s.unsigned_tail) == (6, 32, 31, None)
    cp_rec = records[6]
    text, _ = open_note(cp_rec["info"]["note"], [signer.verifier])
    assert parse_checkpoint(text) == (f"{GW}/dev", 6, records[5]["hash"])
    assert cp_rec["prev"] == records[5]["hash"]


async def test_checkpoint_after_t_seconds_only_when_the_stream_advanced(tmp_path: Path) -> None:
    signer = SignerKey.generate(GW)
    box = await Outbox.open(tmp_path / "outbox.db", gateway_id=GW)
    cp = Checkpointer(GW, signer, every_records=1000, every_seconds=0.2)
    box.after_seal = cp.after_seal
    task = asyncio.create_task(cp.run(box.chain.head, box.submit))
    try:
        await box.submit("a", [reading("a", 0), reading("a", 1)])
        await box.submit("b", [reading("b", 0)])
        await asyncio.sleep(0.7)  # more than three periods: still one checkpoint each
        assert cp.written == 2
        await box.submit("a", [reading("a", 2)])
        await asyncio.sleep(0.5)
        assert cp.written == 3
    finally:
        task.cancel()
    records = await all_records(box)
    await box.close()
    a = [(r["seq"], r["tag"]) for r in records if r["dev"] == "a"]
    assert a == [(1, "O2"), (2, "O2"), (3, EV_CHECKPOINT), (4, "O2"), (5, EV_CHECKPOINT)]
    v = Verifier([signer.verifier])
    for r in records:
        v.add(r)
    rep = v.report()
    assert rep.ok and all(s.unsigned_tail is None for s in rep.streams), rep.summary()
