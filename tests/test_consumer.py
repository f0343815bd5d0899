"""The consumer library (gateway/consumer.py) in live mode, and the subscriber
example of docs/consumers.md run against a real gateway and broker."""

from __future__ import annotations

import asyncio
import copy
import re
import sys
from pathlib import Path

from gateway.cli import main
from gateway.config import BrokerSection
from gateway.consumer import Consumer
from gateway.record import BAD, EV_GAP, FORMAT_VERSION, Chain, Record, encode_payload
from gateway.subscribe import subscribe
from gateway.verify import record_from_json
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.gateway import Device, GatewaySpec, running

GW, DEV = "gw-c", "dev"
TOPIC = f"plant/{GW}/{DEV}"
DOC = Path(__file__).parent.parent / "docs" / "consumers.md"


def reading(i: int) -> Record:
    return {
        "v": FORMAT_VERSION,
        "gw": GW,
        "dev": DEV,
        "tag": "T",
        "val": float(i),
        "unit": "Cel",
        "q": "good",
        "ts": 1_700_000_000_000_000_000 + i,
    }


def sealed(n: int, chain: Chain | None = None) -> list[Record]:
    chain = chain or Chain()
    return [chain.seal(DEV, reading(i)) for i in range(n)]


def seqs(records: list[Record]) -> list[int]:
    return [r["seq"] for r in records]


def test_in_order_payloads_come_out_once_and_in_order() -> None:
    recs = sealed(9)
    c = Consumer()
    out: list[Record] = []
    for i in range(0, 9, 3):
        out += c.feed(TOPIC, encode_payload(recs[i : i + 3]))
    out += c.feed(TOPIC, encode_payload(recs[3:6]))  # re-delivered after a reconnect
    assert seqs(out) == list(range(1, 10))
    (s,) = c.report().streams
    assert c.report().ok and s.duplicates == 3 and s.pending == 0
    assert c.heads() == {(GW, DEV): (9, recs[-1]["hash"])}


def test_out_of_order_records_are_held_until_the_hole_fills() -> None:
    recs = sealed(6)
    c = Consumer()
    assert seqs(c.feed(TOPIC, encode_payload(recs[:2]))) == [1, 2]
    assert c.feed(TOPIC, encode_payload(recs[3:5])) == []  # 3 is missing: hold 4, 5
    assert c.report().streams[0].pending == 2
    assert seqs(c.feed(TOPIC, encode_payload(recs[2:3]))) == [3, 4, 5]
    assert seqs(c.feed(TOPIC, encode_payload(recs[5:]))) == [6]
    assert c.report().ok


def test_a_hole_is_skipped_once_the_buffer_is_full_and_a_late_record_still_counts() -> None:
    recs = sealed(10)
    c = Consumer(max_buffer=3)
    out = c.feed(TOPIC, encode_payload(recs[:2]))
    for r in recs[3:7]:  # 4 records held > max_buffer 3: skip seq 3
        out += c.feed(TOPIC, encode_payload([r]))
    assert seqs(out) == [1, 2, 4, 5, 6, 7]
    rep = c.report()
    assert not rep.ok and rep.streams[0].unexplained == [[3, 3]]
    late = c.feed(TOPIC, encode_payload([recs[2]]))
    assert seqs(late) == [3]
    (s,) = c.report().streams
    assert c.report().ok and s.late == 1 and not s.unexplained


def test_max_buffer_zero_accepts_on_arrival_for_a_shared_subscription_member() -> None:
    recs = sealed(5)
    c = Consumer(max_buffer=0)
    got = [seqs(c.feed(TOPIC, encode_payload([recs[i]]))) for i in (0, 2, 4, 1, 3, 2)]
    assert got == [[1], [3], [5], [2], [4], []]
    (s,) = c.report().streams
    assert c.report().ok and (s.late, s.duplicates, s.unexplained) == (2, 1, [])


def test_a_gap_record_explains_the_hole_at_once() -> None:
    chain = Chain()
    recs = sealed(6, chain)
    gap = chain.seal(
        DEV,
        {
            **reading(99),
            "tag": EV_GAP,
            "val": "2 record(s) lost",
            "unit": "",
            "q": BAD,
            "info": {"reason": "quota", "count": 2, "from_ts": 1, "to_ts": 2, "ranges": [[3, 4]]},
        },
    )
    c = Consumer()
    out = c.feed(TOPIC, encode_payload(recs[:2]))
    out += c.feed(TOPIC, encode_payload(recs[4:]))
    assert seqs(out) == [1, 2]
    out += c.feed(TOPIC, encode_payload([gap]))  # sealed after the loss: seq 7
    assert seqs(out) == [1, 2, 5, 6, 7]
    (s,) = c.report().streams
    assert c.report().ok and s.explained == [[3, 4]]


