"""Fault tests: the promises of ARCHITECTURE.md's failure table, against real parts.

Broker stopped and restarted, gateway SIGKILLed, a device dead or answering
exceptions, the outbox quota reached: nothing is lost silently and every chain
still verifies.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.outbox import merge_ranges
from gateway.record import Record
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import OFFGAS_TAGS, Device, GatewaySpec, kill, running, spawn


def first_delivery_seqs(records: list[Record], dev: str) -> list[int]:
    """Seqs in the order they first arrived (re-deliveries dropped)."""
    seen: set[int] = set()
    out = []
    for r in records:
        if r["dev"] == dev and r["seq"] not in seen:
            seen.add(r["seq"])
            out.append(r["seq"])
    return out


def heads(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT stream, seq FROM heads").fetchall())


async def test_broker_down_10s_everything_arrives_in_order(
    sim: OffGasSimulator, own_broker: Mosquitto, tmp_path: Path
) -> None:
    spec = GatewaySpec(tmp_path / "state", own_broker.port, [Device("offgas", sim.port)])
    async with Collector(own_broker.port) as col:
        async with running(spec.config()) as gw:
            await col.wait_for(lambda: len(col.of("offgas", "O2")) >= 5, what="first polls")
            own_broker.stop()
            t0 = time.monotonic()
            await asyncio.sleep(10)
            assert gw.outbox is not None
            backlog = gw.outbox.messages
            assert backlog >= 80, f"acquisition must go on during the outage ({backlog})"
            head_during = gw.outbox.chain.head("offgas")[0]
            own_broker.start()
            await col.wait_for(
                lambda: any(r["seq"] >= head_during for r in col.of("offgas")),
                timeout=20,
                what="the backlog",
            )
            drain = time.monotonic() - t0 - 10
        await col.wait_for(lambda: col.of("offgas", "$stop"), what="stop event")

    seqs = first_delivery_seqs(col.records, "offgas")
    assert seqs == list(range(1, len(seqs) + 1)), "records must arrive in order, none missing"
    report = col.verifier.report()
    assert report.ok, report.summary()
    assert not report.streams[0].explained
    assert drain < 10, f"backlog of {backlog} messages took {drain:.1f} s"


async def test_sigkill_loses_no_committed_record_and_chains_continue(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    spec = GatewaySpec(
        tmp_path / "state",
        broker.port,
        [Device("offgas", sim.port), Device("offgas-b", sim.port, poll_interval=0.05)],
    )
    config = spec.write()
    db = spec.state_dir / "outbox.db"
    async with Collector(broker.port) as col:
        proc = spawn(config, tmp_path / "gw1.log")
        await col.wait_for(lambda: len(col.of("offgas-b", "O2")) >= 20, what="first run")
        assert kill(proc) == -9
        committed = heads(db)
        assert committed["offgas"] > 5 and committed["offgas-b"] > 20

        proc = spawn(config, tmp_path / "gw2.log")
        await col.wait_for(
            lambda: all(
                any(r["seq"] > committed[d] + 10 for r in col.of(d)) for d in ("offgas", "offgas-b")
            ),
            timeout=20,
            what="the second run",
        )
        assert kill(proc, 15) == 0, "SIGTERM must exit 0"
        await col.wait_for(lambda: len(col.of("offgas", "$stop")) == 1, what="stop event")

    report = col.verifier.report()
    assert report.ok, report.summary()
    for s in report.streams:
        # Every record committed before the kill was delivered: no gap at all.
        assert s.first_seq == 1 and not s.explained and not s.unexplained
        assert s.last_seq > committed[s.dev]
    starts = col.of("offgas", "$start")
    assert [r["info"]["clean_shutdown"] for r in starts] == [True, False]
    assert starts[1]["info"]["previous_seq"] == committed["offgas"]
    assert starts[1]["seq"] == committed["offgas"] + 1
    assert "unclean" in starts[1]["val"]


async def test_dead_device_does_not_slow_the_others_and_recovers(
    broker: Mosquitto, tmp_path: Path
) -> None:
    good = OffGasSimulator(update_interval=0.05)
    flaky = OffGasSimulator(update_interval=0.05)
    await good.start()
    await flaky.start()
    spec = GatewaySpec(
        tmp_path / "state",
        broker.port,
        [Device("good", good.port, timeout=0.3), Device("flaky", flaky.port, timeout=0.3)],
    )

    def rate(col: Collector, t0: float, t1: float) -> float:
        n = sum(1 for r in col.of("good", "O2") if t0 <= r["ts"] / 1e9 < t1)
        return n / (t1 - t0)

    phases: dict[str, float] = {}
    try:
        async with Collector(broker.port) as col, running(spec.config()):
            await asyncio.sleep(0.5)
            for phase, action in (
                ("normal", lambda: None),
                ("silent", lambda: flaky.set_fault("silent")),
                ("exception", lambda: flaky.set_fault("exception", 4)),
                ("drop", lambda: flaky.set_fault("drop")),
            ):
                action()
                t0 = time.time()
                await asyncio.sleep(2.0)
                phases[phase] = rate(col, t0 + 0.2, time.time() - 0.1)
                flaky.set_fault(None)
            await flaky.stop()  # the device disappears entirely
            await asyncio.sleep(1.5)
            await flaky.start()
            t_back = time.time()
            await col.wait_for(
                lambda: any(r["q"] == "good" and r["ts"] / 1e9 > t_back for r in col.of("flaky")),
                timeout=10,
                what="the flaky device's recovery",
            )
    finally:
        await good.stop()
        await flaky.stop()

    for phase, r in phases.items():
        assert 8.0 <= r <= 11.0, f"good device polled at {r:.1f}/s during '{phase}' (want ~10)"
    flaky_recs = col.of("flaky")
    bad = [r for r in flaky_recs if r["q"] == "bad" and not r["tag"].startswith("$")]
    statuses = {r["status"] for r in bad}
    assert "timeout" in statuses, statuses
    assert 4 in statuses, "exception code 4 must be the record's status"
    assert all(r["val"] is None for r in bad), "a bad reading never carries a stale value"
    offline = col.of("flaky", "$offline")
    online = col.of("flaky", "$online")
    assert len(offline) >= 2 and len(online) >= 2
    assert any("no answer" in r["val"] for r in offline)
    # After the last $online, the device is back to good values.
    last_online = online[-1]["seq"]
    assert any(r["q"] == "good" and r["seq"] > last_online for r in flaky_recs)
    report = col.verifier.report()
    assert report.ok, report.summary()


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_quota_reached_while_broker_down_leaves_an_explained_gap(
    policy: str, sim: OffGasSimulator, own_broker: Mosquitto, tmp_path: Path
) -> None:
    spec = GatewaySpec(
        tmp_path / "state",
        own_broker.port,
        [Device("offgas", sim.port, poll_interval=0.02, tags=OFFGAS_TAGS)],
        outbox=f'max_bytes = 65536\npolicy = "{policy}"',
    )
    async with Collector(own_broker.port) as col:
        own_broker.stop()
        async with running(spec.config()) as gw:
            assert gw.outbox is not None
            outbox = gw.outbox
            await asyncio.sleep(3)  # ~150 cycles of ~2.5 kB: far past 64 KiB
            assert outbox.dropped_records > 0
            assert outbox.bytes <= 65536 * 1.1
            own_broker.start()
            await col.wait_for(lambda: col.of("offgas", "$gap"), timeout=15, what="$gap")
            await asyncio.sleep(0.5)
        await col.wait_for(lambda: col.of("offgas", "$stop"), what="stop event")

    report = col.verifier.report()
    assert report.ok, report.summary()
    stream = next(s for s in report.streams if s.dev == "offgas")
    gap = col.of("offgas", "$gap")[0]
    assert gap["q"] == "bad" and "quota" in gap["val"] and policy in gap["info"]["reason"]
    assert gap["info"]["count"] > 0 and gap["info"]["from_ts"] <= gap["info"]["to_ts"]
    if policy == "drop_oldest":
        assert stream.explained and not stream.unexplained
        declared = merge_ranges(r for g in col.of("offgas", "$gap") for r in g["info"]["ranges"])
        assert merge_ranges(stream.explained) == declared
        assert stream.not_seen_before == 0
    else:
        assert stream.declared_lost > 0 and not stream.explained
        assert first_delivery_seqs(col.records, "offgas")[0] == 1
