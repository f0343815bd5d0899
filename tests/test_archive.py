"""`gateway archive` with real parts: a gateway process, the off-gas simulator, a
real Mosquitto and the archiver as a process that is stopped and restarted while
the gateway keeps publishing. Nothing may be missing or stored twice, the chains
must verify across the restart, and the CSV export must match the file."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.archive import CSV_COLUMNS, client_id_for, read_records
from gateway.cli import main
from gateway.config import BrokerSection
from gateway.record import EV_CHECKPOINT, EV_STOP, Record
from gateway.subscribe import subscribe
from gateway.verify import Verifier
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.gateway import Device, GatewaySpec, kill, spawn

DEV = "offgas"


def stored(db: Path, dev: str = DEV) -> list[tuple[int, str]]:
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db)) as c:
        try:
            rows = c.execute("SELECT seq, tag FROM records WHERE dev = ? ORDER BY seq", (dev,))
            return [(int(s), str(t)) for s, t in rows]
        except sqlite3.OperationalError:  # the table is not there yet
            return []


async def wait_db(
    db: Path, pred: Callable[[list[tuple[int, str]]], bool], what: str, timeout: float = 20
) -> None:
    """Poll the file another process writes (there is nothing to wait on instead)."""
    try:
        async with asyncio.timeout(timeout):
            while not pred(await asyncio.to_thread(stored, db)):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def archiver(config: Path, db: Path, key: Path, log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "archive",
        "-c",
        str(config),
        "--db",
        str(db),
        "--public-key",
        str(key),
        stdout=log.open("ab"),
        stderr=asyncio.subprocess.STDOUT,
    )


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.terminate()
    async with asyncio.timeout(20):
        return await proc.wait()


async def open_session(port: int, client_id: str) -> None:
    """Create a persistent session, so the broker queues for it from now on."""
    ready, done = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        subscribe(
            BrokerSection(port=port),
            "plant/+/+",
            lambda t, p: None,
            ready=ready,
            stop=done,
            client_id=client_id,
            session_expiry=3600,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    done.set()
    await task


async def test_archive_survives_a_restart_without_loss_or_duplicates(
    sim: OffGasSimulator, own_broker: Mosquitto, tmp_path: Path
) -> None:
    spec = GatewaySpec(
        tmp_path / "state",
        own_broker.port,
        [Device(DEV, sim.port, poll_interval=0.05)],
        outbox="[checkpoints]\nenabled = true\nevery_records = 20\nevery_seconds = 1\n",
    )
    config = spec.write()
    assert main(["keygen", "-c", str(config)]) == 0
    key = spec.state_dir / "checkpoint.pub"
    db = tmp_path / "archive" / "records.db"
    log = tmp_path / "archiver.log"
    # An independent witness with its own persistent session sees everything.
    witness = Verifier()
    w_ready, w_stop = asyncio.Event(), asyncio.Event()
    w_task = asyncio.create_task(
        subscribe(
            BrokerSection(port=own_broker.port),
            "plant/+/+",
            lambda t, p: witness.consumer.feed(t, p) and None,
            ready=w_ready,
            stop=w_stop,
            client_id="witness",
            session_expiry=3600,
        )
    )
    await asyncio.wait_for(w_ready.wait(), 10)
    await open_session(own_broker.port, client_id_for(db))

    gw = spawn(config, tmp_path / "gw.log")
    try:
        a1 = await archiver(config, db, key, log)
        await wait_db(db, lambda rows: len(rows) >= 40, "first archiver run")
        assert await stop(a1) == 0, log.read_text()
        first = await asyncio.to_thread(stored, db)
        await asyncio.sleep(1.0)  # the gateway goes on; the broker queues for the archiver
        a2 = await archiver(config, db, key, log)
        await wait_db(db, lambda rows: len(rows) >= len(first) + 60, "second archiver run")
        assert await asyncio.to_thread(kill, gw, 15) == 0
        # The checkpoint after $stop signs the stream to its very end.
        await wait_db(
            db,
            lambda rows: any(t == EV_CHECKPOINT and (s - 1, EV_STOP) in rows for s, t in rows),
            "$stop and its checkpoint",
        )
        assert await stop(a2) == 0, log.read_text()
    finally:
        if gw.poll() is None:
            kill(gw)
        w_stop.set()
        await w_task

    out = log.read_text()
    assert out.count("PASS") == 2, out
    rows = stored(db)
    last = rows[-1][0]
    assert [s for s, _ in rows] == list(range(1, last + 1)), "nothing missing, nothing twice"
    assert first[-1][0] < last - 60
    # The whole file verifies, across the restart, and is signed to the end.
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["verify", "--archive", str(db), "--public-key", str(key)])
    assert code == 0, text.getvalue()
    assert f"gw-test/{DEV}: {last} records, seq 1..{last}" in text.getvalue()
    assert f"{last} records signed through seq {last - 1}" in text.getvalue()
    # Exactly what an independent subscriber received.
    archived = {(r["dev"], r["seq"]): r["hash"] for r in read_records(db)}
    held = witness.consumer.flush()
    assert witness.report().ok
    assert archived == {(r["dev"], r["seq"]): r["hash"] for r in held}

    # The reviewer's CSV matches the file row for row.
    csv_path = tmp_path / "review.csv"
    assert main(["archive", "export", "--db", str(db), "--csv", str(csv_path)]) == 0
    with csv_path.open(newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_COLUMNS
    records: list[Record] = list(read_records(db))
    assert len(table) == len(records)
    for row, r in zip(table, records, strict=True):
        assert (row["dev"], int(row["seq"]), row["tag"]) == (r["dev"], r["seq"], r["tag"])
        assert row["hash"] == r["hash"].hex() and row["prev"] == r["prev"].hex()
        if isinstance(r["val"], float):
            assert float(row["value"]) == r["val"]
    o2 = next(row for row in table if row["tag"] == "O2")
    assert o2["unit"] == "%" and o2["quality"] == "good" and o2["time_utc"].endswith("Z")
    cp = next(row for row in table if row["tag"] == EV_CHECKPOINT)
    assert "\u2014 gw-test " in cp["info"]
