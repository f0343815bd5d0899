"""`gateway archive`: subscribe, verify, and keep every record in a local SQLite file.

One table, ``records``, keyed by ``(gw, dev, seq)``. Each row holds the record's
canonical bytes (every field but ``hash``, docs/records.md §2) and its hash, so
``SHA-256(body) = hash`` can be checked by anyone, years later, with any SQLite
and msgpack. The archiver subscribes with a persistent MQTT session (a fixed
client id derived from the database path and a session expiry): while it is
stopped the broker queues what arrives, and when it starts again it continues
every chain from the heads stored in the file. Re-deliveries are dropped by the
consumer and, failing that, by the primary key.

Writes are group-committed on a dedicated thread (never on the event loop). On
SIGTERM everything received is committed before the process exits. A SIGKILL
loses what was received in the last moments before the commit (at most one
commit interval): the broker has already been acknowledged, so the next run
reports those seqs as a gap, never silently.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

import msgpack

from gateway.config import BrokerSection
from gateway.consumer import Consumer, Report
from gateway.errors import GatewayError
from gateway.record import Record, canonical_bytes
from gateway.signing import VerifierKey

T = TypeVar("T")
COMMIT_INTERVAL = 0.2  # seconds between group commits while records arrive
SESSION_EXPIRY = 7 * 24 * 3600  # the broker keeps our queue for a week of downtime

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    gw TEXT NOT NULL,
    dev TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tag TEXT NOT NULL,
    ts INTEGER NOT NULL,
    hash BLOB NOT NULL,
    prev BLOB NOT NULL,
    body BLOB NOT NULL,
    received_ns INTEGER NOT NULL,
    PRIMARY KEY (gw, dev, seq)
) WITHOUT ROWID;
"""

CSV_COLUMNS = (
    "gw",
    "dev",
    "seq",
    "time_utc",
    "tag",
    "value",
    "unit",
    "quality",
    "status",
    "device_time_utc",
    "info",
    "hash",
    "prev",
)


class ArchiveError(GatewayError):
    """The archive file cannot be used."""


class Archive:
    """The SQLite file; open with ``await Archive.open(path)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive")
        self._db: sqlite3.Connection | None = None
        self._queue: list[Record] = []
        self.stored = 0
        self.conflicts: list[tuple[str, str, int]] = []

    @classmethod
    async def open(cls, path: Path) -> Archive:
        a = cls(path)
        try:
            await a._run(a._open)
        except BaseException:
            a._executor.shutdown(wait=True)
            raise
        return a

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise ArchiveError(f"{self.path}: cannot open archive: {exc}") from None
        self._db = db

    async def heads(self) -> dict[tuple[str, str], tuple[int, bytes]]:
        """(seq, hash) of the highest seq stored per stream: where to resume."""
        return await self._run(self._heads)

    def _heads(self) -> dict[tuple[str, str], tuple[int, bytes]]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT r.gw, r.dev, r.seq, r.hash FROM records r JOIN "
            "(SELECT gw, dev, MAX(seq) AS seq FROM records GROUP BY gw, dev) m "
            "ON r.gw = m.gw AND r.dev = m.dev AND r.seq = m.seq"
        ).fetchall()
        return {(g, d): (int(s), bytes(h)) for g, d, s, h in rows}

    def append(self, records: Sequence[Record]) -> None:
        """Queue verified records; :meth:`commit` writes them."""
        self._queue.extend(records)

    async def commit(self) -> int:
        batch, self._queue = self._queue, []
        if not batch:
            return 0
        n = await self._run(self._insert, batch, time.time_ns())
        self.stored += n
        return n

    def _insert(self, batch: list[Record], now: int) -> int:
        db = self._db
        assert db is not None
        rows = [
            (r["gw"], r["dev"], r["seq"], str(r["tag"]), r["ts"], r["hash"], r["prev"], body, now)
            for r in batch
            for body in (canonical_bytes(r),)
        ]
        stored = 0
        with db:
            db.execute("BEGIN IMMEDIATE")
            for row in rows:
                cur = db.execute(
                    "INSERT OR IGNORE INTO records(gw, dev, seq, tag, ts, hash, prev, body, "
                    "received_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                if cur.rowcount:
                    stored += 1
                    continue
                (held,) = db.execute(
                    "SELECT hash FROM records WHERE gw = ? AND dev = ? AND seq = ?", row[:3]
                ).fetchone()
                if bytes(held) != row[5]:
                    self.conflicts.append((row[0], row[1], row[2]))
        return stored

    async def close(self) -> None:
        try:
            await self.commit()
        finally:
            await self._run(self._close)
            self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def client_id_for(db: Path) -> str:
    """A stable MQTT client id per archive file: the broker's session follows the file."""
    digest = hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]
    return f"gateway-archive-{digest}"


