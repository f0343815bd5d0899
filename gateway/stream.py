"""A device's stream: readings -> normalized records -> the outbox.

Applies the tag configuration (unit, scale/offset, deadband), stamps gateway
time and hands one acquisition cycle to the outbox, which chains it. Events
(start, offline, online) are records of the same stream. This is the hot path:
plain dicts, no validation per reading.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from gateway.config import DeviceConfig
from gateway.driver import Reading
from gateway.outbox import Outbox
from gateway.record import BAD, FORMAT_VERSION, GOOD, Record

_log = structlog.get_logger("gateway.stream")


class DeviceStream:
    """Turns one device's readings and events into records in its chain."""

    def __init__(self, gateway_id: str, device: DeviceConfig, outbox: Outbox) -> None:
        self.gw = gateway_id
        self.dev = device.id
        self.outbox = outbox
        # name -> (unit, scale, offset, deadband); scaling only when it changes something
        self._tags: dict[str, tuple[str, float, float, float, bool]] = {
            t.name: (t.unit, t.scale, t.offset, t.deadband, t.scale != 1.0 or t.offset != 0.0)
            for t in device.tags
        }
        self.tag_names = [t.name for t in device.tags]
        self._last: dict[str, tuple[Any, str]] = {}
        self.cycles = 0  # emit() calls: acquisition cycles, failed attempts included
        self.readings = 0
        self.records = 0
        self.errors = 0
        self.last_good_ns: int | None = None

    def normalize(self, readings: list[Reading], ts: int) -> list[Record]:
        out: list[Record] = []
        gw, dev, tags, last = self.gw, self.dev, self._tags, self._last
        for r in readings:
            spec = tags.get(r.tag)
            if spec is None:
                _log.warning("driver produced an unconfigured tag", device=dev, tag=r.tag)
                continue
            unit, scale, offset, deadband, scaled = spec
            val = r.val
            if scaled and isinstance(val, int | float) and not isinstance(val, bool):
                val = val * scale + offset
            q = r.q
            if deadband > 0.0:
                if q == GOOD and isinstance(val, int | float) and not isinstance(val, bool):
                    prev = last.get(r.tag)
                    if prev is not None and abs(val - prev[0]) <= deadband:
                        continue
                    last[r.tag] = (val, q)
                else:
                    # A bad or uncertain reading breaks continuity: the next good
                    # value is reported whatever its distance to the last one.
                    last.pop(r.tag, None)
            # Keys in canonical order (seq and prev are placeholders that
            # sealing fills in place), so the chain packs the dict as it is.
            status, src_ts = r.status, r.src_ts
            if status is None and src_ts is None:
                rec: Record = {
                    "dev": dev,
                    "gw": gw,
                    "prev": b"",
                    "q": q,
                    "seq": 0,
                    "tag": r.tag,
                    "ts": ts,
                    "unit": unit or r.unit or "",
                    "v": FORMAT_VERSION,
                    "val": val,
                }
            else:
                rec = {"dev": dev, "gw": gw, "prev": b"", "q": q, "seq": 0}
                if src_ts is not None:
                    rec["src_ts"] = src_ts
                if status is not None:
                    rec["status"] = status
                rec["tag"] = r.tag
                rec["ts"] = ts
                rec["unit"] = unit or r.unit or ""
                rec["v"] = FORMAT_VERSION
                rec["val"] = val
            if q != GOOD:
                self.errors += 1
            out.append(rec)
        self.readings += len(readings)
        return out

    async def emit(self, readings: list[Reading]) -> None:
        """Normalize one acquisition cycle and queue it for commit."""
        ts = time.time_ns()
        self.cycles += 1
        records = self.normalize(readings, ts)
        if records:
            await self.outbox.submit(self.dev, records, canonical=True)
            self.records += len(records)
        if any(r.q == GOOD for r in readings):
            self.last_good_ns = ts

    async def event(
        self, tag: str, val: str, *, q: str = GOOD, info: dict[str, Any] | None = None
    ) -> None:
        rec: Record = {
            "v": FORMAT_VERSION,
            "gw": self.gw,
            "dev": self.dev,
            "tag": tag,
            "val": val,
            "unit": "",
            "q": q,
            "ts": time.time_ns(),
        }
        if info:
            rec["info"] = info
        await self.outbox.submit(self.dev, [rec])
        self.records += 1

    async def all_bad(self, status: str) -> None:
        """A ``q=bad`` record for every tag: the device gave no values this cycle."""
        await self.emit([Reading(t, None, BAD, status) for t in self.tag_names])
        # A bad cycle breaks deadband continuity: the next good value must be reported.
        self._last.clear()
