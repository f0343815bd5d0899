"""Records -> Sparkplug B payloads (protobuf, the Eclipse Tahu ``sparkplug_b.proto``).

Pure conversion, no MQTT: metric datatypes, values, the properties that carry a
record's integrity fields, and the NBIRTH/DBIRTH/DDATA/DDEATH/NDEATH payloads.
Specified in docs/sparkplug.md.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from gateway.record import BAD, GOOD, UNCERTAIN, Record
from gateway.sparkplug import sparkplug_b_pb2 as pb

NAMESPACE: Final = "spBv1.0"
REBIRTH: Final = "Node Control/Rebirth"
BDSEQ: Final = "bdSeq"
GATEWAY_ID: Final = "Gateway/Id"
RECORD_FORMAT: Final = "Gateway/Record format"
EVENT_PREFIX: Final = "Events/"  # "$offline" is the metric "Events/offline"

# Sparkplug datatypes (DataType enum of sparkplug_b.proto)
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12

# Quality as Ignition carries it: a metric property "Quality" (Int32) holding the
# OPC DA quality code.
QUALITY_CODE: Final = {GOOD: 192, UNCERTAIN: 64, BAD: 0}
QUALITY_OF_CODE: Final = {v: k for k, v in QUALITY_CODE.items()}

# Our record fields as metric properties (see docs/sparkplug.md).
P_QUALITY: Final = "Quality"
P_UNIT: Final = "engUnit"  # DBIRTH; and DDATA when a record's unit differs
P_SEQ: Final = "gw.seq"
P_HASH: Final = "gw.hash"
P_PREV: Final = "gw.prev"
P_TS: Final = "gw.ts"
P_STATUS: Final = "gw.status"
P_SRC_TS: Final = "gw.src_ts"
P_INFO: Final = "gw.info"

# Tag config data_type (drivers that declare one, e.g. Modbus) -> Sparkplug datatype.
CONFIG_TYPES: Final = {
    "int16": INT16,
    "uint16": UINT16,
    "int32": INT32,
    "uint32": UINT32,
    "int64": INT64,
    "uint64": UINT64,
    "float32": FLOAT,
    "float64": DOUBLE,
    "bit": BOOLEAN,
    "bool": BOOLEAN,
    "string": STRING,
}

_INT_RANGES: Final = {
    INT8: (-(1 << 7), 1 << 7),
    INT16: (-(1 << 15), 1 << 15),
    INT32: (-(1 << 31), 1 << 31),
    INT64: (-(1 << 63), 1 << 63),
    UINT8: (0, 1 << 8),
    UINT16: (0, 1 << 16),
    UINT32: (0, 1 << 32),
    UINT64: (0, 1 << 64),
}
_F32 = struct.Struct("<f")


def metric_name(tag: str) -> str:
    """The metric a record's tag is published as (events get a readable name)."""
    return EVENT_PREFIX + tag[1:] if tag.startswith("$") else tag


def tag_of(name: str) -> str:
    """Inverse of :func:`metric_name`."""
    return "$" + name[len(EVENT_PREFIX) :] if name.startswith(EVENT_PREFIX) else name


def infer_datatype(val: Any) -> int:
    """Datatype for a value when the tag config gives none."""
    if isinstance(val, bool):
        return BOOLEAN
    if isinstance(val, int):
        return INT64 if -(1 << 63) <= val < (1 << 63) else UINT64
    if isinstance(val, float):
        return DOUBLE
    return STRING


def config_datatype(tag: Any) -> int | None:
    """Datatype from a tag config, when the driver declares one and no scaling changes it."""
    dt = CONFIG_TYPES.get(str(getattr(tag, "data_type", "")))
    if dt is None:
        return None
    if dt not in (BOOLEAN, STRING) and (tag.scale != 1.0 or tag.offset != 0.0):
        return DOUBLE  # scaled values are float64 whatever the register held
    return dt


def fits(datatype: int, val: Any) -> bool:
    """Can ``val`` travel in a metric of ``datatype`` and come back identical (type too)?"""
    if datatype == DOUBLE:
        return type(val) is float
    if datatype == FLOAT:
        if type(val) is not float:
            return False
        if math.isnan(val) or math.isinf(val):
            return True
        try:
            return bool(_F32.unpack(_F32.pack(val))[0] == val)
        except OverflowError:
            return False
    if datatype == BOOLEAN:
        return type(val) is bool
    if datatype == STRING:
        return type(val) is str
    rng = _INT_RANGES.get(datatype)
    return rng is not None and type(val) is int and rng[0] <= val < rng[1]


def _set_value(m: Any, datatype: int, val: Any) -> None:
    if datatype == DOUBLE:
        m.double_value = val
    elif datatype == FLOAT:
        m.float_value = val
    elif datatype == BOOLEAN:
        m.boolean_value = val
    elif datatype == STRING:
        m.string_value = val
    elif datatype in (INT64, UINT64):
        m.long_value = val & 0xFFFF_FFFF_FFFF_FFFF  # two's complement, per Sparkplug
    else:
        m.int_value = val & 0xFFFF_FFFF


def _prop(props: Any, key: str, val: Any) -> None:
    props.keys.append(key)
    v = props.values.add()
    if isinstance(val, bool):
        v.type = BOOLEAN
        v.boolean_value = val
    elif isinstance(val, int):
        if 0 <= val < (1 << 64):
            v.type = UINT64
            v.long_value = val
        else:
            v.type = INT64
            v.long_value = val & 0xFFFF_FFFF_FFFF_FFFF
    elif isinstance(val, float):
        v.type = DOUBLE
        v.double_value = val
    else:
        v.type = STRING
        v.string_value = str(val)


