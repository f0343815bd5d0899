"""The consumer library: decode, verify, de-duplicate and order the gateway's records.

Feed it what the broker delivers; it hands back each stream's records once, in
seq order, and keeps a report of everything that was wrong::

    consumer = Consumer(public_keys=load_public([Path("gw-01.pub")]))
    for record in consumer.feed(topic, payload):  # newly accepted, in order
        store(record)
    print(consumer.report().summary())

What it checks (docs/records.md §8, docs/integrity.md): each record's hash, the
link to the previous record, missing seqs (explained by a ``$gap`` record or
not), two different records with one seq (conflict), and the signature and
stream head of every ``$checkpoint`` record. Re-deliveries (at-least-once) are
counted, not errors. A stream starts at seq 1, at the ``resume`` head given, or
(a subscriber that joined late) at the first seq it sees.

Two modes:

* ``max_buffer=N`` (live, the default): records after a missing seq wait, at
  most N per stream, for the missing ones or for the ``$gap`` record that
  explains them; then the hole is skipped and reported. A record that turns
  up after its hole was skipped is still accepted ("late"). Memory is bounded:
  only the last ``window`` hashes per stream are kept to tell a re-delivery
  from a conflict.
* ``max_buffer=None`` (a whole capture or archive): nothing is released before
  :meth:`flush`; the records may come in any order. ``gateway verify`` works so.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.record import (
    EV_CHECKPOINT,
    EV_GAP,
    ZERO_HASH,
    Record,
    canonical_bytes,
    check_record,
    decode_payload,
    merge_ranges,
)
from gateway.signing import NoteError, VerifierKey, open_note, parse_checkpoint, parse_note

__all__ = ["Consumer", "Record", "Report", "StreamReport", "merge_ranges"]


@dataclass
class StreamReport:
    """What one stream ``(gw, dev)`` looked like; ``ok`` is the verdict."""

    gw: str
    dev: str
    records: int = 0  # unique seqs checked
    duplicates: int = 0  # re-deliveries of a record already held
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
    late: int = 0  # accepted after their hole had been skipped (live mode)
    pending: int = 0  # held, waiting for a missing seq (live mode)
    checkpoints: int = 0
    bad_checkpoints: list[tuple[int, str]] = field(default_factory=list)
    keys_given: bool = False  # signatures checked (public keys given)
    signed: int = 0  # records authenticated by a verified checkpoint
    signed_through: int = 0  # highest seq a verified checkpoint covers
    unsigned: list[list[int]] = field(default_factory=list)  # cut off before a checkpoint
    unsigned_tail: list[int] | None = None  # after the last verified checkpoint

    @property
    def ok(self) -> bool:
        return not (
            self.bad_records
            or self.broken_links
            or self.conflicts
            or self.unexplained
            or self.bad_checkpoints
        )

    def summary(self) -> str:
        head = (
            f"{self.gw}/{self.dev}: {self.records} records, seq {self.first_seq}..{self.last_seq}"
        )
        parts = [head]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate deliveries (ignored)")
        if self.late:
            parts.append(f"{self.late} late arrivals (accepted)")
        if self.pending:
            parts.append(f"{self.pending} held waiting for missing seqs")
        if self.explained:
            n = sum(b - a + 1 for a, b in self.explained)
            parts.append(f"{n} records in explained gaps {_ranges(self.explained)}")
        if self.not_seen_before:
            parts.append(f"seq 1..{self.not_seen_before} not seen (subscribed after them)")
        if self.declared_lost:
            parts.append(f"{self.declared_lost} records declared lost before chaining")
        if self.events:
            parts.append("events " + ", ".join(f"{k}×{v}" for k, v in sorted(self.events.items())))
        if self.keys_given:
            if self.signed_through:
                parts.append(f"{self.signed} records signed through seq {self.signed_through}")
            else:
                parts.append("no verified checkpoint")
        elif self.checkpoints:
            parts.append(f"{self.checkpoints} checkpoints, signatures not checked (no public key)")
        lines = ["; ".join(parts)]
        for seq, why in self.bad_records:
            lines.append(f"  BAD RECORD seq {seq}: {why}")
        for seq, why in self.broken_links:
            lines.append(f"  BROKEN LINK at seq {seq}: {why}")
        for seq in self.conflicts:
            lines.append(f"  CONFLICT seq {seq}: two different records carry this seq")
        for a, b in self.unexplained:
            lines.append(f"  UNEXPLAINED GAP seq {a}..{b} ({b - a + 1} records missing)")
        for seq, why in self.bad_checkpoints:
            lines.append(f"  BAD CHECKPOINT seq {seq}: {why}")
        if self.keys_given:
            for a, b in self.unsigned:
                lines.append(f"  unsigned: seq {a}..{b} (no verified checkpoint reaches them)")
            if self.unsigned_tail:
                a, b = self.unsigned_tail
                lines.append(
                    f"  UNSIGNED TAIL: seq {a}..{b} ({b - a + 1} records after the last "
                    "verified checkpoint; hash-chained but not yet signed)"
                )
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


class _Stream:
    """Per-stream state. ``next`` is the seq awaited; None before the stream starts."""

    def __init__(self, gw: str, dev: str) -> None:
        self.rep = StreamReport(gw, dev)
        self.origin = f"{gw}/{dev}"
        self.buffer: dict[int, Record] = {}
        self.next: int | None = None
        self.start = 0  # first seq processed (0: none yet)
        self.resumed = 0  # seqs up to here were accepted by an earlier run
        self.last_sound: tuple[int, bytes] | None = None
        self.hashes: dict[int, tuple[Any, bool]] = {}  # seq -> (hash field, sound)
        self.covered: list[list[int]] = []  # seqs a $gap record explains
        self.missing: list[list[int]] = []  # holes skipped, in order
        self.run_start: int | None = None  # first seq of the linked, not yet signed run


class Consumer:
    """Verifying, de-duplicating, ordering subscriber; see the module docstring."""

    def __init__(
        self,
        public_keys: Sequence[VerifierKey] = (),
        *,
        max_buffer: int | None = 10_000,
        window: int = 100_000,
        resume: Mapping[tuple[str, str], tuple[int, bytes]] | None = None,
    ) -> None:
        self.keys = list(public_keys)
        self.max_buffer = max_buffer
        self.window = window
        self.malformed: list[str] = []
        self.announced: dict[str, dict[str, Any]] = {}  # status/key topic -> what it says
        self._streams: dict[tuple[str, str], _Stream] = {}
        for (gw, dev), (seq, digest) in (resume or {}).items():
            st = self._stream(gw, dev)
            st.next, st.start, st.resumed = seq + 1, seq + 1, seq
            st.last_sound = (seq, digest)

    # -- input ---------------------------------------------------------------------------
    def feed(self, topic: str, payload: bytes) -> list[Record]:
        """One MQTT message; returns the records it made ready, in seq order per stream.

        ``$status`` topics (``$status``, ``$status/key``) carry no records and
        are skipped; a published key is kept in
        ``announced`` (for display only: trust comes from ``public_keys``).
        """
        if topic.endswith("/$status") or "/$status/" in topic:
            if topic.endswith("/$status/key"):
                try:
                    self.announced[topic] = dict(json.loads(payload))
                except (ValueError, TypeError):
                    self.malformed.append(f"{topic}: key announcement is not a JSON object")
            return []
        try:
            records = decode_payload(payload)
        except ValueError as exc:
            self.malformed.append(f"{topic}: {exc}")
            return []
        out: list[Record] = []
        for r in records:
            out.extend(self.add(r, topic))
        return out

    def add(self, record: Mapping[str, Any], where: str = "record") -> list[Record]:
        """One decoded record; returns the records it made ready (see :meth:`feed`)."""
        try:
            gw, dev = record["gw"], record["dev"]
            seq = record["seq"]
            if not (isinstance(gw, str) and isinstance(dev, str) and type(seq) is int):
                raise TypeError
        except (KeyError, TypeError):
            self.malformed.append(f"{where}: record without gw/dev/seq: {dict(record)!r:.200}")
            return []
        st = self._stream(gw, dev)
        r = dict(record)
        if st.next is not None and seq < st.next:
            return self._behind(st, seq, r)
        held = st.buffer.get(seq)
        if held is None:
            st.buffer[seq] = r
            if r.get("tag") == EV_GAP and check_record(r) is None:
                st.covered.extend(_gap_ranges(r))  # may explain a hole before it arrives
        elif _same(held, r):
            st.rep.duplicates += 1
        else:
            # Two different copies of one seq: tampering or a forked chain,
            # whichever copy is sound. Keep the sound one for the link checks.
            st.rep.conflicts.append(seq)
            if check_record(held) is not None and check_record(r) is None:
                st.buffer[seq] = r
        if self.max_buffer is None:
            return []
        return self._drain(st, flushing=False)

    def flush(self) -> list[Record]:
        """Release everything held, skipping (and reporting) the holes before it."""
        out: list[Record] = []
        for st in self._streams.values():
            out.extend(self._drain(st, flushing=True))
        return out

    # -- results -------------------------------------------------------------------------
    def heads(self) -> dict[tuple[str, str], tuple[int, bytes]]:
        """(seq, hash) of the last sound record accepted per stream."""
        return {k: st.last_sound for k, st in self._streams.items() if st.last_sound}

    def report(self) -> Report:
        """The verdict so far (a ``max_buffer=None`` consumer is flushed first)."""
        if self.max_buffer is None:
            self.flush()
        return Report(
            [self._report(st) for _, st in sorted(self._streams.items())], list(self.malformed)
        )

    # -- internals -------------------------------------------------------------------------
    def _stream(self, gw: str, dev: str) -> _Stream:
        st = self._streams.get((gw, dev))
        if st is None:
            st = self._streams[(gw, dev)] = _Stream(gw, dev)
            st.rep.keys_given = bool(self.keys)
        return st

    def _drain(self, st: _Stream, *, flushing: bool) -> list[Record]:
        out: list[Record] = []
        buf = st.buffer
        if not buf:
            return out
        if st.next is None:
            # Start at seq 1 when held, else where this subscriber joined.
            st.next = 1 if 1 in buf else min(buf)
            st.start = st.next
        while buf:
            r = buf.pop(st.next, None)
            if r is not None:
                if self._process(st, r):
                    out.append(r)
                st.next += 1
                continue
            lo = min(buf)
            hole = [st.next, lo - 1]
            if flushing or len(buf) > (self.max_buffer or 0) or _inside(hole, st.covered):
                st.missing.append(hole)
                st.next = lo
                continue
            break
        return out

    def _process(self, st: _Stream, r: Record) -> bool:
        """Check the next record in seq order; True if it is accepted."""
        rep, seq = st.rep, r["seq"]
        rep.records += 1
        rep.first_seq = seq if not rep.first_seq else min(rep.first_seq, seq)
        rep.last_seq = max(rep.last_seq, seq)
        why = check_record(r)
        self._remember(st, seq, r.get("hash"), why is None)
        if why is not None:
            rep.bad_records.append((seq, why))
            self._close_run(st, seq - 1)
            st.last_sound = None
            return False
        linked = False
        if seq == 1:
            if r["prev"] != ZERO_HASH:
                rep.broken_links.append((1, "first record's prev is not 32 zero bytes"))
            else:
                linked = True
        elif st.last_sound is not None and st.last_sound[0] == seq - 1:
            if st.last_sound[1] != r["prev"]:
                rep.broken_links.append((seq, f"prev does not match the hash of seq {seq - 1}"))
            else:
                linked = True
        if not linked:
            self._close_run(st, seq - 1)
            st.run_start = seq
        elif st.run_start is None:
            st.run_start = seq
        st.last_sound = (seq, r["hash"])
        self._event(st, r)
        return True

    def _event(self, st: _Stream, r: Record, *, late: bool = False) -> None:
        tag = r["tag"]
        if not (isinstance(tag, str) and tag.startswith("$")):
            return
        rep = st.rep
        rep.events[tag] = rep.events.get(tag, 0) + 1
        if tag == EV_GAP and isinstance(r.get("info"), dict):
            ranges = _gap_ranges(r)
            st.covered.extend(ranges)
            if not ranges:
                rep.declared_lost += int(r["info"].get("count", 0))
        elif tag == EV_CHECKPOINT:
            self._checkpoint(st, r, anchor=not late)

    def _checkpoint(self, st: _Stream, c: Record, *, anchor: bool) -> None:
        rep, seq = st.rep, c["seq"]
        rep.checkpoints += 1
        info = c.get("info")
        note = info.get("note") if isinstance(info, dict) else None
        try:
            if not isinstance(note, str):
                raise NoteError("info.note is missing")
            text, _ = parse_note(note)
            origin, size, root = parse_checkpoint(text)
            if origin != st.origin:
                raise NoteError(f"origin {origin!r} is not this stream ({st.origin!r})")
            if size >= seq:
                raise NoteError(f"covers seq {size}, which is not before the checkpoint")
            if size == seq - 1 and c["prev"] != root:
                raise NoteError(f"signed hash of seq {size} is not the checkpoint's prev")
            known = st.hashes.get(size)
            if known is not None and known[1] and known[0] != root:
                raise NoteError(f"signed hash does not match record seq {size}")
            if not self.keys:
                return
            open_note(note, self.keys)
        except NoteError as exc:
            rep.bad_checkpoints.append((seq, str(exc)))
            return
        rep.signed_through = max(rep.signed_through, size)
        if anchor and st.run_start is not None and st.run_start <= size:
            # The signed hash commits to every linked record before it.
            rep.signed += size - st.run_start + 1
            if size == seq - 1:
                rep.signed += 1  # the checkpoint itself: its note is what is signed
                st.run_start = None
            else:
                st.run_start = size + 1

    def _close_run(self, st: _Stream, upto: int) -> None:
        if st.run_start is not None and st.run_start <= upto:
            st.rep.unsigned.append([st.run_start, upto])
        st.run_start = None

    def _remember(self, st: _Stream, seq: int, digest: Any, sound: bool) -> None:
        st.hashes[seq] = (digest, sound)
        if len(st.hashes) > self.window and self.max_buffer is not None:
            del st.hashes[next(iter(st.hashes))]  # oldest first (insertion order)

    def _behind(self, st: _Stream, seq: int, r: Record) -> list[Record]:
        """A record for a seq already passed: a re-delivery, a conflict, or late."""
        rep = st.rep
        known = st.hashes.get(seq)
        if known is not None:
            if r.get("hash") == known[0] and (check_record(r) is None) == known[1]:
                rep.duplicates += 1
            else:
                rep.conflicts.append(seq)
            return []
        if seq <= st.resumed or not _in_any(seq, st.missing, before=st.start):
            rep.duplicates += 1  # accepted before (resume) or beyond the window
            return []
        # Its hole was skipped (or it precedes where we joined): accept it now.
        if seq < st.start:
            if seq + 1 <= st.start - 1:
                st.missing.insert(0, [seq + 1, st.start - 1])
            st.start = seq
        why = check_record(r)
        self._remember(st, seq, r.get("hash"), why is None)
        rep.records += 1
        rep.first_seq = min(rep.first_seq, seq)
        st.missing = _subtract_all(st.missing, [seq, seq])
        if why is not None:
            rep.bad_records.append((seq, why))
            return []
        rep.late += 1
        prev = st.hashes.get(seq - 1)
        if prev is not None and prev[1] and prev[0] != r["prev"]:
            rep.broken_links.append((seq, f"prev does not match the hash of seq {seq - 1}"))
        self._event(st, r, late=True)
        return [r]

    def _report(self, st: _Stream) -> StreamReport:
        rep = st.rep
        out = StreamReport(**{k: getattr(rep, k) for k in rep.__dataclass_fields__})
        out.bad_records, out.broken_links = list(rep.bad_records), list(rep.broken_links)
        out.conflicts = sorted(set(rep.conflicts))
        out.bad_checkpoints, out.unsigned = list(rep.bad_checkpoints), list(rep.unsigned)
        out.events = dict(rep.events)
        out.pending = len(st.buffer)
        covered = merge_ranges(st.covered)
        out.explained, out.unexplained, out.not_seen_before = [], [], 0
        if st.start > 1 and st.start > st.resumed + 1:
            # Before the first seq seen: explained where a $gap says so, else the
            # subscriber simply was not there yet (not an error).
            lead = [st.resumed + 1, st.start - 1]
            rest = _subtract(lead, covered)
            out.not_seen_before = rest[-1][1] if rest else 0
            out.explained.extend(_intersect(lead, covered))
        for hole in st.missing:
            out.unexplained.extend(_subtract(hole, covered))
            out.explained.extend(_intersect(hole, covered))
        if st.run_start is not None and st.run_start <= rep.last_seq:
            out.unsigned_tail = [st.run_start, rep.last_seq]
        return out


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Byte-identical records (a re-delivery), judged on every field."""
    try:
        return a.get("hash") == b.get("hash") and canonical_bytes(a) == canonical_bytes(b)
    except (TypeError, ValueError):
        return False


def _gap_ranges(r: Mapping[str, Any]) -> list[list[int]]:
    info = r.get("info")
    ranges = info.get("ranges") if isinstance(info, dict) else None
    out: list[list[int]] = []
    for x in ranges or []:
        if isinstance(x, list | tuple) and len(x) == 2 and all(type(v) is int for v in x):
            out.append([x[0], x[1]])
    return out


def _inside(span: list[int], covered: list[list[int]]) -> bool:
    return not _subtract(span, merge_ranges(covered))


def _in_any(seq: int, ranges: list[list[int]], *, before: int) -> bool:
    return seq < before or any(a <= seq <= b for a, b in ranges)


def _intersect(span: list[int], covered: list[list[int]]) -> list[list[int]]:
    out = []
    for c0, c1 in covered:
        lo, hi = max(span[0], c0), min(span[1], c1)
        if lo <= hi:
            out.append([lo, hi])
    return out


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


def _subtract_all(spans: list[list[int]], cut: list[int]) -> list[list[int]]:
    return list(itertools.chain.from_iterable(_subtract(s, [cut]) for s in spans))


def _ranges(ranges: list[list[int]]) -> str:
    return ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in ranges)
