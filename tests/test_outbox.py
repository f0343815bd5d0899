"""gateway.outbox.Outbox against a real SQLite file: order, chains, durability, quota.

Every test opens a real outbox in ``tmp_path``. A crash is a child process that
``os._exit``s without closing; the writer is held up, where a test needs it,
by another SQLite connection holding the write lock (the outbox waits on
SQLite's busy timeout, as it would behind a slow disk).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gateway.errors import OutboxError
from gateway.outbox import ROW_OVERHEAD, Outbox, merge_ranges
from gateway.record import BAD, EV_GAP, ZERO_HASH, Record, check_record, decode_payload
from gateway.verify import Verifier

GW = "gw-outbox"
REPO = Path(__file__).resolve().parent.parent


def reading(stream: str, i: int) -> Record:
    """An unsealed reading of ``stream`` (the outbox gives it seq, prev and hash)."""
    return {
        "v": 1,
        "gw": GW,
        "dev": stream,
        "tag": "T",
        "val": float(i),
        "unit": "Cel",
        "q": "good",
        "ts": time.time_ns(),
    }


async def open_box(path: Path, **kw: Any) -> Outbox:
    kw.setdefault("gateway_id", GW)
    return await Outbox.open(path, **kw)


@dataclass
class Row:
    id: int
    stream: str
    payload: bytes
    records: list[Record]


async def rows(box: Outbox) -> list[Row]:
    return [
        Row(m.id, m.stream, m.payload, decode_payload(m.payload))
        for m in await box.read_after(0, 1_000_000)
    ]


def records_of(all_rows: Iterable[Row], stream: str) -> list[Record]:
    return [r for row in all_rows if row.stream == stream for r in row.records]


def gaps_of(all_rows: Iterable[Row], stream: str) -> list[Record]:
    return [r for r in records_of(all_rows, stream) if r["tag"] == EV_GAP]


def missing_seqs(box: Outbox, all_rows: Iterable[Row], stream: str) -> list[list[int]]:
    """Seqs of ``stream`` sealed so far but no longer in the table, as merged ranges."""
    present = {r["seq"] for r in records_of(all_rows, stream)}
    head = box.chain.head(stream)[0]
    return merge_ranges([s, s] for s in range(1, head + 1) if s not in present)


def stored_bytes(all_rows: Iterable[Row]) -> int:
    return sum(len(row.payload) + ROW_OVERHEAD for row in all_rows)


async def settle(box: Outbox, streams: Iterable[str] = ("a",), timeout: float = 5.0) -> None:
    """Flush until the writer is idle: quota drops and their $gap records included.

    ``flush()`` waits for what was submitted; a $gap is queued by the writer
    itself after a commit, so wait until nothing moves for a few rounds.
    """
    streams = list(streams)
    deadline = time.monotonic() + timeout
    last: object = None
    stable = 0
    while stable < 3:
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox still busy after {timeout} s")
        await box.flush()
        await asyncio.sleep(0.02)
        state = (
            box.messages,
            box.bytes,
            box.dropped_records,
            [box.chain.head(s) for s in streams],
        )
        stable = stable + 1 if state == last else 0
        last = state
    await box.flush()


@contextmanager
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock on the outbox file from another connection."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    finally:
        db.execute("ROLLBACK")
        db.close()


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def assert_chain(records: list[Record], first_seq: int = 1, prev: bytes = ZERO_HASH) -> None:
    """Consecutive seqs from ``first_seq``, each linked to the one before, hashes valid."""
    for n, r in enumerate(records):
        assert check_record(r) is None, (r["seq"], check_record(r))
        assert r["seq"] == first_seq + n
        assert r["prev"] == prev, f"seq {r['seq']}: prev is not the previous record's hash"
        prev = r["hash"]


# -- order, chains, durability ------------------------------------------------------


async def test_submit_flush_read_after_gives_payloads_in_order_with_valid_chains(
    tmp_path: Path,
) -> None:
    async with await open_box(tmp_path / "outbox.db") as box:
        submitted: list[tuple[str, int]] = []
        for i in range(12):
            stream = "a" if i % 3 else "b"
            assert await box.submit(stream, [reading(stream, 10 * i + k) for k in range(3)])
            submitted.append((stream, i))
        assert await box.submit("a", []), "an empty cycle is accepted and stores nothing"
        await box.flush()

        got = await rows(box)
        assert [row.stream for row in got] == [s for s, _ in submitted]
        assert [row.id for row in got] == sorted(row.id for row in got)
        for row, (stream, i) in zip(got, submitted, strict=True):
            # Each payload: a msgpack array of one cycle's records, consecutive seqs.
            assert isinstance(msgpack.unpackb(row.payload), list)
            assert [r["val"] for r in row.records] == [float(10 * i + k) for k in range(3)]
            assert all(r["dev"] == stream for r in row.records)
            seqs = [r["seq"] for r in row.records]
            assert seqs == list(range(seqs[0], seqs[0] + 3))
        for stream in ("a", "b"):
            recs = records_of(got, stream)
            assert_chain(recs)
            assert box.chain.head(stream) == (recs[-1]["seq"], recs[-1]["hash"])
        assert box.messages == 12
        assert box.bytes == stored_bytes(got)

        # Paging: strictly after the given id, at most `limit` rows.
        page = await box.read_after(got[4].id, 3)
        assert [m.id for m in page] == [row.id for row in got[5:8]]
        assert await box.read_after(got[-1].id, 10) == []
        stats = await box.stats()
        assert (stats.messages, stats.bytes) == (12, box.bytes)
        assert stats.oldest_ts == got[0].records[0]["ts"]


async def test_chain_heads_persist_and_new_records_continue_from_them(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path) as box:
        for i in range(5):
            await box.submit("a", [reading("a", i), reading("a", i)])
        await box.submit("b", [reading("b", 0)])
        await box.flush()
        before = await rows(box)
    last_a = records_of(before, "a")[-1]
    assert query(path, "SELECT stream, seq, hash FROM heads ORDER BY stream") == [
        ("a", 10, last_a["hash"]),
        ("b", 1, records_of(before, "b")[-1]["hash"]),
    ]

    async with await open_box(path) as box:
        assert box.chain.head("a") == (10, last_a["hash"])
        assert box.chain.head("never-seen") == (0, ZERO_HASH)
        await box.submit("a", [reading("a", 99)])
        await box.flush()
        after = await rows(box)
    new = records_of(after, "a")[-1]
    assert (new["seq"], new["prev"]) == (11, last_a["hash"])
    assert_chain(records_of(after, "a"))

    v = Verifier()
    for row in after:
        for r in row.records:
            v.add(r)
    report = v.report()
    assert report.ok and not any(s.explained or s.unexplained for s in report.streams), (
        report.summary()
    )


async def test_unacked_messages_survive_reopen_and_ack_deletes_them(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path) as box:
        for i in range(6):
            await box.submit("a", [reading("a", i)])
        await box.flush()
        stored = await rows(box)
        size_before = box.bytes

    async with await open_box(path) as box:
        assert box.messages == 6
        assert box.bytes == size_before == stored_bytes(stored)
        again = await rows(box)
        assert [(r.id, r.payload) for r in again] == [(r.id, r.payload) for r in stored]

        box.ack([again[0].id, again[1].id])
        await box.flush()
        assert box.messages == 4
        assert box.bytes == size_before - stored_bytes(again[:2])
        left = await rows(box)
        assert [r.id for r in left] == [r.id for r in again[2:]]
        assert (await box.stats()).oldest_ts == again[2].records[0]["ts"]

    async with await open_box(path) as box:
        assert box.messages == 4
        assert [r.id for r in await rows(box)] == [r.id for r in again[2:]]
        # The head is not moved back by deleting published rows.
        assert box.chain.head("a")[0] == 6


async def test_clean_shutdown_flag_follows_close(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = await open_box(path)
    assert box.clean_shutdown, "a new outbox counts as cleanly shut down"
    await box.submit("a", [reading("a", 0)])
    await box.close(clean=True)
    box = await open_box(path)
    assert box.clean_shutdown
    await box.close(clean=False)
    box = await open_box(path)
    assert not box.clean_shutdown
    await box.close()
    box = await open_box(path)
    assert box.clean_shutdown
    await box.close()


CRASH_CHILD = r"""
import asyncio, json, os, sys, time
from pathlib import Path
from gateway.outbox import Outbox

