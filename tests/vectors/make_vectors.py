"""Generate tests/vectors/records.json: record test vectors (see docs/records.md).

Run ``python tests/vectors/make_vectors.py`` to rewrite the JSON next to this file.

The expected canonical bytes and hashes are computed by the small canonical
msgpack encoder below, written from docs/records.md alone. It deliberately
imports neither ``gateway`` nor ``msgpack`` (standard library only), so that the
tests compare gateway/record.py against an independent implementation. If the
two disagree, the disagreement is a finding: never edit a vector to make the
gateway pass.

JSON conventions of the file (for readers in other languages):

* ``fields`` holds every field of the record except ``hash``. JSON cannot tell
  bytes from strings nor floats from integers, so each vector lists
  ``bytes_fields`` (hex strings in ``fields`` that are msgpack bin) and
  ``float_fields`` (numbers that are float64 even when integral, e.g. ``0.0``).
  Paths are dotted (``info.ratio``); every other number is an integer.
* Integers may exceed 2**53 (``ts`` always does): parse them as 64-bit.
* ``canonical`` is the canonical encoding (hex), ``hash`` its SHA-256 (hex).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("records.json")
ZERO = bytes(32)


# -- the independent canonical encoder (docs/records.md, "Canonical encoding") --
def enc(value: Any) -> bytes:
    """Canonical msgpack of one value: explicit format-byte logic, no library."""
    if value is None:
        return b"\xc0"
    if value is False:
        return b"\xc2"
    if value is True:
        return b"\xc3"
    if isinstance(value, int):
        return _enc_int(value)
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        return _enc_str(value.encode("utf-8"))
    if isinstance(value, bytes):
        return _enc_bin(value)
    if isinstance(value, list):
        return _head(len(value), 0x90, 15, b"\xdc", b"\xdd") + b"".join(enc(v) for v in value)
    if isinstance(value, dict):
        return enc_map(value)
    raise TypeError(f"no canonical encoding for {type(value).__name__}")


def _enc_int(n: int) -> bytes:
    if n >= 0:  # non-negative integers always use the unsigned formats
        if n <= 0x7F:
            return bytes([n])  # positive fixint 0x00..0x7f
        if n <= 0xFF:
            return b"\xcc" + struct.pack(">B", n)  # uint8
        if n <= 0xFFFF:
            return b"\xcd" + struct.pack(">H", n)  # uint16
        if n <= 0xFFFF_FFFF:
            return b"\xce" + struct.pack(">I", n)  # uint32
        if n <= 0xFFFF_FFFF_FFFF_FFFF:
            return b"\xcf" + struct.pack(">Q", n)  # uint64
        raise OverflowError(f"{n} does not fit in uint64")
    if n >= -32:
        return struct.pack(">b", n)  # negative fixint 0xe0..0xff
    if n >= -(2**7):
        return b"\xd0" + struct.pack(">b", n)  # int8
    if n >= -(2**15):
        return b"\xd1" + struct.pack(">h", n)  # int16
    if n >= -(2**31):
        return b"\xd2" + struct.pack(">i", n)  # int32
    if n >= -(2**63):
        return b"\xd3" + struct.pack(">q", n)  # int64
    raise OverflowError(f"{n} does not fit in int64")


def _enc_str(raw: bytes) -> bytes:
    n = len(raw)
    if n <= 31:
        return bytes([0xA0 | n]) + raw  # fixstr
    if n <= 0xFF:
        return b"\xd9" + struct.pack(">B", n) + raw  # str8
    if n <= 0xFFFF:
        return b"\xda" + struct.pack(">H", n) + raw  # str16
    return b"\xdb" + struct.pack(">I", n) + raw  # str32


def _enc_bin(raw: bytes) -> bytes:
    n = len(raw)
    if n <= 0xFF:
        return b"\xc4" + struct.pack(">B", n) + raw  # bin8
    if n <= 0xFFFF:
        return b"\xc5" + struct.pack(">H", n) + raw  # bin16
    return b"\xc6" + struct.pack(">I", n) + raw  # bin32


def _head(n: int, fix: int, fix_max: int, h16: bytes, h32: bytes) -> bytes:
    if n <= fix_max:
        return bytes([fix | n])
    if n <= 0xFFFF:
        return h16 + struct.pack(">H", n)
    return h32 + struct.pack(">I", n)


def enc_map(m: dict[str, Any]) -> bytes:
    """A map with its keys sorted by their UTF-8 bytes (nested maps too)."""
    keys = sorted(m, key=lambda k: k.encode("utf-8"))
    body = b"".join(_enc_str(k.encode("utf-8")) + enc(m[k]) for k in keys)
    return _head(len(keys), 0x80, 15, b"\xde", b"\xdf") + body


def canonical(fields: dict[str, Any]) -> bytes:
    """The record's canonical encoding: every top-level field except ``hash``."""
    return enc_map({k: v for k, v in fields.items() if k != "hash"})