async def run_archive(
    broker: BrokerSection,
    topic: str,
    db: Path,
    keys: Sequence[VerifierKey] = (),
    *,
    seconds: float | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    client_id: str | None = None,
    on_report: Callable[[str], None] | None = None,
) -> tuple[Report, Archive]:
    """Archive until ``seconds`` pass or ``stop`` is set; returns the run's report."""
    from gateway.subscribe import subscribe

    archive = await Archive.open(db)
    consumer = Consumer(keys, resume=await archive.heads())
    stop = stop or asyncio.Event()
    wake = asyncio.Event()

    def on_message(t: str, payload: bytes) -> None:
        records = consumer.feed(t, payload)
        if records:
            archive.append(records)
            wake.set()

    async def writer() -> None:
        while True:
            await wake.wait()
            wake.clear()
            await archive.commit()
            await asyncio.sleep(COMMIT_INTERVAL)

    task = asyncio.create_task(writer(), name="archive-writer")
    try:
        await subscribe(
            broker,
            topic,
            on_message,
            seconds=seconds,
            stop=stop,
            ready=ready,
            client_id=client_id or client_id_for(db),
            session_expiry=SESSION_EXPIRY,
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # Held records (waiting for a missing seq) are stored too; the hole stays
        # in the report and in `gateway verify --archive`.
        archive.append(consumer.flush())
        await archive.close()
    report = consumer.report()
    if on_report is not None:
        on_report(report.summary())
    return report, archive


# -- reading the file back ---------------------------------------------------------------
def read_records(db: Path) -> Iterator[Record]:
    """Every archived record, rebuilt with its hash, in (gw, dev, seq) order (blocking)."""
    if not db.exists():
        raise ArchiveError(f"{db}: no such archive")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT gw, dev, seq, hash, body FROM records ORDER BY gw, dev, seq"
            )
            for gw, dev, seq, digest, body in rows:
                try:
                    r = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True)
                except Exception as exc:  # msgpack raises several unrelated types
                    msg = f"{db}: {gw}/{dev} seq {seq}: body unreadable: {exc}"
                    raise ArchiveError(msg) from None
                if not isinstance(r, dict):
                    raise ArchiveError(f"{db}: {gw}/{dev} seq {seq}: body is not a map")
                r["hash"] = bytes(digest)
                yield r
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise ArchiveError(f"{db}: cannot read archive: {exc}") from None


def export_csv(db: Path, out: TextIO) -> int:
    """Write the archive as CSV for a reviewer; returns the number of rows (blocking)."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    n = 0
    for r in read_records(db):
        w.writerow(csv_row(r))
        n += 1
    return n


def csv_row(r: Record) -> list[str]:
    info = r.get("info")
    return [
        r["gw"],
        r["dev"],
        str(r["seq"]),
        _utc(r["ts"]),
        str(r["tag"]),
        _text(r["val"]),
        str(r["unit"]),
        str(r["q"]),
        _text(r.get("status")),
        _utc(r["src_ts"]) if "src_ts" in r else "",
        json.dumps(_jsonable(info), sort_keys=True, ensure_ascii=False) if info else "",
        r["hash"].hex(),
        r["prev"].hex(),
    ]


def _utc(ns: int) -> str:
    """ISO 8601 UTC with all nine fractional digits (the record's own precision)."""
    s, frac = divmod(int(ns), 1_000_000_000)
    return datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v
