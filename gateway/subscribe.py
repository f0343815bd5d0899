"""Subscriber side of the tools: `gateway tail` and `gateway verify` from a broker.

The subscriber reconnects by itself, and with ``session_expiry`` set the broker
keeps its subscription and queues messages while it is away, so a broker or
network hiccup does not silently thin out what it receives.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import structlog

from gateway.config import BrokerSection
from gateway.mqtt import AsyncMqtt, MqttError

log = structlog.get_logger("gateway.subscribe")


async def subscribe(
    broker: BrokerSection,
    topic: str,
    on_message: Callable[[str, bytes], None],
    *,
    seconds: float | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    client_id: str | None = None,
    session_expiry: int = 0,
) -> None:
    """Deliver every message on ``topic`` until ``seconds`` pass or ``stop`` is set."""
    stop = stop or asyncio.Event()
    deadline = None if seconds is None else time.monotonic() + seconds
    cid = client_id or f"gateway-tool-{os.getpid()}-{id(on_message):x}"

    def handle(msg: paho.MQTTMessage) -> None:
        on_message(msg.topic, bytes(msg.payload))

    while not stop.is_set():
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        mqtt = AsyncMqtt(broker, cid, session_expiry=session_expiry)
        mqtt.on_message = handle
        try:
            await mqtt.connect()
            await mqtt.subscribe(topic)
            if ready is not None:
                ready.set()
            waits = {
                asyncio.ensure_future(mqtt.disconnected.wait()),
                asyncio.ensure_future(stop.wait()),
            }
            left = None if deadline is None else deadline - time.monotonic()
            _, pending = await asyncio.wait(waits, timeout=left, return_when="FIRST_COMPLETED")
            for f in pending:
                f.cancel()
            if not mqtt.disconnected.is_set():
                mqtt.disconnect()
                await asyncio.sleep(0)
                return
        except MqttError as exc:
            log.warning("subscriber cannot reach the broker", error=str(exc))
        finally:
            mqtt.close()
        await asyncio.sleep(0.2)