# -- the vectors ------------------------------------------------------------------
GW = "gw-01"
DEV = "bioreactor-1"
TS = 1_718_000_000_123_456_789  # 2024-06-10T06:13:20.123456789Z, ns
PREV = hashlib.sha256(b"an earlier record").digest()  # a stand-in prev for lone records


def reading(tag: str, val: Any, unit: str = "", *, seq: int = 42, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "gw": GW,
        "dev": DEV,
        "tag": tag,
        "val": val,
        "unit": unit,
        "q": "good",
        "ts": TS,
        "seq": seq,
        "prev": PREV,
    }
    fields.update(extra)
    return fields


GAP_REASON_OLDEST = (
    "outbox quota of 1073741824 bytes reached (policy drop_oldest): "
    "oldest unpublished records deleted"
)
GAP_REASON_NEWEST = (
    "outbox quota of 1073741824 bytes reached (policy drop_newest): "
    "records refused before they were chained"
)

LONE: list[tuple[str, str, dict[str, Any]]] = [
    (
        "float_reading",
        "plain float64 reading, first record of its stream (the worked example of docs/records.md)",
        reading("temperature", 36.95, "Cel", seq=1, prev=ZERO),
    ),
    ("int_fixint", "positive fixint (0..127)", reading("agitation", 120, "/min")),
    ("int_uint8", "uint8 0xcc (128..255)", reading("agitation", 200, "/min")),
    ("int_uint16", "uint16 0xcd (256..65535)", reading("counter", 50_000)),
    ("int_uint32", "uint32 0xce, above int32 max", reading("counter", 3_000_000_000)),
    ("int_uint64", "uint64 0xcf, the largest value", reading("counter", 2**64 - 1)),
    ("int_neg_fixint", "negative fixint (-32..-1)", reading("offset", -5)),
    ("int_int8", "int8 0xd0 (-128..-33)", reading("offset", -100)),
    ("int_int16", "int16 0xd1 (-32768..-129)", reading("offset", -1_000)),
    ("int_int32", "int32 0xd2 (-2**31..-32769)", reading("offset", -100_000)),
    ("int_int64", "int64 0xd3 (below -2**31)", reading("offset", -5_000_000_000)),
    ("bool_reading", "bool true (0xc3)", reading("pump_running", True)),
    (
        "str_val_utf8",
        "string value with non-ASCII UTF-8 (2- and 3-byte sequences)",
        reading("phase", "Zulauf läuft – Zellzahl Ø"),
    ),
    (
        "unit_utf8",
        "unit with a non-ASCII character (U+00B5 MICRO SIGN, 2 bytes in UTF-8)",
        reading("conductivity", 1520.5, "µS/cm"),
    ),
    (
        "bad_int_status",
        "q bad, val nil, Modbus exception code as an int status",
        reading("pH", None, "[pH]", q="bad", status=2),
    ),
    (
        "bad_str_status",
        "q bad, val nil, a str status",
        reading("pH", None, "[pH]", q="bad", status="timeout"),
    ),
    (
        "src_ts_and_status",
        "uncertain reading with the device's timestamp and an OPC UA StatusCode (uint32): "
        "src_ts sorts before status",
        reading(
            "DO",
            41.25,
            "%",
            q="uncertain",
            status=0x40920000,
            src_ts=TS - 250_000_000,
        ),
    ),
    (
        "str16_status",
        "a 300-byte status string (str16, 0xda)",
        reading("pH", None, "[pH]", q="bad", status="decode error: " + "x" * 286),
    ),
    ("float_zero", "float 0.0 stays float64 (never int 0)", reading("glucose", 0.0, "g/L")),
    ("float_neg_zero", "float -0.0 (sign bit kept)", reading("glucose", -0.0, "g/L")),
    ("float_integral", "integral float 37.0 stays float64", reading("temperature", 37.0, "Cel")),
    (
        "float32_widened",
        "a float32 register value widened exactly to float64 (20.9f)",
        reading("temperature", struct.unpack(">f", struct.pack(">f", 20.9))[0], "Cel"),
    ),
    ("float_large", "float 1e300", reading("counter", 1e300)),
    (
        "event_start",
        "$start event with a nested info map (int and bool, keys sorted)",
        reading(
            "$start",
            "acquisition started; previous shutdown unclean (crash, kill or power loss)",
            seq=1_001,
            info={"previous_seq": 1_000, "clean_shutdown": False},
        ),
    ),
    (
        "event_offline",
        "$offline event: q bad, the reason in val, no info",
        reading("$offline", "no connection within 10 s", seq=1_002, q="bad"),
    ),
    (
        "gap_drop_oldest",
        "$gap after drop_oldest: info.ranges lists the deleted seqs",
        reading(
            "$gap",
            "6 record(s) lost: " + GAP_REASON_OLDEST,
            seq=13,
            q="bad",
            info={
                "reason": GAP_REASON_OLDEST,
                "count": 6,
                "from_ts": TS - 60_000_000_000,
                "to_ts": TS - 30_000_000_000,
                "ranges": [[5, 9], [12, 12]],
            },
        ),
    ),
    (
        "gap_drop_newest",
        "$gap after drop_newest: empty ranges, records refused before they got a seq",
        reading(
            "$gap",
            "40 record(s) lost: " + GAP_REASON_NEWEST,
            seq=14,
            q="bad",
            info={
                "reason": GAP_REASON_NEWEST,
                "count": 40,
                "from_ts": TS - 20_000_000_000,
                "to_ts": TS - 1_000_000_000,
                "ranges": [],
            },
        ),
    ),
    (
        "info_key_named_hash",
        "only the top-level hash field is left out: an info key named 'hash' is hashed",
        reading(
            "$start",
            "acquisition started",
            seq=1,
            prev=ZERO,
            info={"hash": "abc", "previous_seq": 0},
        ),
    ),
]

