"""The record: its fields, canonical encoding and hash (specified in docs/records.md).

A record is a plain dict on the hot path (no model objects, no validation per
reading). Its canonical encoding is msgpack of the map with keys sorted by their
UTF-8 bytes; the hash is SHA-256 over the canonical encoding of every field but
``hash``. Events are records whose tag starts with ``$``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
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

REQUIRED_FIELDS: Final = ("v", "gw", "dev", "tag", "val", "unit", "q", "ts", "seq", "prev", "hash")
OPTIONAL_FIELDS: Final = ("status", "src_ts", "info")

Record = dict[str, Any]


def _sort_key(key: str) -> bytes:
    return key.encode()


# Key order per key layout: hot-path records share a handful of layouts, so the
# sort happens once per layout, not per record. (UTF-8 byte order equals code
# point order, but the explicit key keeps the rule visible.)
_ORDER: dict[tuple[str, ...], tuple[str, ...]] = {}


def _order(record: Mapping[str, Any]) -> tuple[str, ...]:
    layout = tuple(record)
    order = _ORDER.get(layout)
    if order is None:
        order = tuple(sorted((k for k in layout if k != "hash"), key=_sort_key))
        if len(_ORDER) < 1024:
            _ORDER[layout] = order
    return order


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    """Canonical msgpack encoding of ``fields`` (every top-level key except ``hash``)."""
    return msgpack.packb(_canonical_record(fields), use_bin_type=True)  # type: ignore[no-any-return]


def _canonical_record(fields: Mapping[str, Any]) -> dict[str, Any]:
    # Only the record's own ``hash`` field is left out; a nested key that
    # happens to be called "hash" (inside info) is content and is hashed.
    return {k: _canonical(fields[k]) for k in sorted(fields, key=_sort_key) if k != "hash"}


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

    def head(self, stream: str) -> tuple[int, bytes]:
        """(last seq, last hash) of ``stream``; (0, zero hash) before its first record."""
        return self._heads.get(stream, (0, ZERO_HASH))

    def seal(self, stream: str, record: Record) -> Record:
        """Give ``record`` the next seq of ``stream``, link it and hash it (in place)."""
        seq, prev = self._heads.get(stream, (0, ZERO_HASH))
        seq += 1
        record["seq"] = seq
        record["prev"] = prev
        # Readings are flat: their canonical map is built from a cached key
        # order. Events carry a nested info map and take the generic path.
        if "info" in record:
            canonical = _canonical_record(record)
        else:
            canonical = {k: record[k] for k in _order(record)}
        digest = hashlib.sha256(msgpack.packb(canonical, use_bin_type=True)).digest()
        record["hash"] = digest
        self._heads[stream] = (seq, digest)
        return record


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