async def main():
    path, gw, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    box = await Outbox.open(path, gateway_id=gw)
    for i in range(n):
        recs = [{"v": 1, "gw": gw, "dev": "a", "tag": "T", "val": float(i), "unit": "",
                 "q": "good", "ts": time.time_ns()} for _ in range(2)]
        await box.submit("a", recs)
    await box.flush()
    seq, digest = box.chain.head("a")
    print(json.dumps({"seq": seq, "hash": digest.hex(), "messages": box.messages}), flush=True)
    os._exit(0)  # a crash: no close(), so no clean-shutdown mark

asyncio.run(main())
"""


async def test_crash_without_close_keeps_committed_data_and_reads_as_unclean(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path):
        pass  # a clean history first: the flag must really flip
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASH_CHILD,
        str(path),
        GW,
        "7",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    head = json.loads(out)
    assert head["seq"] == 14 and head["messages"] == 7

    async with await open_box(path) as box:
        assert not box.clean_shutdown
        assert box.messages == 7
        assert box.chain.head("a") == (14, bytes.fromhex(head["hash"]))
        await box.submit("a", [reading("a", 0)])
        await box.flush()
        recs = records_of(await rows(box), "a")
    assert_chain(recs)
    assert recs[-1]["seq"] == 15


async def test_outbox_of_another_gateway_id_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path, gateway_id="gw-one") as box:
        await box.submit("a", [reading("a", 0)])
    with pytest.raises(OutboxError) as err:
        await open_box(path, gateway_id="gw-two")
    assert "'gw-one'" in str(err.value) and "'gw-two'" in str(err.value)
    assert str(path) in str(err.value)
    # Refusing did not touch the data: the right gateway still opens it.
    async with await open_box(path, gateway_id="gw-one") as box:
        assert box.messages == 1 and box.chain.head("a")[0] == 1


async def test_a_file_that_is_not_a_database_is_an_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not an SQLite database, just text " * 100)
    with pytest.raises(OutboxError, match="cannot open outbox"):
        await open_box(path)


# -- quota: drop_oldest ----------------------------------------------------------------


async def test_drop_oldest_deletes_the_oldest_rows_and_the_gap_lists_exactly_what_is_missing(
    tmp_path: Path,
) -> None:
    max_bytes = 20_000
    sent: dict[tuple[str, int], int] = {}
    async with await open_box(tmp_path / "outbox.db", max_bytes=max_bytes) as box:
        for i in range(160):  # ~33 kB of single-record cycles, interleaved over two streams
            stream = "ab"[i % 2]
            rec = reading(stream, i)
            assert await box.submit(stream, [rec])
            sent[stream, rec["seq"]] = rec["ts"]
        await settle(box, "ab")

        got = await rows(box)
        assert box.dropped_records > 0
        assert max_bytes * 0.8 <= box.bytes <= max_bytes, box.bytes
        assert box.bytes == stored_bytes(got) and box.messages == len(got)
        lost = 0
        for stream in "ab":
            missing = missing_seqs(box, got, stream)
            gaps = gaps_of(got, stream)
            assert len(missing) == 1 and missing[0][0] == 1, "the oldest rows go first"
            assert len(gaps) == 1, gaps
            gap = gaps[0]
            info = gap["info"]
            assert info["ranges"] == missing, "ranges must be exactly the seqs deleted"
            first, last = missing[0]
            assert info["count"] == last - first + 1
            assert info["from_ts"] == sent[stream, first] and info["to_ts"] == sent[stream, last]
            assert gap["q"] == BAD and gap["seq"] > last and gap["seq"] == box.chain.head(stream)[0]
            assert "drop_oldest" in info["reason"] and str(max_bytes) in info["reason"]
            assert gap["val"].startswith(f"{info['count']} record(s) lost")
            assert check_record(gap) is None
            lost += info["count"]
        assert box.dropped_records == lost

    v = Verifier()
    for row in got:
        for r in row.records:
            v.add(r)
    report = v.report()
    assert report.ok, report.summary()
    assert all(s.explained and not s.unexplained for s in report.streams)


async def test_drop_oldest_never_drops_rows_in_flight(tmp_path: Path) -> None:
    async with await open_box(tmp_path / "outbox.db", max_bytes=20_000) as box:
        box.inflight = lambda: frozenset({1, 2, 3})  # the first three rows await a PUBACK
        for wave in range(3):
            for i in range(120):
                await box.submit("a", [reading("a", 1000 * wave + i)])
            await settle(box)
            got = await rows(box)
            assert [row.id for row in got[:3]] == [1, 2, 3], f"wave {wave}: in-flight row dropped"
            assert [r["seq"] for row in got[:3] for r in row.records] == [1, 2, 3]
            missing = missing_seqs(box, got, "a")
            assert missing and missing[0][0] == 4
            covered = merge_ranges(rg for g in gaps_of(got, "a") for rg in g["info"]["ranges"])
            assert covered == missing
            assert box.bytes <= 20_000


async def test_drop_oldest_keeps_the_gateway_audit_stream(tmp_path: Path) -> None:
    # The $gateway stream holds the configuration audit trail (start, reload):
    # quota pressure from device data must never delete it.
    async with await open_box(tmp_path / "outbox.db", max_bytes=20_000) as box:
        for i in range(160):
            stream = "$gateway" if i % 10 == 0 else "a"
            assert await box.submit(stream, [reading(stream, i)])
        await settle(box, ["a"])
        got = await rows(box)
        assert box.dropped_records > 0
        assert missing_seqs(box, got, "a"), "device rows were dropped"
        assert missing_seqs(box, got, "$gateway") == []
        assert len(records_of(got, "$gateway")) == 16


async def test_gap_records_survive_later_drops_and_explain_every_missing_seq(
    tmp_path: Path,
) -> None:
    async with await open_box(tmp_path / "outbox.db", max_bytes=20_000) as box:
        for i in range(120):
            await box.submit("a", [reading("a", i)])
        await settle(box)
        first_gap = gaps_of(await rows(box), "a")
        assert len(first_gap) == 1
        g1 = first_gap[0]

        for i in range(150):
            await box.submit("a", [reading("a", 1000 + i)])
        await settle(box)
        got = await rows(box)
        surviving = gaps_of(got, "a")
        # A $gap row is what explains a loss: later drops never take it.
        assert g1["seq"] in {r["seq"] for r in records_of(got, "a")}, "g1's row was dropped"
        assert len(surviving) >= 2
        missing = missing_seqs(box, got, "a")
        # Every missing seq is still explained by a $gap that survives, and nothing more.
        covered = merge_ranges(rg for g in surviving for rg in g["info"]["ranges"])
        assert covered == missing
        for rg in g1["info"]["ranges"]:
            assert any(c[0] <= rg[0] and rg[1] <= c[1] for c in covered)
        assert box.dropped_records == sum(b - a + 1 for a, b in missing)

    v = Verifier()
    for row in got:
        for r in row.records:
            v.add(r)
    report = v.report()
    assert report.ok and report.streams[0].explained == missing, report.summary()


# -- quota: drop_newest ------------------------------------------------------------------


async def test_drop_newest_refuses_without_consuming_seqs_then_writes_a_gap(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path, max_bytes=4000, policy="drop_newest") as box:
        for i in range(30):  # ~6 kB: accepted (the quota is checked against committed bytes)
            assert await box.submit("a", [reading("a", i)])
        await settle(box)
        assert box.full
        head = box.chain.head("a")
        refused: list[Record] = []
        for i in range(5):
            cycle = [reading("a", 100 + i), reading("a", 200 + i)]
            assert await box.submit("a", cycle) is False
            assert all("seq" not in r and "hash" not in r for r in cycle), "sealed, then refused"
            refused += cycle
        await settle(box)
        assert box.chain.head("a") == head, "a refused record must not take a seq"
        assert box.dropped_records == 10
        assert box.messages == 30 and not gaps_of(await rows(box), "a"), "no room for a $gap yet"
        # The refusal is on disk already, so a crash now would still report it.
        assert query(path, "SELECT stream, count FROM pending_gaps") == [("a", 10)]

        box.ack(range(1, 21))  # the broker took 20 messages: room again
        await settle(box)
        got = await rows(box)
        gaps = gaps_of(got, "a")
        assert len(gaps) == 1
        gap = gaps[0]
        assert gap["seq"] == head[0] + 1 and gap["prev"] == head[1]
        assert gap["info"]["count"] == 10 and gap["info"]["ranges"] == []
        assert gap["info"]["from_ts"] == refused[0]["ts"]
        assert gap["info"]["to_ts"] == max(r["ts"] for r in refused)
        assert "drop_newest" in gap["info"]["reason"] and gap["q"] == BAD
        assert check_record(gap) is None
        assert query(path, "SELECT COUNT(*) FROM pending_gaps") == [(0,)]

        assert await box.submit("a", [reading("a", 300)])
        await box.flush()
        recs = records_of(await rows(box), "a")
    assert_chain(recs, first_seq=21, prev=recs[0]["prev"])
    assert recs[-1]["seq"] == head[0] + 2


# -- pending gaps across a crash --------------------------------------------------------------


async def test_a_pending_gap_left_by_a_crash_becomes_a_gap_record_at_the_next_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path) as box:
        for i in range(10):
            await box.submit("a", [reading("a", i)])
        await box.flush()
        recs = records_of(await rows(box), "a")
    # What a crash between the quota's DELETE and the $gap's commit leaves behind:
    # rows deleted and a pending gap saying so, in one transaction.
    db = sqlite3.connect(path)
    with db:
        db.execute("DELETE FROM messages WHERE first_seq BETWEEN 3 AND 5")
        db.execute(
            "INSERT INTO pending_gaps(stream, reason, count, from_ts, to_ts, ranges) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                "a",
                "test: crash mid-quota",
                3,
                recs[2]["ts"],
                recs[4]["ts"],
                msgpack.packb([[3, 5]]),
            ),
        )
    db.close()

    async with await open_box(path) as box:
        await settle(box)
        got = await rows(box)
        assert box.messages == 8
    gaps = gaps_of(got, "a")
    assert len(gaps) == 1
    gap = gaps[0]
    assert gap["seq"] == 11 and gap["prev"] == recs[-1]["hash"]
    assert gap["info"] == {
        "reason": "test: crash mid-quota",
        "count": 3,
        "from_ts": recs[2]["ts"],
        "to_ts": recs[4]["ts"],
        "ranges": [[3, 5]],
    }
    assert gap["val"] == "3 record(s) lost: test: crash mid-quota"
    assert query(path, "SELECT COUNT(*) FROM pending_gaps") == [(0,)]

    async with await open_box(path) as box:  # written once, not at every open
        await settle(box)
        assert len(gaps_of(await rows(box), "a")) == 1

    v = Verifier()
    for row in got:
        for r in row.records:
            v.add(r)
    report = v.report()
    assert report.ok and report.streams[0].explained == [[3, 5]], report.summary()


# -- back-pressure --------------------------------------------------------------------------


async def test_submit_waits_while_max_pending_messages_await_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path, max_pending=2) as box:
        await box.submit("a", [reading("a", 0)])
        await box.flush()  # the writer is idle
        with write_lock(path):
            # The writer takes this one and then waits on the lock mid-commit.
            assert await asyncio.wait_for(box.submit("a", [reading("a", 1)]), 1)
            await asyncio.sleep(0.1)
            # Two more fit in memory (max_pending=2) ...
            for i in (2, 3):
                assert await asyncio.wait_for(box.submit("a", [reading("a", i)]), 1)
            # ... the next one has to wait for the writer.
            blocked = asyncio.create_task(box.submit("a", [reading("a", 4)]))
            await asyncio.sleep(0.3)
            assert not blocked.done(), "submit must wait while max_pending messages are queued"
            assert box.messages == 1
        # The lock is gone: the writer commits and takes the queued pair; submit returns.
        assert await asyncio.wait_for(blocked, 5) is True
        await box.flush()
        recs = records_of(await rows(box), "a")
        assert [r["val"] for r in recs] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert_chain(recs)


# -- bugs -------------------------------------------------------------------------------------


async def test_drop_oldest_never_reports_acknowledged_rows_as_lost(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path, max_bytes=5000) as box:
        inflight = set(range(1, 11))
        box.inflight = lambda: frozenset(inflight)
        for i in range(10):  # ~2 kB, published and awaiting PUBACK
            await box.submit("a", [reading("a", i)])
        await box.flush()
        with write_lock(path):
            for i in range(20):  # ~4 kB more: 30 rows would be over the quota ...
                await box.submit("a", [reading("a", 100 + i)])
            await asyncio.sleep(0)  # the writer takes them and waits on the lock
            # ... but the PUBACKs arrive during that commit (as Publisher._on_publish does).
            inflight.clear()
            box.ack(range(1, 11))
        await settle(box)
        got = await rows(box)
        gaps = gaps_of(got, "a")
    # 20 unpublished rows (~4.2 kB) fit in 5 kB: nothing was lost.
    assert box.dropped_records == 0, f"$gap {gaps[0]['info'] if gaps else None}"
    assert gaps == []


async def test_drop_newest_refusal_during_the_freeing_commit_still_gets_its_gap(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    async with await open_box(path, max_bytes=4000, policy="drop_newest") as box:
        for i in range(30):
            await box.submit("a", [reading("a", i)])
        await settle(box)
        assert await box.submit("a", [reading("a", 0), reading("a", 1)]) is False
        await settle(box)
        with write_lock(path):
            box.ack(range(1, 26))
            await asyncio.sleep(0)  # the writer takes the acks and waits on the lock
            # Still full until that commit lands: refused.
            assert await box.submit("a", [reading("a", k) for k in range(3)]) is False
        await settle(box)
        gaps = gaps_of(await rows(box), "a")
        assert box.dropped_records == 5
        pending = query(path, "SELECT stream, count FROM pending_gaps")
    assert sum(g["info"]["count"] for g in gaps) == 5, f"$gap counts {gaps}, pending {pending}"
    assert pending == []


LIVELOCK_CHILD = r"""
import asyncio, os, sys, time
from pathlib import Path
from gateway.outbox import Outbox