def test_a_tampered_record_is_not_accepted_and_is_named() -> None:
    recs = sealed(4)
    bad = copy.deepcopy(recs[2])
    bad["val"] = 0.5
    c = Consumer()
    out = c.feed(TOPIC, encode_payload([*recs[:2], bad, recs[3]]))
    assert seqs(out) == [1, 2, 4]
    (s,) = c.report().streams
    assert s.bad_records == [(3, "hash does not match the record's content")]


def test_resume_continues_the_chain_and_drops_what_was_already_stored() -> None:
    recs = sealed(8)
    c = Consumer(resume={(GW, DEV): (5, recs[4]["hash"])})
    out = c.feed(TOPIC, encode_payload(recs[3:]))  # the broker re-sends 4..8
    assert seqs(out) == [6, 7, 8]
    (s,) = c.report().streams
    assert c.report().ok and s.duplicates == 2 and s.not_seen_before == 0
    forged = Consumer(resume={(GW, DEV): (5, b"\x01" * 32)})
    forged.feed(TOPIC, encode_payload(recs[5:]))
    assert forged.report().streams[0].broken_links == [(6, "prev does not match the hash of seq 5")]


def test_status_topics_are_skipped_and_the_published_key_is_kept() -> None:
    c = Consumer()
    assert c.feed(f"plant/{GW}/$status", b"online") == []
    key = b'{"algorithm": "ed25519", "fingerprint": "sha256:00", "key": "gw+00000000+AA"}'
    assert c.feed(f"plant/{GW}/$status/key", key) == []
    assert c.announced[f"plant/{GW}/$status/key"]["fingerprint"] == "sha256:00"
    assert c.feed(TOPIC, b"\xc1") == [] and not c.report().ok


# -- the documented example --------------------------------------------------------------
def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "# subscriber.py" in b]
    return example


def test_the_documented_example_is_about_twenty_lines() -> None:
    code = [line for line in example_code().splitlines() if line.strip()]
    assert 15 <= len(code) <= 30


async def test_the_documented_example_runs_against_a_real_gateway(
    sim: OffGasSimulator, own_broker: Mosquitto, tmp_path: Path
) -> None:
    script = tmp_path / "subscriber.py"
    script.write_text(example_code())
    spec = GatewaySpec(
        tmp_path / "state",
        own_broker.port,
        [Device("offgas", sim.port, poll_interval=0.05)],
        outbox="[checkpoints]\nenabled = true\nevery_records = 10\n",
    )
    config = spec.write()
    assert main(["keygen", "-c", str(config)]) == 0
    # Open the example's persistent session first: the broker then queues for it
    # whatever the gateway publishes before the script has even started.
    ready, stop = asyncio.Event(), asyncio.Event()
    pre = asyncio.create_task(
        subscribe(
            BrokerSection(port=own_broker.port),
            "plant/+/+",
            lambda t, p: None,
            ready=ready,
            stop=stop,
            client_id="example-subscriber",
            session_expiry=3600,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    stop.set()
    await pre
    # `gateway tail` (built on the same library) watches the live run.
    tail = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "gateway", "tail", "-c", str(config), "--seconds", "4"],
        *["--public-key", str(spec.state_dir / "checkpoint.pub")],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(1.5)  # its start-up; if it joins late, it starts where it joins
    async with running(spec.config()):
        await asyncio.sleep(1.5)
    async with asyncio.timeout(30):
        tail_out, tail_err = await tail.communicate()
    assert tail.returncode == 0, tail_err
    tailed = [record_from_json(line) for line in tail_out.decode().splitlines()]
    tailed_seqs = [r["seq"] for r in tailed if r["dev"] == "offgas"]
    assert len(tailed_seqs) > 20
    assert tailed_seqs == list(range(tailed_seqs[0], tailed_seqs[0] + len(tailed_seqs)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "127.0.0.1",
        str(own_broker.port),
        str(spec.state_dir / "checkpoint.pub"),
        "2.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await proc.communicate()
    out, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 0, out + err
    rows = [line.split() for line in out.splitlines() if line.startswith("offgas ")]
    got = [int(r[1]) for r in rows]
    assert got == list(range(1, len(got) + 1)) and len(got) > 40, out
    assert "$checkpoint" in {r[2] for r in rows}
    assert "PASS" in out and "records signed through" in out
