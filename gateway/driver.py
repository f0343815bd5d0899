"""The driver contract: what a protocol plugin implements (see docs/drivers.md).

A driver speaks one protocol to one device and produces ``Reading`` objects.
It knows nothing of MQTT, hashing or storage. The supervisor calls, in order:
``connect()``, ``run(emit)`` (until it raises or is cancelled), ``close()``;
then, after a backoff, a fresh instance again.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

import structlog

from gateway.config import DeviceConfig
from gateway.record import GOOD

Value = float | int | bool | str
C = TypeVar("C", bound=DeviceConfig)


@dataclass(slots=True)
class Reading:
    """One value of one tag as the device gave it (before scaling).

    ``val`` is None only when no value could be read; ``q`` is then ``bad`` and
    ``status`` says why (protocol status code, exception code, "timeout", ...).
    ``unit`` is a unit the device itself reported (UCUM code); it is used only
    when the tag's configured ``unit`` is empty: the configuration wins.
    """

    tag: str
    val: Value | None
    q: str = GOOD
    status: int | str | None = None
    src_ts: int | None = None  # device timestamp, ns since the Unix epoch
    unit: str | None = None


Emit = Callable[[list[Reading]], Awaitable[None]]
"""Hands one acquisition cycle's readings to the pipeline (awaits back-pressure)."""


class Driver(ABC, Generic[C]):
    """Base of every driver. Subclasses set ``config_model`` and implement the rest."""

    config_model: ClassVar[type[DeviceConfig]]
    # The gateway's [gateway] state_dir, set by the supervisor before connect():
    # where a driver keeps what must survive restarts (e.g. its certificates).
    state_dir: Path | None = None

    def __init__(self, config: C) -> None:
        self.config = config
        self.log = structlog.get_logger("gateway.driver").bind(device=config.id)

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise ``DriverError`` (with the reason) on failure."""

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Acquire until the device fails (raise ``DriverError``) or the task is cancelled."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connection; must not raise."""


POLL_PHASES = 8


class PolledDriver(Driver[C]):
    """A driver that reads all its tags every ``poll_interval`` seconds."""

    overruns = 0

    @abstractmethod
    async def poll(self) -> list[Reading]:
        """Read every tag once. Per-tag failures are readings with ``q='bad'``;
        raise ``DriverError`` only when the connection itself is gone."""

    async def run(self, emit: Emit) -> None:
        interval = self.config.poll_interval
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        # After the first poll (at once), each device polls in one of
        # POLL_PHASES phases of its interval, picked from its id. Devices
        # started together then neither poll in one instant (one big burst per
        # interval: latency) nor each at its own moment (a commit, a publish
        # and a wake-up per device: CPU), but in a few bounded groups that
        # share their transaction and their trip to the broker.
        phase = zlib.crc32(self.config.id.encode()) % POLL_PHASES / POLL_PHASES * interval
        next_at: float | None = None
        while True:
            readings = await self.poll()
            # Python 3.11's wait_for (used inside protocol libraries) can swallow
            # a cancellation that races a response; the request to stop is
            # still recorded on the task, so honour it here.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await emit(readings)
            now = loop.time()
            if next_at is None:  # first poll done: the next slot of this device's phase
                next_at = now - (now - phase) % interval + interval
            else:
                next_at += interval
            if next_at < now:
                # A poll took longer than the interval: skip the missed slots
                # rather than bursting to catch up (drift-free schedule).
                missed = int((now - next_at) // interval) + 1
                self.overruns += missed
                next_at += missed * interval
            await asyncio.sleep(next_at - now)


def now_ns() -> int:
    """Gateway time: ns since the Unix epoch, UTC."""
    return time.time_ns()
