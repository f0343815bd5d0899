"""Scaling out: two gateway processes, two consumers in one MQTT 5 shared-subscription group.

Each gateway owns its own device (its own off-gas simulator; both devices are
called "offgas-1": the chain is named by (gateway id, device id)). The broker
hands each message to one member of the group, so each consumer holds part of
each stream, with holes where the other's messages went. Merged and
de-duplicated by (gw, dev, seq) with the consumer library, every record is
there exactly once and every chain verifies. docs/scaling.md explains why.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import BrokerSection
from gateway.consumer import Consumer
from gateway.mqtt import AsyncMqtt
from gateway.record import decode_payload
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.gateway import Device, GatewaySpec, kill, spawn

_ids = itertools.count()


class GroupMember:
    """One consumer of the shared subscription: keeps every payload it is given."""

    def __init__(self, port: int, topic: str) -> None:
        self.topic = topic
        self.mqtt = AsyncMqtt(BrokerSection(host="127.0.0.1", port=port), f"share-{next(_ids)}")
        self.messages: list[tuple[str, bytes]] = []
        self.mqtt.on_message = lambda msg: self.messages.append((msg.topic, bytes(msg.payload)))

    async def __aenter__(self) -> GroupMember:
        await self.mqtt.connect()
        await self.mqtt.subscribe(self.topic)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.mqtt.disconnect()
        self.mqtt.close()

    def record_keys(self) -> list[tuple[str, str, int]]:
        return [
            (r["gw"], r["dev"], r["seq"])
            for t, p in self.messages
            if not t.endswith("/$status")
            for r in decode_payload(p)
        ]


async def wait_for(pred: Callable[[], Any], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def sims() -> AsyncIterator[list[OffGasSimulator]]:
    out = [OffGasSimulator(unit_ids=(1,), time_scale=3600, update_interval=0.05) for _ in (0, 1)]
    for s in out:
        await s.start()
    yield out
    for s in out:
        await s.stop()


async def test_two_gateways_two_shared_consumers_every_record_once_and_chains_verify(
    sims: list[OffGasSimulator], broker: Mosquitto, tmp_path: Path
) -> None:
    n = next(_ids)
    gws = [f"line{i}-gw-{n}" for i in (1, 2)]
    topic = f"$share/historian-{n}/plant/+/+"
    async with GroupMember(broker.port, topic) as a, GroupMember(broker.port, topic) as b:
        procs = []
        for gw, sim in zip(gws, sims, strict=True):
            spec = GatewaySpec(
                tmp_path / gw, broker.port, [Device("offgas-1", sim.port, 1)], gateway_id=gw
            )
            procs.append(spawn(spec.write(), tmp_path / f"{gw}.log"))
        try:

            def enough() -> bool:
                got = a.record_keys() + b.record_keys()
                return all(sum(1 for k in got if k[0] == gw) >= 60 for gw in gws)

            await wait_for(enough, "60 records from each gateway")
        finally:
            for p in procs:
                assert kill(p, signal.SIGTERM) == 0
        consumer = Consumer(max_buffer=None)

        def stopped() -> bool:
            tags = {
                (r["gw"], r["tag"])
                for m in (a, b)
                for t, p in m.messages
                if not t.endswith("/$status")
                for r in decode_payload(p)
            }
            return all((gw, "$stop") in tags for gw in gws)

        await wait_for(stopped, "both gateways' $stop")

    # The group shared the work: both members got messages from both gateways.
    for member in (a, b):
        assert {k[0] for k in member.record_keys()} == set(gws), "each member got both gateways"
    # Each message went to exactly one member (no reconnect here, so no re-delivery).
    ka, kb = a.record_keys(), b.record_keys()
    assert len(set(ka)) == len(ka) and len(set(kb)) == len(kb)
    assert not set(ka) & set(kb), "a record delivered to both members of the group"

    # Merged, the two members' records are each gateway's complete chain.
    for t, p in a.messages + b.messages:
        consumer.feed(t, p)
    released = consumer.flush()
    report = consumer.report()
    assert report.ok, report.summary()
    device_streams = [s for s in report.streams if s.dev == "offgas-1"]
    assert sorted(s.gw for s in device_streams) == sorted(gws), "(gw, dev) keeps chains apart"
    for s in device_streams:
        assert s.first_seq == 1 and s.records == s.last_seq and s.records >= 60
        assert not s.unexplained and s.duplicates == 0
    # The consumer hands the merged records back once each, in seq order per stream.
    by_stream: dict[tuple[str, str], list[int]] = {}
    for r in released:
        by_stream.setdefault((r["gw"], r["dev"]), []).append(r["seq"])
    for seqs in by_stream.values():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert sum(len(v) for v in by_stream.values()) == len(set(ka) | set(kb))