CHAIN = [
    reading("pH", 7.02, "[pH]", ts=TS),
    reading("DO", 41.5, "%", ts=TS),
    reading("pH", 7.01, "[pH]", ts=TS + 5_000_000_000),
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _paths(value: Any, kind: type, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, kind, f"{prefix}{k}.")
    elif isinstance(value, kind) and not isinstance(value, bool):
        out.append(prefix[:-1])
    return out


def vector(name: str, description: str, fields: dict[str, Any]) -> dict[str, Any]:
    raw = canonical(fields)
    return {
        "name": name,
        "description": description,
        "fields": _jsonable(fields),
        "bytes_fields": _paths(fields, bytes),
        "float_fields": _paths(fields, float),
        "canonical": raw.hex(),
        "hash": hashlib.sha256(raw).hexdigest(),
    }


def build() -> dict[str, Any]:
    vectors = [vector(n, d, f) for n, d, f in LONE]
    prev, names = ZERO, []
    for i, fields in enumerate(CHAIN, 1):
        fields.update(seq=i, prev=prev)
        v = vector(f"chain_{i}", f"record {i} of a 3-record chain", fields)
        prev = bytes.fromhex(v["hash"])
        vectors.append(v)
        names.append(v["name"])
    return {
        "description": "Test vectors for the gateway record format v1 (docs/records.md). "
        "Generated by tests/vectors/make_vectors.py with an independent encoder; "
        "do not edit by hand.",
        "conventions": [
            "fields: every field except hash; bytes_fields are hex strings that are msgpack "
            "bin; float_fields are float64 even when integral; other numbers are integers "
            "(up to 64 bits)",
            "canonical: the canonical encoding as hex; hash: its SHA-256 as hex",
        ],
        "vectors": vectors,
        "chains": [
            {
                "name": "three_records",
                "gw": GW,
                "dev": DEV,
                "description": "seq 1..3 of one stream, sealed in this order; prev of seq 1 "
                "is 32 zero bytes, prev of seq n is the hash of seq n-1",
                "vectors": names,
            }
        ],
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
