"""Sparkplug B output, end to end, decoded by an independent implementation (pysparkplug).

A real gateway process (Modbus off-gas simulator -> gateway in sparkplug mode ->
real Mosquitto) and a subscriber on ``spBv1.0/#``. pysparkplug decodes the
births, data and deaths (names, aliases, datatypes, values, timestamps, seq); it
does not model metric properties, so those are read with its own compiled Tahu
schema (``pysparkplug._protobuf``), not with the gateway's. From them every
record is rebuilt and its hash recomputed: the Sparkplug output carries the
same records as the records mode, bit for bit, and their chain verifies.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pysparkplug as spb
import pytest
from pysparkplug import _protobuf as spb_pb

from gateway.config import BrokerSection, load_config
from gateway.mqtt import AsyncMqtt, MqttError
from gateway.record import record_hash
from gateway.sparkplug.codec import decode_info
from gateway.sparkplug.publisher import _take_bdseq
from gateway.subscribe import subscribe
from gateway.verify import Verifier
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.gateway import OFFGAS_TAGS, Device, GatewaySpec, kill, running, spawn

GROUP = "pharma"
QUALITY = {192: "good", 64: "uncertain", 0: "bad"}
_ids = itertools.count()


class SpbCapture:
    """Every message on spBv1.0/# in arrival order (one connection: publish order)."""

    def __init__(self, port: int) -> None:
        self.mqtt = AsyncMqtt(BrokerSection(host="127.0.0.1", port=port), f"spb-test-{next(_ids)}")
        self.messages: list[tuple[str, bytes]] = []
        self.mqtt.on_message = lambda msg: self.messages.append((msg.topic, bytes(msg.payload)))

    async def __aenter__(self) -> SpbCapture:
        await self.mqtt.connect()
        await self.mqtt.subscribe("spBv1.0/#")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.mqtt.disconnect()
        self.mqtt.close()

    def of(self, kind: str) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in self.messages if t.split("/")[2] == kind]

    async def wait_for(self, pred: Callable[[], Any], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                kinds = [t for t, _ in self.messages[-5:]]
                raise AssertionError(f"timed out waiting for {what}; last: {kinds}")
            await asyncio.sleep(0.05)


def sparkplug_config(spec: GatewaySpec) -> Path:
    path = spec.write()
    text = path.read_text().replace("[broker]\n", '[broker]\noutput = "sparkplug"\n', 1)
    path.write_text(text + f'\n[sparkplug]\ngroup_id = "{GROUP}"\n')
    return path


def props(metric: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in zip(metric.properties.keys, metric.properties.values, strict=True):
        field = v.WhichOneof("value")
        val = getattr(v, field)
        if v.type == 4 and val >= 1 << 63:  # Int64, two's complement
            val -= 1 << 64
        out[key] = val
    return out


def rebuild(
    gw: str, dev: str, name: str, value: Any, p: dict[str, Any], unit: str
) -> dict[str, Any]:
    """A record from a Sparkplug metric: the fields our hash covers."""
    tag = "$" + name.removeprefix("Events/") if name.startswith("Events/") else name
    r: dict[str, Any] = {
        "v": 1,
        "gw": gw,
        "dev": dev,
        "tag": tag,
        "val": value,
        "unit": p.get("engUnit", unit),
        "q": QUALITY[p["Quality"]],
        "ts": p["gw.ts"],
        "seq": p["gw.seq"],
        "prev": bytes.fromhex(p["gw.prev"]),
        "hash": bytes.fromhex(p["gw.hash"]),
    }
    for key, field in (("gw.status", "status"), ("gw.src_ts", "src_ts")):
        if key in p:
            r[field] = p[key]
    if "gw.info" in p:
        r["info"] = decode_info(p["gw.info"])
    return r


@pytest.fixture
async def sim() -> AsyncIterator[OffGasSimulator]:
    s = OffGasSimulator(unit_ids=(1,), time_scale=3600, update_interval=0.05)
    await s.start()
    yield s
    await s.stop()


async def test_births_data_rebirth_and_will_decode_independently(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    gw_id = f"gw-spb-{next(_ids)}"
    spec = GatewaySpec(
        tmp_path / "state",
        broker.port,
        [Device("offgas-1", sim.port, 1, poll_interval=0.1, tags=OFFGAS_TAGS)],
        gateway_id=gw_id,
    )
    config = sparkplug_config(spec)
    node = f"spBv1.0/{GROUP}/{{}}/{gw_id}"
    async with SpbCapture(broker.port) as cap:
        proc = spawn(config, tmp_path / "gw1.log")
        try:
            await cap.wait_for(lambda: len(cap.of("DDATA")) >= 10, "10 DDATA")
            # Rebirth, requested the way a host application does, encoded by pysparkplug.
            ncmd = spb.NCmd(
                timestamp=spb.get_current_timestamp(),
                metrics=(
                    spb.Metric(
                        timestamp=spb.get_current_timestamp(),
                        name="Node Control/Rebirth",
                        datatype=spb.DataType.BOOLEAN,
                        value=True,
                    ),
                ),
            )
            cap.mqtt.publish(node.format("NCMD"), ncmd.encode(include_dtypes=True))
            await cap.wait_for(lambda: len(cap.of("NBIRTH")) == 2, "the rebirth NBIRTH")
            await cap.wait_for(lambda: len(cap.of("DBIRTH")) == 2, "the rebirth DBIRTH")
            n_before = len(cap.of("DDATA"))
            await cap.wait_for(lambda: len(cap.of("DDATA")) >= n_before + 3, "data after it")
        finally:
            assert kill(proc, signal.SIGKILL) == -signal.SIGKILL
        await cap.wait_for(lambda: cap.of("NDEATH"), "the NDEATH Will after SIGKILL")
        first_run = list(cap.messages)

        # Restart: bdSeq moves on (persisted), a clean stop sends the NDEATH itself.
        proc = spawn(config, tmp_path / "gw2.log")
        try:
            await cap.wait_for(lambda: len(cap.of("NBIRTH")) == 3, "the second process's NBIRTH")
            await cap.wait_for(lambda: cap.messages[-1][0].split("/")[2] == "DDATA", "data")
        finally:
            assert kill(proc, signal.SIGTERM) == 0
        await cap.wait_for(lambda: len(cap.of("NDEATH")) == 2, "the clean stop's NDEATH")

    # -- node: bdSeq, rebirth metric, will -----------------------------------------------
    nbirths = [spb.NBirth.decode(p) for _, p in cap.of("NBIRTH")]
    ndeaths = [spb.NDeath.decode(p) for _, p in cap.of("NDEATH")]
    bdseq = [{m.name: m.value for m in b.metrics}["bdSeq"] for b in nbirths]
    assert bdseq == [0, 0, 1], "bdSeq: 0 at the first CONNECT, unchanged by a rebirth, +1 next"
    assert [d.bd_seq_metric.name for d in ndeaths] == ["bdSeq", "bdSeq"]
    assert [d.bd_seq_metric.value for d in ndeaths] == [0, 1], "the Will matches its NBIRTH"
    for b in nbirths:
        named = {m.name: m for m in b.metrics}
        assert b.seq == 0
        assert named["bdSeq"].datatype == spb.DataType.INT64
        assert named["Node Control/Rebirth"].datatype == spb.DataType.BOOLEAN
        assert named["Node Control/Rebirth"].value is False
        assert named["Node Control/Rebirth"].alias is None
        assert named["Gateway/Id"].value == gw_id

    # -- payload seq: 0 at NBIRTH, +1 per message after it, modulo 256 --------------------
    expected = None
    for topic, payload in first_run:
        kind = topic.split("/")[2]
        if kind in ("NDEATH", "NCMD"):
            continue
        seq = spb_pb.Payload.FromString(payload).seq
        if kind == "NBIRTH":
            expected = 0
        assert seq == expected, (topic, seq, expected)
        expected = (seq + 1) % 256

    # -- device: DBIRTH aliases and datatypes; DDATA values, timestamps and properties ----
    dbirth = spb.DBirth.decode(cap.of("DBIRTH")[0][1])
    types = {m.name: m.datatype for m in dbirth.metrics}
    D = spb.DataType
    assert types["O2"] == D.FLOAT and types["OUR"] == D.DOUBLE
    assert types["gas_temp"] == D.DOUBLE, "scaled int16 -> float64 values"
    assert types["uptime"] == D.UINT64 and types["cal_constant"] == D.INT32
    assert types["fixed_int64"] == D.INT64 and types["status"] == D.UINT16
    assert types["ready"] == D.BOOLEAN and types["serial"] == D.STRING
    assert types["Events/offline"] == D.STRING
    aliases = [m.alias for m in dbirth.metrics]
    assert None not in aliases and len(set(aliases)) == len(aliases)
    assert all(m.is_null for m in dbirth.metrics), "nothing published yet: values are null"
    units = {}
    for m in spb_pb.Payload.FromString(cap.of("DBIRTH")[0][1]).metrics:
        units[m.name] = props(m).get("engUnit", "")
    assert units["gas_temp"] == "Cel" and units["O2"] == "%"
    later = spb.DBirth.decode(cap.of("DBIRTH")[1][1])
    assert [(m.name, m.alias) for m in later.metrics] == [
        (m.name, m.alias) for m in dbirth.metrics
    ], "a rebirth keeps names and aliases"
    assert any(not m.is_null for m in later.metrics), "a rebirth carries the last values"

    verifier = Verifier()
    n_values = 0
    for topic, payload in cap.messages:
        kind = topic.split("/")[2]
        if kind not in ("DDATA", "DDEATH"):
            continue
        assert kind != "DDEATH", "the simulator never went away"
        decoded = spb.DData.decode(payload, birth=dbirth)
        raw = spb_pb.Payload.FromString(payload)
        assert not any(m.HasField("name") for m in raw.metrics), "DDATA: aliases only"
        for m, pm in zip(decoded.metrics, raw.metrics, strict=True):
            p = props(pm)
            r = rebuild(gw_id, "offgas-1", m.name, m.value, p, units.get(m.name, ""))
            assert m.timestamp == r["ts"] // 1_000_000, "metric timestamp: acquisition ms"
            assert record_hash(r) == r["hash"], (m.name, r)
            assert (m.value is None) == m.is_null == (r["val"] is None)
            n_values += m.value is not None and not m.name.startswith("Events/")
            verifier.add(r, topic)
    report = verifier.report()
    assert report.ok, report.summary()
    [stream] = report.streams
    assert stream.first_seq == 1 and stream.records > 100 and n_values > 100
    assert stream.events.get("$start") == 2 and stream.events.get("$stop") == 1


async def test_offline_is_a_ddeath_online_a_dbirth_and_the_chain_survives(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    gw_id = f"gw-spb-{next(_ids)}"
    spec = GatewaySpec(
        tmp_path / "state", broker.port, [Device("offgas-1", sim.port, 1)], gateway_id=gw_id
    )
    cfg = load_config(sparkplug_config(spec))

    def kinds() -> list[str]:
        return [t.split("/")[2] for t, _ in cap.messages if t.endswith("/offgas-1")]

    async with SpbCapture(broker.port) as cap, running(cfg):
        await cap.wait_for(lambda: kinds().count("DDATA") >= 5, "5 DDATA")
        sim.set_fault("drop")  # the device closes every connection
        await cap.wait_for(lambda: kinds().count("DDEATH") >= 2, "DDEATHs")
        sim.set_fault(None)
        await cap.wait_for(lambda: kinds().count("DBIRTH") >= 2, "the DBIRTH when back")
        await cap.wait_for(lambda: kinds()[-1] == "DDATA", "data after it")

    seen = kinds()
    first_death, second_birth = seen.index("DDEATH"), seen.index("DBIRTH", 1)
    assert seen[0] == "DBIRTH" and seen[1:first_death] == ["DDATA"] * (first_death - 1)
    assert set(seen[first_death:second_birth]) == {"DDEATH"}, "no DDATA while the device is dead"
    assert seen[second_birth + 1] == "DDATA"

    births = [spb.DBirth.decode(p) for t, p in cap.messages if "/DBIRTH/" in t]
    dbirth = births[0]
    # The DBIRTH after $online states the last values published: the failed
    # attempts' bad readings, null with quality bad (never a stale good value).
    again = {m.name: m for m in births[1].metrics}
    assert again["O2"].is_null and again["O2"].datatype == spb.DataType.FLOAT
    raw_birth = next(spb_pb.Payload.FromString(p) for t, p in cap.messages if "/DBIRTH/" in t)
    assert all("Quality" not in props(m) for m in raw_birth.metrics), "first DBIRTH: no value yet"
    raw_again = [spb_pb.Payload.FromString(p) for t, p in cap.messages if "/DBIRTH/" in t][1]
    assert {m.name: props(m).get("Quality") for m in raw_again.metrics}["O2"] == 0
    units = {m.name: props(m).get("engUnit", "") for m in raw_birth.metrics}
    verifier = Verifier()
    device_msgs = [(t, p) for t, p in cap.messages if t.endswith("/offgas-1")]
    for topic, payload in device_msgs:
        kind = topic.split("/")[2]
        if kind not in ("DDATA", "DDEATH"):
            continue
        # pysparkplug's DDeath keeps only seq and timestamp: read the metrics a DDEATH
        # carries with its generic payload decoder (the DData class).
        decoded = spb.DData.decode(payload, birth=dbirth)
        assert spb.DDeath.decode(payload).seq == decoded.seq
        raw = spb_pb.Payload.FromString(payload)
        for m, pm in zip(decoded.metrics, raw.metrics, strict=True):
            r = rebuild(gw_id, "offgas-1", m.name, m.value, props(pm), units[m.name])
            assert record_hash(r) == r["hash"], (m.name, r)
            verifier.add(r, topic)
            if kind == "DDEATH" and not m.name.startswith("Events/"):
                assert r["q"] == "bad" and r["val"] is None and "status" in r
    deaths = [spb.DData.decode(p, birth=dbirth) for t, p in device_msgs if "/DDEATH/" in t]
    assert deaths[0].metrics[0].name == "Events/offline"
    after = spb.DData.decode(device_msgs[second_birth + 1][1], birth=dbirth)
    assert after.metrics[0].name == "Events/online"
    report = verifier.report()
    assert report.ok, report.summary()
    [stream] = report.streams
    assert stream.first_seq == 1 and stream.records == stream.last_seq
    assert stream.events.get("$offline", 0) >= 1 and stream.events.get("$online", 0) >= 2


def test_bdseq_wraps_after_255_and_a_damaged_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "sparkplug.bdseq"
    assert [_take_bdseq(path) for _ in range(3)] == [0, 1, 2]
    path.write_text("255\n")
    assert [_take_bdseq(path) for _ in range(2)] == [255, 0]
    path.write_text("garbage")
    with pytest.raises(MqttError, match="not a bdSeq number"):
        _take_bdseq(path)


@pytest.fixture
def qos0_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A restartable broker that also queues QoS 0 messages (births) for a persistent
    session: the subscriber may reconnect after the gateway and must still get them."""
    b = Mosquitto(tmp_path / "mosquitto", "queue_qos0_messages true", persistent=True)
    b.start()
    yield b
    b.stop()


async def test_broker_restart_new_bdseq_births_first_and_every_record_arrives(
    sim: OffGasSimulator, qos0_broker: Mosquitto, tmp_path: Path
) -> None:
    own_broker = qos0_broker
    gw_id = f"gw-spb-{next(_ids)}"
    spec = GatewaySpec(
        tmp_path / "state", own_broker.port, [Device("offgas-1", sim.port, 1)], gateway_id=gw_id
    )
    cfg = load_config(sparkplug_config(spec))
    messages: list[tuple[str, bytes]] = []
    stop, ready = asyncio.Event(), asyncio.Event()
    # A persistent session (the broker keeps it across its restart): nothing is missed.
    sub = asyncio.create_task(
        subscribe(
            BrokerSection(host="127.0.0.1", port=own_broker.port),
            "spBv1.0/#",
            lambda t, p: messages.append((t, p)),
            stop=stop,
            ready=ready,
            client_id=f"spb-persistent-{next(_ids)}",
            session_expiry=3600,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)

    def count(kind: str) -> int:
        return sum(1 for t, _ in messages if t.split("/")[2] == kind)

    async def wait(pred: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    try:
        async with running(cfg) as gw:
            await wait(lambda: count("DDATA") >= 5, "5 DDATA")
            own_broker.stop()
            await asyncio.sleep(1.5)  # acquisition goes on into the outbox
            own_broker.start()
            await wait(lambda: count("NBIRTH") >= 2, "the NBIRTH of the new session")
            n = count("DDATA")
            await wait(lambda: count("DDATA") >= n + 5, "data after it")
            assert gw.publisher is not None and gw.publisher.reconnects >= 2
        await wait(lambda: count("NDEATH") >= 1, "the clean stop's NDEATH")
    finally:
        stop.set()
        await asyncio.wait_for(sub, 10)

    bdseqs = [
        {m.name: m.value for m in spb.NBirth.decode(p).metrics}["bdSeq"]
        for t, p in messages
        if "/NBIRTH/" in t
    ]
    assert bdseqs[:2] == [0, 1], "a new CONNECT, a new bdSeq"
    second = next(i for i, (t, _) in enumerate(messages) if "/NBIRTH/" in t and i > 0)
    after = [t.split("/")[2] for t, _ in messages[second:]]
    assert after[1] == "DBIRTH", "births before the republished rows"
    dbirth = spb.DBirth.decode(next(p for t, p in messages if "/DBIRTH/" in t))
    units = {
        m.name: props(m).get("engUnit", "")
        for m in spb_pb.Payload.FromString(next(p for t, p in messages if "/DBIRTH/" in t)).metrics
    }
    verifier = Verifier()
    for topic, payload in messages:
        if "/DDATA/" not in topic:
            continue
        decoded = spb.DData.decode(payload, birth=dbirth)
        raw = spb_pb.Payload.FromString(payload)
        for m, pm in zip(decoded.metrics, raw.metrics, strict=True):
            r = rebuild(gw_id, "offgas-1", m.name, m.value, props(pm), units[m.name])
            assert record_hash(r) == r["hash"]
            verifier.add(r, topic)
    report = verifier.report()
    assert report.ok, report.summary()
    [stream] = report.streams
    assert stream.first_seq == 1 and stream.records == stream.last_seq, "no record lost"
    assert stream.events.get("$stop") == 1
