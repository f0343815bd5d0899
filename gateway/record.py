"""The record: its fields, canonical encoding and hash (specified in docs/records.md).

A record is a plain dict on the hot path (no model objects, no validation per
reading). Its canonical encoding is msgpack of the map with keys sorted by their
UTF-8 bytes; the hash is SHA-256 over the canonical encoding of every field but
``hash``. Events are records whose tag starts with ``$``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgpack

FORMAT_VERSION: Final = 1
ZERO_HASH: Final = bytes(32)
CONTENT_TYPE: Final = "application/vnd.gateway.records.v1+msgpack"

GOOD: Final = "good"
UNCERTAIN: Final = "uncertain"
BAD: Final = "bad"
QUALITIES: Final = frozenset({GOOD, UNCERTAIN, BAD})

# Event tags. An event is chained in its device's stream like any reading.
EV_START: Final = "$start"  # gateway (re)started acquiring this stream
EV_ONLINE: Final = "$online"  # device connected / answering again
EV_OFFLINE: Final = "$offline"  # device lost; val says why
EV_GAP: Final = "$gap"  # records lost or never recorded; info says which
EV_STOP: Final = "$stop"  # gateway stopped acquiring this stream (clean shutdown)
EV_CHECKPOINT: Final = "$checkpoint"  # signed stream head (docs/integrity.md)

REQUIRED_FIELDS: Final = ("v", "gw", "dev", "tag", "val", "unit", "q", "ts", "seq", "prev", "hash")
OPTIONAL_FIELDS: Final = ("status", "src_ts", "info")

Record = dict[str, Any]


def _sort_key(key: str) -> bytes:
    return key.encode()


# Per key layout (the tuple of a record's keys in insertion order): whether the
# dict is already in canonical key order. The normalizer builds readings in that
# order, so sealing packs them as they are; anything else takes the generic path.
_CANONICAL_LAYOUT: dict[tuple[str, ...], bool] = {}


def _is_canonical_layout(layout: tuple[str, ...]) -> bool:
    ok = _CANONICAL_LAYOUT.get(layout)
    if ok is None:
        ok = "hash" not in layout and list(layout) == sorted(layout, key=_sort_key)
        if len(_CANONICAL_LAYOUT) < 1024:
            _CANONICAL_LAYOUT[layout] = ok
    return ok


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    """Canonical msgpack encoding of ``fields`` (every top-level key except ``hash``)."""
    return _packer().pack(_canonical_record(fields))  # type: ignore[no-any-return]


_local = threading.local()


def _packer() -> msgpack.Packer:
    # A Packer per thread: msgpack.packb builds one per call, which costs as
    # much as the packing itself, and a Packer must not be shared by threads.
    p: msgpack.Packer | None = getattr(_local, "packer", None)
    if p is None:
        p = _local.packer = msgpack.Packer(use_bin_type=True)
    return p


def _canonical_record(fields: Mapping[str, Any]) -> dict[str, Any]:
    # Only the record's own ``hash`` field is left out; a nested key that
    # happens to be called "hash" (inside info) is content and is hashed.
    out: dict[str, Any] = {}
    for k in _order(fields):
        v = fields[k]
        out[k] = v if type(v) in _SCALARS else _canonical(v)
    return out


# Values that encode the same whatever their context: no key order to fix.
_SCALARS: Final = frozenset({str, int, float, bool, bytes, type(None)})
# Sorted keys (without ``hash``) per key layout: records share a handful of
# layouts, so verifying a stream sorts once per layout, not once per record.
_ORDER: dict[tuple[str, ...], tuple[str, ...]] = {}


def _order(fields: Mapping[str, Any]) -> tuple[str, ...]:
    layout = tuple(fields)
    order = _ORDER.get(layout)
    if order is None:
        order = tuple(sorted((k for k in layout if k != "hash"), key=_sort_key))
        if len(_ORDER) < 1024:
            _ORDER[layout] = order
    return order


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _canonical(value[k]) for k in sorted(value, key=_sort_key)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def record_hash(fields: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical encoding of every field but ``hash``."""
    return hashlib.sha256(canonical_bytes(fields)).digest()


