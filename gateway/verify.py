"""Subscriber-side verification: every hash, every chain link, every seq.

Feed it records in any order, duplicates included (delivery is at-least-once);
``report()`` names each record that fails and why. Missing seqs are *explained*
when a ``$gap`` record of the same stream lists them; otherwise they are a
break. A subscriber that joined late simply starts at the first seq it saw.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.outbox import merge_ranges
from gateway.record import (
    EV_GAP,
    ZERO_HASH,
    Record,
    canonical_bytes,
    check_record,
    decode_payload,
)


@dataclass
class StreamReport:
    gw: str
    dev: str
    records: int = 0
    duplicates: int = 0
    first_seq: int = 0
    last_seq: int = 0
    bad_records: list[tuple[int, str]] = field(default_factory=list)
    broken_links: list[tuple[int, str]] = field(default_factory=list)
    conflicts: list[int] = field(default_factory=list)
    explained: list[list[int]] = field(default_factory=list)
    unexplained: list[list[int]] = field(default_factory=list)
    declared_lost: int = 0  # records refused before they got a seq (drop_newest)
    not_seen_before: int = 0  # seqs before the first one seen that no $gap explains
    events: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.bad_records or self.broken_links or self.conflicts or self.unexplained)

    def summary(self) -> str:
        head = (
            f"{self.gw}/{self.dev}: {self.records} records, seq {self.first_seq}..{self.last_seq}"
        )
        parts = [head]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate deliveries (ignored)")
        if self.explained:
            n = sum(b - a + 1 for a, b in self.explained)
            parts.append(f"{n} records in explained gaps {_ranges(self.explained)}")
        if self.not_seen_before:
            parts.append(f"seq 1..{self.not_seen_before} not seen (subscribed after them)")
        if self.declared_lost:
            parts.append(f"{self.declared_lost} records declared lost before chaining")
        if self.events:
            parts.append("events " + ", ".join(f"{k}×{v}" for k, v in sorted(self.events.items())))
        lines = ["; ".join(parts)]
        for seq, why in self.bad_records:
            lines.append(f"  BAD RECORD seq {seq}: {why}")
        for seq, why in self.broken_links:
            lines.append(f"  BROKEN LINK at seq {seq}: {why}")
        for seq in self.conflicts:
            lines.append(f"  CONFLICT seq {seq}: two different records carry this seq")
        for a, b in self.unexplained:
            lines.append(f"  UNEXPLAINED GAP seq {a}..{b} ({b - a + 1} records missing)")
        lines[0] += " — OK" if self.ok else " — FAILED"
        return "\n".join(lines)


@dataclass
class Report:
    streams: list[StreamReport]
    malformed: list[str]

    @property
    def ok(self) -> bool:
        return not self.malformed and all(s.ok for s in self.streams)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.streams)

    def summary(self) -> str:
        lines = [s.summary() for s in self.streams]
        lines += [f"MALFORMED: {m}" for m in self.malformed]
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: {len(self.streams)} stream(s), {self.records} unique records")
        return "\n".join(lines)


class Verifier:
    """Collects records and checks them; see the module docstring."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, str], dict[int, Record]] = {}
        self._dups: dict[tuple[str, str], int] = {}
        self._conflicts: dict[tuple[str, str], list[int]] = {}
        self.malformed: list[str] = []

    def add_payload(self, payload: bytes, where: str = "payload") -> None:
        try:
            records = decode_payload(payload)
        except ValueError as exc:
            self.malformed.append(f"{where}: {exc}")
            return
        for r in records:
            self.add(r, where)

    def add(self, record: Mapping[str, Any], where: str = "record") -> None:
        try:
            key = (str(record["gw"]), str(record["dev"]))
            seq = int(record["seq"])
        except (KeyError, TypeError, ValueError):
            self.malformed.append(f"{where}: record without gw/dev/seq: {dict(record)!r:.200}")
            return
        stream = self._streams.setdefault(key, {})
        seen = stream.get(seq)
        if seen is None:
            stream[seq] = dict(record)
        elif _same(seen, record):
            self._dups[key] = self._dups.get(key, 0) + 1
        else:
            # Two different copies of one seq: tampering or a forked chain,
            # whichever copy is sound. Keep the sound one for the link checks.
            self._conflicts.setdefault(key, []).append(seq)
            if check_record(seen) is not None and check_record(record) is None:
                stream[seq] = dict(record)

    def report(self) -> Report:
        return Report([self._check(k, s) for k, s in sorted(self._streams.items())], self.malformed)

    def _check(self, key: tuple[str, str], recs: dict[int, Record]) -> StreamReport:
        rep = StreamReport(key[0], key[1], duplicates=self._dups.get(key, 0))
        rep.conflicts = sorted(set(self._conflicts.get(key, [])))
        seqs = sorted(recs)
        rep.records, rep.first_seq, rep.last_seq = len(seqs), seqs[0], seqs[-1]
        covered: list[list[int]] = []
        sound: set[int] = set()
        for seq in seqs:
            r = recs[seq]
            why = check_record(r)
            if why is not None:
                rep.bad_records.append((seq, why))
                continue
            sound.add(seq)
            tag = r["tag"]
            if isinstance(tag, str) and tag.startswith("$"):
                rep.events[tag] = rep.events.get(tag, 0) + 1
                if tag == EV_GAP and isinstance(r.get("info"), dict):
                    info = r["info"]
                    ranges = info.get("ranges") or []
                    covered.extend(ranges)
                    if not ranges:
                        rep.declared_lost += int(info.get("count", 0))
        for seq in seqs:
            if seq not in sound:
                continue
            prev = recs[seq]["prev"]
            if seq == 1 and prev != ZERO_HASH:
                rep.broken_links.append((1, "first record's prev is not 32 zero bytes"))
            elif seq - 1 in sound and recs[seq - 1]["hash"] != prev:
                rep.broken_links.append((seq, f"prev does not match the hash of seq {seq - 1}"))
        covered = merge_ranges(covered)
        if seqs[0] > 1:
            # Before the first seq seen: explained where a $gap says so, else the
            # subscriber simply was not there yet (not an error).
            lead = [1, seqs[0] - 1]
            rest = _subtract(lead, covered)
            rep.not_seen_before = rest[-1][1] if rest else 0
            for c in covered:
                lo, hi = max(lead[0], c[0]), min(lead[1], c[1])
                if lo <= hi:
                    rep.explained.append([lo, hi])
        for a, b in _missing(seqs):
            for part in _subtract([a, b], covered):
                rep.unexplained.append(part)
            for c in covered:
                lo, hi = max(a, c[0]), min(b, c[1])
                if lo <= hi:
                    rep.explained.append([lo, hi])
        return rep


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Byte-identical records (a re-delivery), judged on every field."""
    try:
        return a.get("hash") == b.get("hash") and canonical_bytes(a) == canonical_bytes(b)
    except (TypeError, ValueError):
        return False


def _missing(seqs: list[int]) -> Iterable[tuple[int, int]]:
    for a, b in itertools.pairwise(seqs):
        if b > a + 1:
            yield a + 1, b - 1


def _subtract(span: list[int], covered: list[list[int]]) -> list[list[int]]:
    out = [span]
    for c0, c1 in covered:
        nxt = []
        for a, b in out:
            if c1 < a or c0 > b:
                nxt.append([a, b])
                continue
            if a < c0:
                nxt.append([a, c0 - 1])
            if b > c1:
                nxt.append([c1 + 1, b])
        out = nxt
    return out


def _ranges(ranges: list[list[int]]) -> str:
    return ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in ranges)


# -- JSON lines (what `gateway tail` prints, what `verify --capture` reads) -------
# bytes fields are hex; a NaN (whose sign and payload JSON cannot carry, and the
# hash covers) is written as {"f64": "<16 hex digits>"}, the float's 8 bytes.
_BYTES_FIELDS = ("prev", "hash")


def _to_json(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and math.isnan(v):
        return {"f64": struct.pack(">d", v).hex()}
    if isinstance(v, dict):
        return {k: _to_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_json(x) for x in v]
    return v


def _from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"f64"} and isinstance(v["f64"], str):
            return float(struct.unpack(">d", bytes.fromhex(v["f64"]))[0])
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def record_to_json(record: Mapping[str, Any]) -> str:
    return json.dumps(_to_json(dict(record)), sort_keys=True, separators=(",", ":"))


def record_from_json(line: str) -> Record:
    obj = _from_json(json.loads(line))
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for f in _BYTES_FIELDS:
        if isinstance(obj.get(f), str):
            obj[f] = bytes.fromhex(obj[f])
    return obj
