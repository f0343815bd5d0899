"""Sparkplug B output: the outbox's rows published as an Edge Node and its Devices.

The outbox keeps our records; each committed row is converted when it is
published. A row is one DDATA (or one DDEATH while its device is dead) at QoS 1
and is deleted on its PUBACK, exactly as in records mode. Births and deaths
that carry no records follow the specification (QoS 0, not retained). The
NDEATH is the MQTT Will, with the bdSeq of the session's NBIRTH. See
docs/sparkplug.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from gateway.config import Config
from gateway.mqtt import AsyncMqtt, MqttError
from gateway.outbox import Outbox, StoredMessage
from gateway.publisher import Publisher
from gateway.record import (
    EV_CHECKPOINT,
    EV_GAP,
    EV_OFFLINE,
    EV_ONLINE,
    EV_START,
    EV_STOP,
    FORMAT_VERSION,
    decode_payload,
)
from gateway.reload import EV_RELOAD, GATEWAY_STREAM
from gateway.sparkplug import codec
from gateway.sparkplug.codec import DeviceModel, Metric

BDSEQ_FILE = "sparkplug.bdseq"
DEVICE_EVENTS = (EV_START, EV_ONLINE, EV_OFFLINE, EV_GAP, EV_STOP, EV_CHECKPOINT)
GATEWAY_EVENTS = (EV_START, EV_STOP, EV_RELOAD, EV_GAP, EV_CHECKPOINT)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SparkplugPublisher(Publisher):
    """Publisher whose wire format is Sparkplug B 3.0 instead of record arrays."""

    def __init__(self, cfg: Config, outbox: Outbox) -> None:
        super().__init__(cfg.broker, cfg.gateway.id, outbox)
        sp = cfg.sparkplug
        self.group_id = sp.group_id
        self.node_id = sp.edge_node_id or cfg.gateway.id
        self._group_topic = f"{codec.NAMESPACE}/{self.group_id}"
        self.ncmd_topic = self._topic("NCMD")
        self.bdseq_path = Path(cfg.gateway.state_dir) / BDSEQ_FILE
        self.bdseq = -1  # of the current session
        self._connect_sent = False  # did the last attempt get as far as CONNECT?
        self.seq = 0  # payload seq of the last message sent (NBIRTH is 0)
        self.rebirths = 0
        self._next_alias = 1
        self.devices: dict[str, DeviceModel] = {}
        self.alive: dict[str, bool] = {}  # device id -> born in Sparkplug's sense
        self.born: set[str] = set()  # devices with a DBIRTH in this session
        for dev in cfg.devices:
            if dev.enabled:
                model = self._device(dev.id)
                for tag in dev.tags:
                    dt = codec.config_datatype(tag)
                    m = self._add_metric(model, tag.name, dt if dt is not None else codec.DOUBLE)
                    m.declared = dt is not None
                    m.unit = tag.unit
                for ev in DEVICE_EVENTS:
                    self._add_metric(model, ev, codec.STRING)
        # Announced up front so that routine events need no rebirth.
        node = self._device(GATEWAY_STREAM)
        for ev in GATEWAY_EVENTS:
            self._add_metric(node, ev, codec.STRING)

    # -- model -------------------------------------------------------------------------
    def _device(self, dev: str) -> DeviceModel:
        model = self.devices.get(dev)
        if model is None:
            model = self.devices[dev] = DeviceModel(dev)
            self.alive[dev] = True
        return model

    def _add_metric(self, model: DeviceModel, tag: str, datatype: int) -> Metric:
        m = Metric(codec.metric_name(tag), self._next_alias, datatype)
        self._next_alias += 1
        model.metrics[tag] = m
        return m

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFF
        return self.seq

    def _topic(self, kind: str, dev: str | None = None) -> str:
        t = f"{self._group_topic}/{kind}/{self.node_id}"
        return t if dev is None else f"{t}/{dev}"

    # -- session -----------------------------------------------------------------------
    async def _prepare(self, mqtt: AsyncMqtt) -> None:
        # bdSeq: 0 for the first CONNECT packet ever, +1 (mod 256) per CONNECT
        # packet, across restarts. The next value is stored before the CONNECT
        # that uses this one, so a crash right after connecting never reuses a
        # value. An attempt whose socket never opened (broker down, refused,
        # TLS failure) sent no CONNECT: its value is used again.
        if self.bdseq < 0 or self._connect_sent:
            self.bdseq = await asyncio.to_thread(_take_bdseq, self.bdseq_path)
        self._connect_sent = False
        opened = mqtt.client.on_socket_open

        def on_socket_open(client: Any, userdata: Any, sock: Any) -> None:
            # paho sends CONNECT right after this (from the connect thread).
            self._connect_sent = True
            if opened is not None:
                opened(client, userdata, sock)

        mqtt.client.on_socket_open = on_socket_open
        mqtt.client.will_set(
            self._topic("NDEATH"), codec.ndeath(self.bdseq, _now_ms()), qos=1, retain=False
        )
        mqtt.on_message = self._on_command

    async def _session_start(self, mqtt: AsyncMqtt) -> None:
        # The NCMD subscription comes first (spec: before the NBIRTH) so that a
        # rebirth request is never missed.
        await mqtt.subscribe(self.ncmd_topic)
        self._births(mqtt)
        if self.key_status is not None:
            # The checkpoint key is not Sparkplug data: it keeps its records-mode topic.
            mqtt.publish(f"{self.status_topic}/key", self.key_status, retain=True)

    def _session_end(self, mqtt: AsyncMqtt) -> None:
        # A clean DISCONNECT does not fire the Will: say it ourselves.
        mqtt.client.publish(
            self._topic("NDEATH"), codec.ndeath(self.bdseq, _now_ms()), qos=1, retain=False
        )

    def _births(self, mqtt: AsyncMqtt) -> None:
        """NBIRTH (seq 0) and a DBIRTH for every device currently alive."""
        ts = _now_ms()
        self.seq = 0
        self.born.clear()
        # Gateway-level streams ("$gateway") have no device: their metrics are the node's.
        node = [
            m for d, mod in self.devices.items() if d.startswith("$") for m in mod.metrics.values()
        ]
        payload = codec.nbirth(self.gateway_id, self.bdseq, ts, FORMAT_VERSION, node)
        self._send(mqtt, self._topic("NBIRTH"), payload)
        for dev, model in self.devices.items():
            if self.alive[dev] and not dev.startswith("$"):
                self._dbirth(mqtt, model, ts)

    def _dbirth(self, mqtt: AsyncMqtt, model: DeviceModel, ts: int) -> None:
        self._send(mqtt, self._topic("DBIRTH", model.id), codec.dbirth(model, self._next_seq(), ts))
        self.born.add(model.id)
        self.alive[model.id] = True

    def _send(self, mqtt: AsyncMqtt, topic: str, payload: bytes) -> None:
        info = mqtt.client.publish(topic, payload, qos=0, retain=False)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")

    def _on_command(self, msg: paho.MQTTMessage) -> None:
        if msg.topic != self.ncmd_topic or self._mqtt is None or not self.connected:
            return
        try:
            wanted = codec.rebirth_requested(bytes(msg.payload))
        except Exception as exc:  # a malformed command must not stop publishing
            self.log.warning("NCMD payload not understood", topic=msg.topic, error=str(exc))
            return
        if wanted:
            # Runs on the loop between two rows: no DDATA goes out until the
            # births are queued, as the specification requires.
            self.rebirths += 1
            self.log.info("rebirth requested", topic=msg.topic)
            try:
                self._births(self._mqtt)
            except MqttError as exc:
                # The connection is going; the next session starts with births anyway.
                self.log.warning("rebirth not sent", error=str(exc))

    # -- rows --------------------------------------------------------------------------
    def _publish_row(self, mqtt: AsyncMqtt, m: StoredMessage) -> int:
        records = decode_payload(m.payload)
        ts = _now_ms()
        dev = m.stream
        model = self._device(dev)
        node_level = dev.startswith("$")
        need_birth = not node_level and dev not in self.born and self.alive[dev]
        for r in records:
            tag = r["tag"]
            metric = model.metrics.get(tag)
            val = r["val"]
            if metric is None:
                metric = self._add_metric(model, tag, codec.infer_datatype(val))
                need_birth = True
            elif val is not None and not codec.fits(metric.datatype, val):
                # Announce the datatype the value needs: a DBIRTH redefines the metric.
                metric.datatype = codec.infer_datatype(val)
                need_birth = True
            if tag == EV_ONLINE and not self.alive[dev]:
                need_birth = True  # back from the dead
        if need_birth and node_level:
            # A gateway-level stream (no device): its metrics belong to the NBIRTH.
            self._births(mqtt)
        elif need_birth:
            self._dbirth(mqtt, model, ts)
        if node_level:
            kind, topic_dev = "NDATA", None
        elif self.alive[dev]:
            kind, topic_dev = "DDATA", dev
        else:
            kind, topic_dev = "DDEATH", dev  # records of a dead device (docs/sparkplug.md)
        if not node_level and any(r["tag"] == EV_OFFLINE for r in records):
            kind, topic_dev = "DDEATH", dev
            self.alive[dev] = False
            self.born.discard(dev)
        payload = codec.records_payload(model, records, self._next_seq(), ts)
        return mqtt.publish(self._topic(kind, topic_dev), payload)


def _take_bdseq(path: Path) -> int:
    """The bdSeq for this CONNECT; the next one is stored (atomically) first."""
    try:
        current = int(path.read_text().strip()) & 0xFF
    except FileNotFoundError:
        current = 0
    except ValueError as exc:
        raise MqttError(f"{path}: not a bdSeq number: {exc}") from exc
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write(f"{(current + 1) & 0xFF}\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return current
