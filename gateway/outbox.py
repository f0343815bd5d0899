"""Durable outbox: SQLite (WAL) between the chain and the publisher.

One row per outgoing MQTT message (one device's acquisition cycle). A message
is *acquired* once its transaction commits; the stream's chain head is written
in the same transaction, so a restart after SIGKILL or power loss continues
every chain from what is on disk. Rows are deleted only after the broker's
PUBACK.

All SQLite work runs on one dedicated thread; the event loop never blocks on
disk. Writes are group-committed: every message queued while the previous
transaction ran goes into the next one, so the number of transactions tracks
disk speed, not the number of records.

When the stored bytes exceed the quota, the policy applies:
- ``drop_oldest``: the oldest unpublished messages are deleted (in the same
  transaction a *pending gap* notes their seq ranges); a chained ``$gap``
  record is then written in each affected stream.
- ``drop_newest``: new records are refused before they get a seq; their count
  and time span are kept as a pending gap (on disk), written as a ``$gap``
  record once there is room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgpack

from gateway.errors import OutboxError
from gateway.record import BAD, EV_GAP, FORMAT_VERSION, Chain, Record, merge_ranges

Policy = Literal["drop_oldest", "drop_newest"]
Durability = Literal["full", "normal"]
T = TypeVar("T")

ACK_DELAY = 0.2  # seconds an acknowledged row may wait for its delete
FRESH_MAX_BYTES = 4 << 20  # committed payloads kept in memory for the publisher
ROW_OVERHEAD = 64  # bytes counted per row on top of the payload (ids, seqs, index)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    gaps BLOB,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS heads (
    stream TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_gaps (
    stream TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    from_ts INTEGER NOT NULL,
    to_ts INTEGER NOT NULL,
    ranges BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(slots=True)
class StoredMessage:
    """A committed message as the publisher sees it."""

    id: int
    stream: str
    payload: bytes


@dataclass(slots=True)
class _Pending:
    stream: str
    first_seq: int
    last_seq: int
    first_ts: int
    last_ts: int
    head: bytes
    gaps: bytes | None
    payload: bytes
    resolves_gap: bool = False


@dataclass(slots=True)
class PendingGap:
    """Records lost in one stream and not yet written as a ``$gap`` record."""

    stream: str
    reason: str
    count: int
    from_ts: int
    to_ts: int
    ranges: list[list[int]] = field(default_factory=list)


@dataclass(slots=True)
class OutboxStats:
    messages: int
    bytes: int
    oldest_ts: int | None


class Outbox:
    """The durable queue of messages; use ``async with await Outbox.open(...)``."""

    def __init__(
        self,
        path: Path,
        *,
        gateway_id: str,
        max_bytes: int,
        policy: Policy,
        durability: Durability,
        max_pending: int,
        commit_window: float = 0.0,
    ) -> None:
        self.path = path
        self.gateway_id = gateway_id
        self.max_bytes = max_bytes
        self.policy = policy
        self.durability = durability
        self._max_pending = max_pending
        self.commit_window = commit_window
        self._first_pending_at = 0.0
        self._urgent = False
        # Committed rows the publisher has not read yet, in id order: it takes
        # them from here instead of reading back what was just written. A
        # cache only: SQLite stays the truth (reconnects, backlogs read from it).
        self._fresh: deque[StoredMessage] = deque()
        self._fresh_bytes = 0
        self._last_id = 0  # highest row id committed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._db: sqlite3.Connection | None = None
        self._pending: list[_Pending] = []
        self._acked: list[int] = []
        self._refused: dict[str, PendingGap] = {}
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._committed = asyncio.Condition()
        # Work handed to the writer vs. work committed, for flush().
        self._submitted = 0
        self._done = 0
        self._gaps_waiting = False
        self.bytes = 0
        self.messages = 0
        self.chain = Chain()
        self.clean_shutdown = True
        self.inflight: Callable[[], frozenset[int]] = frozenset
        self.on_commit: Callable[[], None] = lambda: None
        # Called with each message's records once sealed; may return a record
        # (a signed checkpoint) to seal right after it, as a message of its own.
        self.after_seal: Callable[[str, list[Record]], Record | None] | None = None
        self.dropped_records = 0
        self.commits = 0
        self.failed = asyncio.Event()  # set when a write failed: nothing more can be acquired
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._failure: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        gateway_id: str,
        max_bytes: int = 1 << 30,
        policy: Policy = "drop_oldest",
        durability: Durability = "full",
        max_pending: int = 10_000,
        commit_window: float = 0.0,
    ) -> Outbox:
        box = cls(
            path,
            gateway_id=gateway_id,
            max_bytes=max_bytes,
            policy=policy,
            durability=durability,
            max_pending=max_pending,
            commit_window=commit_window,
        )
        try:
            await box._run(box._open_db)
        except BaseException:
            await box._run(box._close_db)
            box._executor.shutdown(wait=True)
            raise
        box._writer = asyncio.create_task(box._write_loop(), name="outbox-writer")
        return box

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    async def close(self, *, clean: bool = True) -> None:
        """Commit everything queued, record a clean shutdown, close the database."""
        if self._writer is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.gather(self._writer, return_exceptions=True)
        finally:
            self._writer = None
            if clean and self._failure is None:
                await self._run(self._set_meta, "clean_shutdown", "1")
            await self._run(self._close_db)
            self._executor.shutdown(wait=True)

    def _open_db(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"{self.path}: cannot open outbox: {exc}") from exc
        self._db = db
        heads = {s: (q, bytes(h)) for s, q, h in db.execute("SELECT stream, seq, hash FROM heads")}
        self.chain = Chain(heads)
        row = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        self.messages, payload_bytes = int(row[0]), int(row[1])
        seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        self._last_id = int(seq_row[0]) if seq_row else 0
        self.bytes = payload_bytes + self.messages * ROW_OVERHEAD
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        self.clean_shutdown = meta.get("clean_shutdown", "1") == "1"
        stored_gw = meta.get("gateway_id")
        if stored_gw is not None and stored_gw != self.gateway_id:
            raise OutboxError(
                f"{self.path}: outbox belongs to gateway {stored_gw!r}, config says "
                f"{self.gateway_id!r}; chains cannot move between gateway ids"
            )
        with db:
            db.execute("BEGIN")
            self._set_meta_in_tx(db, "gateway_id", self.gateway_id)
            self._set_meta_in_tx(db, "clean_shutdown", "0")

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _set_meta(self, key: str, value: str) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            self._set_meta_in_tx(self._db, key, value)

    @staticmethod
    def _set_meta_in_tx(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- producing ---------------------------------------------------------------
    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    async def submit(self, stream: str, records: list[Record], *, canonical: bool = False) -> bool:
        """Seal ``records`` into ``stream`` and queue them for commit.

        Waits while too many messages await commit (back-pressure on the
        drivers). Returns False when the ``drop_newest`` policy refused them;
        the refusal is kept as a pending gap, never silent. ``canonical``: the
        caller built every record flat and in canonical key order (see
        ``Chain.seal_payload``).
        """
        if not records:
            return True
        if self._failure is not None:
            raise OutboxError(f"{self.path}: outbox writer failed: {self._failure}")
        while len(self._pending) >= self._max_pending:
            self._space.clear()
            await self._space.wait()
        if self.policy == "drop_newest" and self.full:
            self._refuse(stream, records)
            return False
        self._queue(stream, records, gaps=None, canonical=canonical)
        return True

    def _queue(
        self,
        stream: str,
        records: list[Record],
        *,
        gaps: bytes | None,
        resolves: bool = False,
        canonical: bool = False,
    ) -> None:
        payload = self.chain.seal_payload(stream, records, canonical=canonical)
        first, last = records[0], records[-1]
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append(
            _Pending(
                stream,
                first["seq"],
                last["seq"],
                first["ts"],
                last["ts"],
                last["hash"],
                gaps,
                payload,
                resolves,
            )
        )
        self._submitted += 1
        self._wake.set()
        if self.after_seal is not None:
            extra = self.after_seal(stream, records)
            if extra is not None:
                self._queue(stream, [extra], gaps=None)

    def _refuse(self, stream: str, records: list[Record]) -> None:
        n = len(records)
        self.dropped_records += n
        self._gaps_waiting = True
        self._submitted += 1
        t0, t1 = records[0]["ts"], records[-1]["ts"]
        gap = self._refused.get(stream)
        if gap is None:
            reason = (
                f"outbox quota of {self.max_bytes} bytes reached (policy drop_newest): "
                "records refused before they were chained"
            )
            self._refused[stream] = PendingGap(stream, reason, n, t0, t1)
        else:
            gap.count += n
            gap.from_ts = min(gap.from_ts, t0)
            gap.to_ts = max(gap.to_ts, t1)
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything submitted so far (messages, acks, refusals) is committed."""
        target = self._submitted
        self._urgent = True
        self._wake.set()
        async with self._committed:
            await self._committed.wait_for(
                lambda: self._done >= target or self._failure is not None
            )
        if self._failure is not None:
            raise OutboxError(f"{self.path}: outbox writer failed: {self._failure}")

    # -- consuming (the publisher) -------------------------------------------------
    def ack(self, ids: Iterable[int]) -> None:
        """The broker acknowledged these rows: delete them in the next transaction."""
        before = len(self._acked)
        self._acked.extend(ids)
        self._submitted += len(self._acked) - before
        # Deletes need not be durable at once (a lost delete only means one
        # more re-delivery after a crash), so they ride along with the next
        # insert, or go on their own after ACK_DELAY: half the fsyncs.
        if len(self._acked) >= 1000:
            self._wake.set()

    async def read_after(self, after_id: int, limit: int) -> list[StoredMessage]:
        """Committed messages with id > ``after_id``, in order."""
        fresh = self._fresh
        while fresh and fresh[0].id <= after_id:
            self._fresh_bytes -= len(fresh.popleft().payload)
        if fresh and fresh[0].id == after_id + 1:
            n = min(limit, len(fresh))
            return [fresh[i] for i in range(n)]
        if not fresh and after_id >= self._last_id:
            return []  # nothing committed after it
        return await self._run(self._read_after, after_id, limit)

    def _forget(self, deleted: frozenset[int]) -> None:
        # Rows deleted while still cached (acknowledged before this reader got
        # to them: e.g. after a reconnect) must not be handed out again.
        kept = [m for m in self._fresh if m.id not in deleted]
        self._fresh = deque(kept)
        self._fresh_bytes = sum(len(m.payload) for m in kept)

    def _remember(self, first_id: int, batch: list[_Pending]) -> None:
        fresh = self._fresh
        for i, m in enumerate(batch):
            fresh.append(StoredMessage(first_id + i, m.stream, m.payload))
            self._fresh_bytes += len(m.payload)
        # A publisher that is offline does not read: keep only the newest rows
        # (contiguous ids); it reads older ones back from SQLite when it returns.
        while self._fresh_bytes > FRESH_MAX_BYTES:
            self._fresh_bytes -= len(fresh.popleft().payload)

    def _read_after(self, after_id: int, limit: int) -> list[StoredMessage]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, stream, payload FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [StoredMessage(int(i), s, bytes(p)) for i, s, p in rows]

    async def stats(self) -> OutboxStats:
        oldest = await self._run(self._oldest_ts)
        return OutboxStats(self.messages, self.bytes, oldest)

    def _oldest_ts(self) -> int | None:
        assert self._db is not None
        # The first row by id (rows are committed in time order): MIN(first_ts)
        # scans the table, ~0.3 s at a 1 GiB backlog, on the writer's thread.
        row = self._db.execute("SELECT first_ts FROM messages ORDER BY id LIMIT 1").fetchone()
        return None if row is None else int(row[0])

    # -- the writer ------------------------------------------------------------------
    async def _write_loop(self) -> None:
        # Gaps left pending by a crash are written before anything new.
        await self._write_pending_gaps()
        while True:
            if self._acked and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ACK_DELAY):
                        await self._wake.wait()
            else:
                await self._wake.wait()
            if self.commit_window > 0 and self._pending and not self._urgent and not self._closing:
                # Let cycles of other devices join this transaction: one commit
                # (and one fsync, one thread hop) per window, not per cycle.
                delay = self._first_pending_at + self.commit_window - time.monotonic()
                if delay > 0 and len(self._pending) < self._max_pending:
                    await asyncio.sleep(delay)
            self._wake.clear()
            self._urgent = False
            batch, self._pending = self._pending, []
            acked, self._acked = self._acked, []
            refused, self._refused = self._refused, {}
            ops = self._submitted
            self._space.set()
            try:
                if batch or acked or refused:
                    last_id = await self._run(self._commit, batch, acked, list(refused.values()))
                    self.commits += 1
                    if acked and self._fresh and self._fresh[0].id <= max(acked):
                        self._forget(frozenset(acked))
                    if batch:
                        self._last_id = last_id
                        self._remember(last_id - len(batch) + 1, batch)
                        self.on_commit()
                    # Quota work (deletes, and the $gap records it queues)
                    # belongs to this round: flush() waits for it too.
                    await self._apply_quota()
            except BaseException as exc:
                self._failure = exc
                async with self._committed:
                    self._committed.notify_all()
                self.failed.set()
                raise
            self._done = ops
            async with self._committed:
                self._committed.notify_all()
            if self._closing and not (self._pending or self._acked or self._refused):
                return

    def _commit(self, batch: list[_Pending], acked: list[int], refused: list[PendingGap]) -> int:
        """One transaction; returns the id of the last message inserted.

        AUTOINCREMENT ids from a single writer are consecutive within it, so
        the batch's ids are ``last - len(batch) + 1 .. last``.
        """
        db = self._db
        assert db is not None
        heads: dict[str, tuple[int, bytes]] = {}
        added = 0
        for m in batch:
            heads[m.stream] = (m.last_seq, m.head)
            added += len(m.payload) + ROW_OVERHEAD
        last_id = 0
        with db:
            db.execute("BEGIN IMMEDIATE")
            if batch:
                db.executemany(
                    "INSERT INTO messages(stream, first_seq, last_seq, first_ts, last_ts, gaps, "
                    "payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            m.stream,
                            m.first_seq,
                            m.last_seq,
                            m.first_ts,
                            m.last_ts,
                            m.gaps,
                            m.payload,
                        )
                        for m in batch
                    ],
                )
                # Before the heads upsert, which moves last_insert_rowid.
                last_id = int(db.execute("SELECT last_insert_rowid()").fetchone()[0])
                db.executemany(
                    "INSERT INTO heads(stream, seq, hash) VALUES (?, ?, ?) ON CONFLICT(stream) "
                    "DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    [(s, q, h) for s, (q, h) in heads.items()],
                )
                resolved = [(m.stream,) for m in batch if m.resolves_gap]
                if resolved:
                    db.executemany("DELETE FROM pending_gaps WHERE stream = ?", resolved)
            removed = 0
            if acked:
                removed = self._delete_rows(db, acked)
            for gap in refused:
                self._upsert_gap(db, gap)
        self.messages += len(batch)
        self.bytes += added - removed
        return last_id

    def _delete_rows(self, db: sqlite3.Connection, ids: Sequence[int]) -> int:
        """Delete rows by id (inside a transaction); returns the bytes freed."""
        freed = 0
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            row = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages "
                f"WHERE id IN ({marks})",
                chunk,
            ).fetchone()
            db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
            self.messages -= int(row[0])
            freed += int(row[1]) + int(row[0]) * ROW_OVERHEAD
        return freed

    @staticmethod
    def _upsert_gap(db: sqlite3.Connection, gap: PendingGap) -> None:
        row = db.execute(
            "SELECT count, from_ts, to_ts, ranges FROM pending_gaps WHERE stream = ?",
            (gap.stream,),
        ).fetchone()
        if row is not None:
            gap = PendingGap(
                gap.stream,
                gap.reason,
                gap.count + int(row[0]),
                min(gap.from_ts, int(row[1])),
                max(gap.to_ts, int(row[2])),
                merge_ranges([*gap.ranges, *msgpack.unpackb(row[3])]),
            )
        db.execute(
            "INSERT INTO pending_gaps(stream, reason, count, from_ts, to_ts, ranges) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(stream) DO UPDATE SET reason = excluded.reason,"
            " count = excluded.count, from_ts = excluded.from_ts, to_ts = excluded.to_ts, "
            "ranges = excluded.ranges",
            (gap.stream, gap.reason, gap.count, gap.from_ts, gap.to_ts, msgpack.packb(gap.ranges)),
        )

    async def _apply_quota(self) -> None:
        if self.full and self.policy == "drop_oldest":
            # Delivered rows awaiting their delete are not data at risk: they
            # count as freed, never as dropped (their delete is already queued).
            keep = self.inflight() | frozenset(self._acked)
            if await self._run(self._drop_oldest, keep, frozenset(self._acked)):
                # Rows left the table under the cache: read from SQLite again.
                self._fresh.clear()
                self._fresh_bytes = 0
                await self._write_pending_gaps()
        elif not self.full and self._gaps_waiting and not self._refused:
            # Refusals still in memory are persisted by the next commit first;
            # the flag stays up until every one of them is on disk.
            self._gaps_waiting = False
            await self._write_pending_gaps()

    def _drop_oldest(self, keep: frozenset[int], acked: frozenset[int]) -> bool:
        """Delete the oldest unpublished rows down to 90 % of the quota, noting the gaps.

        Rows holding ``$gap`` records are never dropped: they are what explains
        the loss, and dropping them would only write another one (a livelock
        when the quota is tiny). Nor are rows of gateway-level streams (``$``
        ids: the configuration audit trail). Returns whether anything was dropped.
        """
        db = self._db
        assert db is not None
        target = self.bytes - int(self.max_bytes * 0.9)
        doomed: list[int] = []
        lost: dict[str, PendingGap] = {}
        freed = 0
        deleted = 0
        cursor = db.execute(
            "SELECT id, stream, first_seq, last_seq, first_ts, last_ts, gaps, LENGTH(payload) "
            "FROM messages ORDER BY id"
        )
        for mid, stream, first, last, t0, t1, gaps, size in cursor:
            if freed >= target:
                break
            if mid in acked:
                freed += size + ROW_OVERHEAD  # deleted by the next commit anyway
                continue
            if mid in keep or gaps is not None or stream.startswith("$"):
                # $gap rows explain losses; "$" streams (the $gateway audit
                # trail of config changes) are what a reviewer must never miss.
                continue
            doomed.append(mid)
            freed += size + ROW_OVERHEAD
            deleted += size + ROW_OVERHEAD
            ranges = [[first, last]]
            g = lost.get(stream)
            if g is None:
                reason = (
                    f"outbox quota of {self.max_bytes} bytes reached (policy drop_oldest): "
                    "oldest unpublished records deleted"
                )
                lost[stream] = PendingGap(stream, reason, last - first + 1, t0, t1, ranges)
            else:
                g.count += last - first + 1
                g.from_ts, g.to_ts = min(g.from_ts, t0), max(g.to_ts, t1)
                g.ranges.extend(ranges)
        cursor.close()
        if not doomed:
            return False
        with db:
            db.execute("BEGIN IMMEDIATE")
            self._delete_rows(db, doomed)
            for g in lost.values():
                g.ranges = merge_ranges(g.ranges)
                self._upsert_gap(db, g)
        self.bytes -= deleted
        self.dropped_records += sum(g.count for g in lost.values())
        return True

    async def _write_pending_gaps(self) -> None:
        gaps = await self._run(self._load_gaps)
        for g in gaps:
            record: Record = {
                "v": FORMAT_VERSION,
                "gw": self.gateway_id,
                "dev": g.stream,
                "tag": EV_GAP,
                "val": f"{g.count} record(s) lost: {g.reason}",
                "unit": "",
                "q": BAD,
                "ts": time.time_ns(),
                "info": {
                    "reason": g.reason,
                    "count": g.count,
                    "from_ts": g.from_ts,
                    "to_ts": g.to_ts,
                    "ranges": g.ranges,
                },
            }
            # The gap record's own row remembers which seqs it explains, so that
            # if quota later drops this row too, the next gap still covers them.
            self._queue(g.stream, [record], gaps=msgpack.packb(g.ranges), resolves=True)

    def _load_gaps(self) -> list[PendingGap]:
        assert self._db is not None
        return [
            PendingGap(s, r, int(c), int(a), int(b), msgpack.unpackb(rg))
            for s, r, c, a, b, rg in self._db.execute(
                "SELECT stream, reason, count, from_ts, to_ts, ranges FROM pending_gaps"
            )
        ]