def encode_info(info: Any) -> str:
    """``info`` (events) exactly, types included: base64 of its msgpack encoding."""
    return base64.b64encode(msgpack.packb(info, use_bin_type=True)).decode()


def decode_info(text: str) -> Any:
    return msgpack.unpackb(base64.b64decode(text), raw=False)


@dataclass(slots=True)
class Metric:
    """One metric of a device: a configured tag or an event."""

    name: str
    alias: int
    datatype: int
    unit: str = ""
    declared: bool = False  # datatype from the tag config (kept unless a value cannot fit)
    last: tuple[Any, str, int] | None = None  # (val, q, ts ns) last published


@dataclass(slots=True)
class DeviceModel:
    """What a device's DBIRTH announces, and what its DDATA refers to by alias."""

    id: str
    metrics: dict[str, Metric] = field(default_factory=dict)  # by record tag


def _timestamp_ms(ts_ns: int) -> int:
    return ts_ns // 1_000_000


def _birth_metric(p: Any, metric: Metric, ts_ms: int) -> None:
    m = p.metrics.add()
    m.name = metric.name
    m.alias = metric.alias
    m.datatype = metric.datatype
    props = m.properties
    if metric.unit:
        _prop(props, P_UNIT, metric.unit)
    last = metric.last
    if last is None or last[0] is None:
        m.timestamp = ts_ms if last is None else _timestamp_ms(last[2])
        m.is_null = True
        if last is not None:
            _prop(props, P_QUALITY, QUALITY_CODE[last[1]])
        return
    val, q, ts = last
    m.timestamp = _timestamp_ms(ts)
    _set_value(m, metric.datatype, val)
    _prop(props, P_QUALITY, QUALITY_CODE[q])


def nbirth(
    gateway_id: str, bdseq: int, ts_ms: int, record_format: int, node: Iterable[Metric] = ()
) -> bytes:
    """NBIRTH: seq 0, bdSeq, Node Control/Rebirth = false, the gateway id, ``node`` metrics."""
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = 0
    for name, datatype, val in (
        (BDSEQ, INT64, bdseq),
        (REBIRTH, BOOLEAN, False),
        (GATEWAY_ID, STRING, gateway_id),
        (RECORD_FORMAT, INT32, record_format),
    ):
        m = p.metrics.add()
        m.name = name
        m.timestamp = ts_ms
        m.datatype = datatype
        _set_value(m, datatype, val)
    for metric in node:
        _birth_metric(p, metric, ts_ms)
    return bytes(p.SerializeToString())


def ndeath(bdseq: int, ts_ms: int) -> bytes:
    """NDEATH (the MQTT Will): the bdSeq metric only, no seq."""
    p = pb.Payload()
    p.timestamp = ts_ms
    m = p.metrics.add()
    m.name = BDSEQ
    m.timestamp = ts_ms
    m.datatype = INT64
    m.long_value = bdseq
    return bytes(p.SerializeToString())


def dbirth(device: DeviceModel, seq: int, ts_ms: int) -> bytes:
    """DBIRTH: every metric with name, alias, datatype, unit and last value (or is_null)."""
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = seq
    for metric in device.metrics.values():
        _birth_metric(p, metric, ts_ms)
    return bytes(p.SerializeToString())


def records_payload(device: DeviceModel, records: Iterable[Record], seq: int, ts_ms: int) -> bytes:
    """DDATA (or DDEATH) carrying records: one metric per record, by alias.

    Every metric referenced must be in ``device.metrics`` with a datatype its
    value fits (the caller rebirths the device otherwise).
    """
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = seq
    metrics = device.metrics
    for r in records:
        metric = metrics[r["tag"]]
        m = p.metrics.add()
        m.alias = metric.alias
        ts = r["ts"]
        m.timestamp = ts // 1_000_000
        m.datatype = metric.datatype
        val = r["val"]
        q = r["q"]
        if val is None:
            m.is_null = True
        else:
            _set_value(m, metric.datatype, val)
        props = m.properties
        keys = props.keys
        values = props.values
        keys.append(P_QUALITY)
        v = values.add()
        v.type = INT32
        v.int_value = QUALITY_CODE[q]
        keys.append(P_SEQ)
        v = values.add()
        v.type = UINT64
        v.long_value = r["seq"]
        keys.append(P_TS)
        v = values.add()
        v.type = UINT64
        v.long_value = ts
        keys.append(P_HASH)
        v = values.add()
        v.type = STRING
        v.string_value = r["hash"].hex()
        keys.append(P_PREV)
        v = values.add()
        v.type = STRING
        v.string_value = r["prev"].hex()
        if r["unit"] != metric.unit:
            _prop(props, P_UNIT, r["unit"])
        if "status" in r:
            _prop(props, P_STATUS, r["status"])
        if "src_ts" in r:
            _prop(props, P_SRC_TS, r["src_ts"])
        if "info" in r:
            _prop(props, P_INFO, encode_info(r["info"]))
        metric.last = (val, q, ts)
    return bytes(p.SerializeToString())


def rebirth_requested(payload: bytes) -> bool:
    """Whether an NCMD payload asks for a rebirth (metric 'Node Control/Rebirth' = true)."""
    p = pb.Payload.FromString(payload)
    return any(m.name == REBIRTH and m.boolean_value for m in p.metrics)
