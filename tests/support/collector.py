"""An in-process subscriber that keeps every record and verifies them."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from gateway.config import BrokerSection
from gateway.record import Record, decode_payload
from gateway.subscribe import subscribe
from gateway.verify import Verifier

_ids = itertools.count()


class Collector:
    """Subscribes with a persistent session, so a broker restart loses nothing."""

    def __init__(self, port: int, topic: str = "plant/#") -> None:
        self.broker = BrokerSection(host="127.0.0.1", port=port)
        self.topic = topic
        self.records: list[Record] = []
        self.payloads = 0
        self.status: dict[str, bytes] = {}
        self.verifier = Verifier()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _on(self, topic: str, payload: bytes) -> None:
        if "/$status" in topic:  # $status and $status/key: not record payloads
            self.status[topic] = payload
            return
        self.payloads += 1
        for r in decode_payload(payload):
            self.records.append(r)
            self.verifier.add(r, topic)

    async def __aenter__(self) -> Collector:
        ready = asyncio.Event()
        self._task = asyncio.create_task(
            subscribe(
                self.broker,
                self.topic,
                self._on,
                stop=self._stop,
                ready=ready,
                client_id=f"test-collector-{next(_ids)}",
                session_expiry=3600,
            )
        )
        await asyncio.wait_for(ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    def of(self, dev: str, tag: str | None = None) -> list[Record]:
        return [r for r in self.records if r["dev"] == dev and (tag is None or r["tag"] == tag)]

    async def wait_for(
        self, pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.05)