class Chain:
    """Per-stream chain heads: assigns ``seq`` and ``prev`` and computes ``hash``.

    Sealing is synchronous so that, on one event loop, a stream's records are
    sealed in exactly the order they are handed to the outbox.
    """

    def __init__(self, heads: Mapping[str, tuple[int, bytes]] | None = None) -> None:
        self._heads: dict[str, tuple[int, bytes]] = dict(heads or {})
        # One packer per chain: msgpack.packb builds a Packer per call, which
        # costs as much as the packing itself. (Used from one thread only.)
        self._packer = msgpack.Packer(use_bin_type=True)

    def head(self, stream: str) -> tuple[int, bytes]:
        """(last seq, last hash) of ``stream``; (0, zero hash) before its first record."""
        return self._heads.get(stream, (0, ZERO_HASH))

    def seal(self, stream: str, record: Record) -> Record:
        """Give ``record`` the next seq of ``stream``, link it and hash it (in place)."""
        self.seal_payload(stream, [record])
        return record

    def seal_payload(self, stream: str, records: list[Record], *, canonical: bool = False) -> bytes:
        """Seal ``records`` in order (seq, prev, hash, in place); return their payload.

        The payload is the msgpack array of the sealed records. Each record is
        packed once: its canonical bytes are hashed, and the same bytes, with
        the ``hash`` entry spliced in front, become its element of the array.
        ``canonical=True`` promises flat records whose keys are already in
        canonical order with ``seq`` and ``prev`` present (what the normalizer
        builds): they are packed as they are, unchecked.
        """
        seq, prev = self._heads.get(stream, (0, ZERO_HASH))
        pack, sha256 = self._packer.pack, hashlib.sha256
        n = len(records)
        parts: list[bytes] = [_array_header(n)]
        append = parts.append
        for r in records:
            seq += 1
            r["seq"] = seq
            r["prev"] = prev
            if canonical or ("info" not in r and _is_canonical_layout(tuple(r))):
                body: bytes = pack(r)
            else:
                body = pack(_canonical_record(r))
            prev = sha256(body).digest()
            r["hash"] = prev
            size = body[0] - 0x80  # a fixmap: at most 15 entries
            if 0 <= size < 15:
                append(_WITH_HASH[size])
                append(prev)
                append(body[1:])
            else:  # never for a record of the documented fields; kept correct anyway
                append(pack(r))
        self._heads[stream] = (seq, prev)
        return b"".join(parts)


# Map header for (n + 1) entries followed by the key "hash" and a 32-byte bin
# header: the prefix of a record's payload element whose canonical body has n.
_WITH_HASH: Final = tuple(bytes((0x81 + n,)) + b"\xa4hash\xc4\x20" for n in range(15))


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 + n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def merge_ranges(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    """Union of inclusive [first, last] seq ranges (a ``$gap``'s ``info.ranges``), sorted,
    adjacent ones joined."""
    out: list[list[int]] = []
    for first, last in sorted((int(a), int(b)) for a, b in ranges):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


def encode_payload(records: list[Record]) -> bytes:
    """One MQTT payload: a msgpack array of records (each with its hash)."""
    return msgpack.packb(records, use_bin_type=True)  # type: ignore[no-any-return]


def decode_payload(payload: bytes) -> list[Record]:
    """Decode a data-topic payload; raises ValueError on anything but an array of maps."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"payload is not valid msgpack: {exc}") from exc
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise ValueError("payload is not a msgpack array of maps")
    return obj


def check_record(record: Mapping[str, Any]) -> str | None:
    """Why ``record`` is malformed or its hash wrong, or None if it is sound."""
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    extra = set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
    if extra:
        return f"unknown field(s) {', '.join(sorted(extra))}"
    if not isinstance(record["hash"], bytes) or len(record["hash"]) != 32:
        return "hash is not 32 bytes"
    if not isinstance(record["prev"], bytes) or len(record["prev"]) != 32:
        return "prev is not 32 bytes"
    if record_hash(record) != record["hash"]:
        return "hash does not match the record's content"
    return None
