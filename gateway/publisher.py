"""Publisher: committed outbox messages -> MQTT (QoS 1), deleted on PUBACK.

Messages go out in outbox order over one connection, so each device's records
reach the broker in order. At most ``broker.inflight`` messages await a PUBACK
at once: paho stalls past 65,535 unacknowledged QoS 1 messages and slows down
with a large in-flight count. After a reconnect everything not yet acknowledged
is published again (at-least-once; subscribers de-duplicate by stream and seq).
"""

from __future__ import annotations

import asyncio
import random
import time

import structlog

from gateway.config import BrokerSection
from gateway.errors import ConfigError
from gateway.mqtt import AsyncMqtt, MqttError
from gateway.outbox import Outbox, StoredMessage
from gateway.record import CONTENT_TYPE
from gateway.supervisor import backoff_delay

HEARTBEAT = 5.0  # s: longest idle wait in the pump, so an idle publisher still beats
ONLINE = b"online"
OFFLINE = b"offline"


class Publisher:
    """Owns the broker session for the life of the gateway."""

    def __init__(self, broker: BrokerSection, gateway_id: str, outbox: Outbox) -> None:
        self.broker = broker
        self.gateway_id = gateway_id
        self.outbox = outbox
        self.base_topic = f"{broker.topic_prefix}/{gateway_id}"
        self.status_topic = f"{self.base_topic}/$status"
        self.window = broker.inflight
        self.connected = False
        self.published = 0
        self.acked = 0
        self.reconnects = 0
        self.last_error: str | None = None
        # The checkpoint public key (JSON), retained on $status/key when set.
        self.key_status: bytes | None = None
        # Liveness for the systemd watchdog (gateway/health.py): monotonic time
        # of the loop's last progress, set ahead while sleeping before a reconnect.
        self.heartbeat = time.monotonic()
        self._topics: dict[str, str] = {}
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._wake = asyncio.Event()
        self._mqtt: AsyncMqtt | None = None
        self._stopping = False
        self._rng = random.Random()
        self.log = structlog.get_logger("gateway.publisher")
        outbox.on_commit = self._wake.set
        outbox.inflight = lambda: frozenset(self._inflight.values())

    def topic(self, stream: str) -> str:
        t = self._topics.get(stream)
        if t is None:
            t = self._topics[stream] = f"{self.base_topic}/{stream}"
        return t

    async def run(self) -> None:
        """Connect, publish, and reconnect with backoff until cancelled."""
        attempt = 0
        while not self._stopping:
            self.heartbeat = time.monotonic()
            mqtt: AsyncMqtt | None = None
            try:
                mqtt = AsyncMqtt(
                    self.broker,
                    self.broker.client_id or f"gateway-{self.gateway_id}",
                    will=(self.status_topic, OFFLINE),
                    max_inflight=self.window + 8,
                )
                mqtt.on_publish = self._on_publish
                self._mqtt = mqtt
                await self._prepare(mqtt)
                await mqtt.connect()
                await self._session_start(mqtt)
                self.connected = True
                if attempt or self.reconnects:
                    self.log.info("broker connected", host=self.broker.host, port=self.broker.port)
                self.reconnects += 1
                attempt = 0
                await self._pump(mqtt)
                if not self._stopping:
                    self.last_error = f"connection lost: {mqtt.disconnect_reason}"
                    self.log.warning("broker connection lost", reason=mqtt.disconnect_reason)
            except (MqttError, ConfigError) as exc:
                self.last_error = str(exc)
                self.log.warning("broker unavailable", error=str(exc), attempt=attempt)
            except Exception as exc:
                # Whatever goes wrong, the publisher must come back: data keeps
                # accumulating in the outbox and only this task empties it.
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.log.exception("publisher failed; retrying", attempt=attempt)
            finally:
                self.connected = False
                if mqtt is not None and not self._stopping:
                    mqtt.close()
                self._inflight.clear()
            if self._stopping:
                break
            delay = backoff_delay(
                attempt,
                base=self.broker.reconnect_min,
                cap=self.broker.reconnect_max,
                rng=self._rng,
            )
            attempt += 1
            self.heartbeat = time.monotonic() + delay
            await asyncio.sleep(delay)

    async def _pump(self, mqtt: AsyncMqtt) -> None:
        # Start from the oldest row still stored: whatever was in flight on the
        # last connection is sent again. The flush commits pending deletes first
        # so acknowledged rows are not sent twice.
        await self.outbox.flush()
        cursor = 0
        lost = asyncio.ensure_future(mqtt.disconnected.wait())
        try:
            while not mqtt.disconnected.is_set():
                self.heartbeat = time.monotonic()
                room = self.window - len(self._inflight)
                if room > 0:
                    self._wake.clear()
                    batch = await self.outbox.read_after(cursor, max(room, 64))
                    for m in batch[:room]:
                        cursor = m.id
                        mid = self._publish_row(mqtt, m)
                        self._inflight[mid] = m.id
                        self.published += 1
                    if len(batch) >= room > 0 and batch:
                        continue  # more is waiting; the window decides the pace
                if mqtt.disconnected.is_set():
                    break
                waiter = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait(
                    {waiter, lost}, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
        finally:
            lost.cancel()

    # Hooks for another wire format (gateway/sparkplug/publisher.py overrides them).
    async def _prepare(self, mqtt: AsyncMqtt) -> None:
        """Before CONNECT (e.g. to set another Will)."""

    async def _session_start(self, mqtt: AsyncMqtt) -> None:
        """Right after CONNACK, before the backlog is published."""
        mqtt.publish(self.status_topic, ONLINE, retain=True)
        if self.key_status is not None:
            mqtt.publish(f"{self.status_topic}/key", self.key_status, retain=True)

    def _publish_row(self, mqtt: AsyncMqtt, m: StoredMessage) -> int:
        """Publish one outbox row at QoS 1; the returned mid's PUBACK deletes the row."""
        return mqtt.publish(self.topic(m.stream), m.payload, content_type=CONTENT_TYPE)

    def _session_end(self, mqtt: AsyncMqtt) -> None:
        """On a clean stop, before DISCONNECT (which does not fire the Will)."""
        mqtt.publish(self.status_topic, OFFLINE, retain=True)

    def _on_publish(self, mid: int, ok: bool, reason: str) -> None:
        row = self._inflight.pop(mid, None)
        if row is None:
            return  # the status message, or a PUBACK from before a reconnect
        if not ok:
            # The broker refused it (MQTT 5 reason code): keep the row and start
            # over on a new connection; never count a refusal as delivery.
            self.last_error = f"broker refused a message: {reason}"
            self.log.error("broker refused a message; will retry", reason=reason, row=row)
            if self._mqtt is not None:
                self._mqtt.close()
            return
        self.acked += 1
        self.outbox.ack((row,))
        self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Publish the backlog for at most ``timeout`` s; True if the outbox emptied."""
        deadline = time.monotonic() + timeout
        await self.outbox.flush()
        while time.monotonic() < deadline:
            await self.outbox.flush()
            if self.outbox.messages == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    async def stop(self) -> None:
        """Publish 'offline' (retained) and disconnect cleanly."""
        self._stopping = True
        self._wake.set()
        mqtt = self._mqtt
        if mqtt is not None and self.connected:
            try:
                self._session_end(mqtt)
                await asyncio.sleep(0.05)
                mqtt.disconnect()
            except MqttError:
                pass
            mqtt.close()
