"""Verification of a whole set of records (`gateway verify`), and the JSON lines.

The checks live in :mod:`gateway.consumer`; ``Verifier`` feeds it records in
any order, duplicates included (delivery is at-least-once), and ``report()``
names each record that fails and why. Missing seqs are *explained* when a
``$gap`` record of the same stream lists them; otherwise they are a break. A
subscriber that joined late simply starts at the first seq it saw.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.consumer import Consumer, Report, StreamReport
from gateway.record import Record, decode_payload
from gateway.signing import VerifierKey

__all__ = ["Report", "StreamReport", "Verifier", "record_from_json", "record_to_json"]


class Verifier:
    """A whole set of records checked at once: a :class:`Consumer` that holds
    everything until :meth:`report` (records may come in any order)."""

    def __init__(self, public_keys: Sequence[VerifierKey] = ()) -> None:
        self.consumer = Consumer(public_keys, max_buffer=None)

    @property
    def malformed(self) -> list[str]:
        return self.consumer.malformed

    def add_payload(self, payload: bytes, where: str = "payload") -> None:
        try:
            records = decode_payload(payload)
        except ValueError as exc:
            self.malformed.append(f"{where}: {exc}")
            return
        for r in records:
            self.consumer.add(r, where)

    def add(self, record: Mapping[str, Any], where: str = "record") -> None:
        self.consumer.add(record, where)

    def report(self) -> Report:
        return self.consumer.report()


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
