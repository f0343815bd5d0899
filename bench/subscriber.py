"""The benchmark subscriber: its own process; decodes, verifies and times every record.

``python -m bench.subscriber --port P --topic T --format gateway|peer --out DIR``

* ``gateway``: msgpack payloads of the gateway. Every record's hash is
  recomputed (the gateway's canonical encoding, :mod:`gateway.record`), every
  link checked against the previous record's hash, every seq accounted for.
  :class:`gateway.verify.Verifier` keeps every record in memory, which a run
  of millions of records cannot afford: this checker does the same checks
  streaming, keeping only seq ranges and the recent hashes of each stream.
* ``peer``: the Node-RED flow's JSON records (one record or an array per
  message), chained with SHA-256 over their JSON text; same checks.

MQTT is received by :mod:`bench.mqttsub` (see there why not paho).
Writes ``DIR/status.json`` twice a second (records so far, ``$stop`` events
seen) and, on SIGTERM, ``DIR/result.json`` plus ``DIR/messages.bin``: one
(receive time ns, records, latency ns) triple per message, latency measured
from the first record's ``ts`` (a gateway message is one acquisition cycle
with one ``ts``).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import msgpack

from bench.mqttsub import subscribe
from gateway.record import EV_GAP, EV_STOP, ZERO_HASH, check_record

RECENT = 50_000  # hashes kept per stream for link and duplicate checks


class Stream:
    """Seq ranges seen and the recent hashes of one stream."""

    __slots__ = (
        "bad",
        "broken",
        "conflicts",
        "dups",
        "events",
        "explained",
        "ranges",
        "recent",
        "unlinked",
    )

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []
        self.recent: dict[int, tuple[bytes | str, bytes | str]] = {}  # seq -> (hash, prev)
        self.dups = 0
        self.bad: list[str] = []
        self.broken: list[int] = []
        self.conflicts: list[int] = []
        self.unlinked = 0  # links not checkable: previous hash no longer kept
        self.events: dict[str, int] = {}
        self.explained: list[list[int]] = []

    def add(self, seq: int, digest: bytes | str, prev: bytes | str, zero: bytes | str) -> bool:
        """Account ``seq``; False if it is a duplicate."""
        r = self.ranges
        recent = self.recent
        if r and r[-1][1] == seq - 1:
            # In order (nearly always): extend the last range, check the link.
            r[-1][1] = seq
            recent[seq] = (digest, prev)
            before = recent.get(seq - 1)
            if before is None:
                self.unlinked += 1
            elif before[0] != prev:
                self.broken.append(seq)
            if len(recent) > 2 * RECENT:
                self._trim()
            return True
        if not r or seq > r[-1][1]:
            r.append([seq, seq])
        else:
            i = bisect.bisect_right(r, [seq, float("inf")]) - 1
            if i >= 0 and r[i][0] <= seq <= r[i][1]:
                self.dups += 1
                old = recent.get(seq)
                if old is not None and old[0] != digest:
                    self.conflicts.append(seq)
                return False
            r.insert(i + 1, [seq, seq])
            self._merge(i + 1)
        recent[seq] = (digest, prev)
        if len(recent) > 2 * RECENT:
            self._trim()
        before = recent.get(seq - 1)
        if seq == 1:
            if prev != zero:
                self.broken.append(seq)
        elif before is not None:
            if before[0] != prev:
                self.broken.append(seq)
        else:
            self.unlinked += 1
        after = recent.get(seq + 1)
        if after is not None:
            # It arrived after its successor (out of order): check that link now.
            self.unlinked -= 1
            if after[1] != digest:
                self.broken.append(seq + 1)
        return True

    def _trim(self) -> None:
        # Keep the newest RECENT hashes (in bulk: trimming per record costs more).
        items = list(self.recent.items())[-RECENT:]
        self.recent = dict(items)

    def _merge(self, i: int) -> None:
        r = self.ranges
        if i + 1 < len(r) and r[i][1] + 1 == r[i + 1][0]:
            r[i][1] = r[i + 1][1]
            del r[i + 1]
        if i > 0 and r[i - 1][1] + 1 == r[i][0]:
            r[i - 1][1] = r[i][1]
            del r[i]

    def missing(self) -> list[list[int]]:
        """Seq ranges never received (from 1), minus those a ``$gap`` explains."""
        out: list[list[int]] = []
        expect = 1
        for a, b in self.ranges:
            if a > expect:
                out.append([expect, a - 1])
            expect = b + 1
        return _subtract(out, self.explained)

    @property
    def records(self) -> int:
        return sum(b - a + 1 for a, b in self.ranges)


def _subtract(spans: list[list[int]], covered: list[list[int]]) -> list[list[int]]:
    for c0, c1 in covered:
        nxt = []
        for a, b in spans:
            if c1 < a or c0 > b:
                nxt.append([a, b])
                continue
            if a < c0:
                nxt.append([a, c0 - 1])
            if b > c1:
                nxt.append([c1 + 1, b])
        spans = nxt
    return spans


class Checker:
    """Streaming verification of either format."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.streams: dict[str, Stream] = {}
        self.malformed: list[str] = []
        self.stops = 0
        self.messages = 0
        self.records = 0  # unique records
        self.bad = 0  # unique records with q != good
        self._order: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def stream(self, key: str) -> Stream:
        s = self.streams.get(key)
        if s is None:
            s = self.streams[key] = Stream()
        return s

    def gateway(self, topic: str, payload: bytes) -> tuple[int, int]:
        """Check one gateway message: (good readings in it, ts of the first record).

        Only good readings count as delivered: a device that does not answer
        still produces records (``q=bad``, events), which must not pass for
        throughput.
        """
        try:
            recs = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            self.malformed.append(f"{topic}: {exc}")
            return 0, 0
        pack, sha, orders, streams = self._pack, hashlib.sha256, self._order, self.streams
        good = 0
        for r in recs:
            key = f"{r.get('gw')}/{r.get('dev')}"
            s = streams.get(key) or self.stream(key)
            if "info" in r or not isinstance(r.get("hash"), bytes):
                why = check_record(r)
                digest = r.get("hash")
            else:
                # The gateway's canonical encoding of a flat record: msgpack of
                # the map with its keys in UTF-8 byte order, without "hash".
                layout = tuple(r)
                order = orders.get(layout)
                if order is None:
                    order = orders[layout] = tuple(sorted(k for k in layout if k != "hash"))
                digest = r["hash"]
                why = None
                if sha(pack({k: r[k] for k in order})).digest() != digest:
                    why = check_record(r) or "hash mismatch"
            if why is not None:
                s.bad.append(f"seq {r.get('seq')}: {why}")
                continue
            if s.add(r["seq"], digest, r["prev"], ZERO_HASH):
                self.records += 1
                tag = r["tag"]
                if r["q"] != "good":
                    self.bad += 1
                elif tag[0] != "$":
                    good += 1
                if tag[0] == "$":
                    s.events[tag] = s.events.get(tag, 0) + 1
                    if tag == EV_STOP:
                        self.stops += 1
                    elif tag == EV_GAP:
                        s.explained.extend((r.get("info") or {}).get("ranges") or [])
        return good, recs[0]["ts"] if recs else 0

    def peer(self, topic: str, payload: bytes) -> tuple[int, int]:
        """Check one Node-RED message (a JSON record or an array of them)."""
        try:
            obj = json.loads(payload)
        except ValueError as exc:
            self.malformed.append(f"{topic}: {exc}")
            return 0, 0
        recs = obj if isinstance(obj, list) else [obj]
        dumps, sha = json.dumps, hashlib.sha256
        for r in recs:
            s = self.stream(str(r.get("dev")))
            digest = r.pop("hash", None)
            body = dumps(r, separators=(",", ":"))
            if digest is None or sha(body.encode()).hexdigest() != digest:
                s.bad.append(f"seq {r.get('seq')}: hash does not match the JSON record")
                continue
            if s.add(r["seq"], digest, r["prev"], "0" * 64):
                self.records += 1
        return len(recs), int(recs[0]["ts"]) if recs else 0

    def result(self) -> dict[str, Any]:
        problems: list[str] = list(self.malformed[:20])
        streams = {}
        missing_total = 0
        for key, s in sorted(self.streams.items()):
            miss = s.missing()
            missing_total += sum(b - a + 1 for a, b in miss)
            for m in s.bad[:5]:
                problems.append(f"{key}: bad record {m}")
            for q in s.broken[:5]:
                problems.append(f"{key}: broken link at seq {q}")
            for q in s.conflicts[:5]:
                problems.append(f"{key}: conflicting copies of seq {q}")
            for a, b in miss[:5]:
                problems.append(f"{key}: seq {a}..{b} missing")
            streams[key] = {
                "records": s.records,
                "last_seq": s.ranges[-1][1] if s.ranges else 0,
                "duplicates": s.dups,
                "unlinked": s.unlinked,
                "events": s.events,
            }
        return {
            "format": self.fmt,
            "messages": self.messages,
            "records": self.records,
            "bad_quality": self.bad,
            "streams": len(self.streams),
            "missing": missing_total,
            "duplicates": sum(s.dups for s in self.streams.values()),
            "verify_ok": not problems,
            "problems": problems[:50],
            "per_stream": streams if len(streams) <= 20 else {},
        }