def rec(i):
    return {"v": 1, "gw": "gw", "dev": "a", "tag": "T", "val": float(i), "unit": "",
            "q": "good", "ts": time.time_ns()}

async def main():
    max_bytes, n, in_flight = (int(a) for a in sys.argv[2:5])
    box = await Outbox.open(Path(sys.argv[1]), gateway_id="gw", max_bytes=max_bytes)
    box.inflight = lambda: frozenset(range(1, in_flight + 1))
    for i in range(n):
        await box.submit("a", [rec(i)])
    await box.flush()
    await box.submit("a", [rec(n)])
    await box.flush()
    await asyncio.sleep(0.5)
    print("head", box.chain.head("a")[0], flush=True)
    try:
        await asyncio.wait_for(box.close(), 1.5)
        print("closed", flush=True)
    except TimeoutError:
        print("close() hung", flush=True)
    os._exit(0)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("max_bytes", "n", "in_flight"),
    [(300, 2, 0), (20_000, 100, 100)],
    ids=["quota-below-one-gap-row", "in-flight-rows-fill-the-quota"],
)
def test_quota_drops_settle(tmp_path: Path, max_bytes: int, n: int, in_flight: int) -> None:
    args = [str(tmp_path / "outbox.db"), str(max_bytes), str(n), str(in_flight)]
    child = subprocess.run(
        [sys.executable, "-c", LIVELOCK_CHILD, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    head = int(lines[0].split()[1])
    assert head <= n + 5, f"{head - n - 1} $gap records written after {n + 1} readings"
    assert lines[1] == "closed", lines[1]