async def run(args: argparse.Namespace, out: Path) -> None:
    chk = Checker(args.format)
    recv = array.array("q")
    count = array.array("l")
    lat = array.array("q")
    check = chk.gateway if args.format == "gateway" else chk.peer
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on(now: int, topic: str, payload: bytes) -> None:
        if topic.endswith("$status"):
            return
        n, ts = check(topic, payload)
        if ts:
            chk.messages += 1
            recv.append(now)
            count.append(n)
            lat.append(now - ts)

    def status() -> None:
        tmp = out / "status.tmp"
        tmp.write_text(
            json.dumps(
                {
                    "records": chk.records,
                    "messages": chk.messages,
                    "first_recv_ns": recv[0] if recv else 0,
                    "stops": chk.stops,
                    "last_recv_ns": recv[-1] if recv else 0,
                    "last_latency_ms": lat[-1] / 1e6 if lat else None,
                }
            )
        )
        os.replace(tmp, out / "status.json")

    async def report() -> None:
        while True:
            status()
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report())
    await subscribe(
        args.port, args.topic, args.client_id, on, stop, lambda: (out / "ready").touch()
    )
    reporter.cancel()
    status()
    with (out / "messages.bin").open("wb") as f:
        for a in (recv, count, lat):
            a.tofile(f)
    (out / "result.json").write_text(json.dumps(chk.result()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--format", choices=["gateway", "peer"], default="gateway")
    ap.add_argument("--client-id", default=f"bench-sub-{os.getpid()}")
    ap.add_argument("--out", required=True)
    import logging

    logging.disable(logging.WARNING)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args, out))


def read_messages(path: Path) -> tuple[list[int], list[int], list[int]]:
    """(receive ns, records, latency ns) per message, as written by the subscriber."""
    raw = path.read_bytes()
    n = len(raw) // (8 + array.array("l").itemsize + 8)
    recv, count, lat = array.array("q"), array.array("l"), array.array("q")
    with path.open("rb") as f:
        recv.fromfile(f, n)
        count.fromfile(f, n)
        lat.fromfile(f, n)
    return recv.tolist(), count.tolist(), lat.tolist()


if __name__ == "__main__":
    main()
