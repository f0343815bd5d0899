"""Shared Modbus RTU serial buses: several devices (unit ids) on one serial port.

An RTU bus is one serial line with one master (the gateway) and up to 247
units. Every ``[[devices]]`` block with ``transport = "rtu"`` is one unit; the
blocks naming the same port (after resolving symlinks such as
``/dev/serial/by-id/...``) share one :class:`RtuBus`: one open port, one
pymodbus client, one request on the wire at a time.

* **Registry.** :func:`acquire` returns the bus of a port, creating and
  opening it for the first device; :func:`release` drops a device's reference
  and closes the port when the last device lets go. A bus whose port vanished
  (USB unplug) is taken out of the registry at once, so a device reconnecting
  after its backoff opens a fresh bus while the others still hold the dead one.
* **Turns.** Requests are serialized by :class:`_Turns`. pymodbus does not
  enforce the RTU inter-frame silence (its framer only decodes), so the bus
  keeps the line quiet for t3.5 after the end of every transaction (answer
  received or timed out) before the next request goes out: 3.5 characters of
  11 bits, and a fixed 1.75 ms above 19200 baud (Modbus over serial line
  V1.02, 2.5.1.1).
* **Fairness.** A unit whose last request went unanswered ("suspect") waits
  behind the requests of units that answer, and the next requester is chosen
  when the silence ends. A responsive device queues its next request of the
  same poll without yielding to the event loop after the previous one ends,
  so a whole poll of a healthy unit goes ahead of a dead unit's queue: a dead
  unit costs the others at most the one request of its that is on the wire
  (its ``timeout``) per poll. A suspect unit is passed over at most
  ``MAX_BYPASS`` times in a row, so it is never starved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import structlog
from pymodbus.client import AsyncModbusSerialClient

__all__ = [
    "CHAR_BITS",
    "MAX_BYPASS",
    "BusError",
    "RtuBus",
    "SerialSettings",
    "acquire",
    "buses",
    "frame_gap",
    "release",
]

T = TypeVar("T")

CHAR_BITS: Final = 11
"""Bits of one RTU character: start, 8 data, parity (or a 2nd stop bit), stop."""
MAX_BYPASS: Final = 16
"""Requests of answering units that may go ahead of a timing-out unit's, in a row."""
# pymodbus' own response timeout: longer than any device's (config allows 60 s),
# so the per-device timeout applied in RtuBus.transact is the one that acts.
_CLIENT_TIMEOUT: Final = 120.0

log = structlog.get_logger("gateway.driver.modbus.bus")


def frame_gap(baudrate: int) -> float:
    """t3.5 in seconds: the silence that separates two RTU frames."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * CHAR_BITS / baudrate


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """Line settings; every unit on one bus must use the same."""

    baudrate: int = 19200
    bytesize: int = 8
    parity: str = "E"
    stopbits: int = 1

    def __str__(self) -> str:
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


class BusError(Exception):
    """The bus cannot be used: the port is missing, cannot be opened, or vanished."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Turns:
    """Who talks next: one transaction at a time, with ``gap`` of silence in between.

    The next holder is chosen when the silence after a transaction ends, not
    when the previous holder releases: answering units first in arrival order,
    then units whose last request timed out ("suspect"), which may be passed
    over at most ``MAX_BYPASS`` times in a row.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, gap: float) -> None:
        self._loop = loop
        self._gap = gap
        self._busy = False
        self._quiet_until = 0.0
        self._waiters: list[tuple[bool, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._bypassed = 0

    async def acquire(self, suspect: bool) -> None:
        if not self._busy and not self._waiters and self._loop.time() >= self._quiet_until:
            self._busy = True
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        entry = (suspect, fut)
        self._waiters.append(entry)
        self._wake()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just before the cancellation: pass the turn on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def release(self) -> None:
        self._busy = False
        self._quiet_until = self._loop.time() + self._gap
        self._wake()

    def _wake(self) -> None:
        if self._busy or self._timer is not None or not self._waiters:
            return
        # call_at with a time in the past runs on the next loop iteration.
        self._timer = self._loop.call_at(self._quiet_until, self._grant)

    def _grant(self) -> None:
        self._timer = None
        self._waiters = [w for w in self._waiters if not w[1].done()]  # cancelled ones
        if self._busy or not self._waiters:
            return
        answering = next((w for w in self._waiters if not w[0]), None)
        suspect = next((w for w in self._waiters if w[0]), None)
        if suspect is None:
            pick, self._bypassed = answering, 0
        elif answering is None or self._bypassed >= MAX_BYPASS:
            pick, self._bypassed = suspect, 0
        else:
            pick = answering
            self._bypassed += 1
        assert pick is not None
        self._waiters.remove(pick)
        self._busy = True
        pick[1].set_result(None)


class RtuBus:
    """One open serial port shared by the devices (units) on it."""

    def __init__(
        self, path: str, label: str, settings: SerialSettings, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.path = path  # resolved device path: the registry key
        self.label = label  # as configured, with the resolved path when different
        self.settings = settings
        self.gap = frame_gap(settings.baudrate)
        self.loop = loop
        self.users: set[str] = set()  # device ids holding a reference
        self.requests = 0
        self.timeouts = 0
        self._open_task: asyncio.Task[None] | None = None
        self._opened = False
        self._dead: str | None = None  # why the bus is unusable, once it is
        self._suspect: set[str] = set()  # devices whose last request timed out
        self._inflight: asyncio.Timeout | None = None  # timeout of the request on the wire
        self._client = AsyncModbusSerialClient(
            path,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            timeout=_CLIENT_TIMEOUT,
            retries=0,  # a retry would hide a timeout and hold the bus twice as long
            reconnect_delay=0,  # the supervisors own reconnection
            name=f"rtu {path}",
            trace_connect=self._on_connect,
        )
        self._turns = _Turns(loop, self.gap)

    # ----------------------------------------------------------- state
    @property
    def dead(self) -> str | None:
        """Why the bus cannot be used any more (None while it can)."""
        if self._dead is None and self._opened and not self._client.connected:
            self._fail(f"serial port {self.label} closed (device unplugged?)")
        return self._dead

    def _fail(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
            if self._opened:  # failures to open are the devices' to report
                log.warning("serial bus lost", port=self.label, reason=reason)
        self._detach()

    def _on_connect(self, connected: bool) -> None:
        # pymodbus calls this when the port fails (EIO on unplug). It does not
        # fail the request in flight, so end that request's wait now instead
        # of letting it run into its timeout.
        if not connected and self._inflight is not None:
            self._inflight.reschedule(self.loop.time())

    def _detach(self) -> None:
        if _buses.get(self.path) is self:
            del _buses[self.path]

    def _check(self) -> None:
        if (reason := self.dead) is not None:
            raise BusError(reason)

    # ------------------------------------------------------- lifecycle
    async def open(self) -> None:
        """Open the port (once; concurrent callers share the attempt)."""
        if self._open_task is None:
            self._open_task = self.loop.create_task(self._open(), name=f"open {self.path}")
            # Retrieve the exception even if every waiter was cancelled.
            self._open_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._open_task)
        self._check()

    async def _open(self) -> None:
        if (problem := _access_problem(self.path)) is not None:
            self._fail(f"serial port {self.label} {problem}")
            raise BusError(self._dead or "")
        try:
            opened = await self._client.connect()
            detail = "in use by another program, or the settings are refused"
        except Exception as exc:  # pyserial/termios errors that pymodbus lets through
            kind = type(exc)
            name = (
                kind.__name__
                if kind.__module__ == "builtins"
                else f"{kind.__module__}.{kind.__qualname__}"
            )
            opened, detail = False, f"{name}: {exc}"
        if not opened:
            self._fail(f"cannot open serial port {self.label} at {self.settings} ({detail})")
            raise BusError(self._dead or "")
        self._opened = True
        log.info(
            "serial bus open",
            port=self.label,
            settings=str(self.settings),
            gap_ms=round(self.gap * 1000, 3),
        )

    def close(self) -> None:
        """Close the port now (the registry forgets the bus)."""
        if self._dead is None:
            self._dead = f"serial port {self.label} closed by the gateway"
        self._detach()
        if self._open_task is not None and not self._open_task.done():
            self._open_task.cancel()
        self._client.close()
        if self._opened:
            self._opened = False
            log.info("serial bus closed", port=self.label, requests=self.requests)

    # -------------------------------------------------------- requests
    async def transact(
        self,
        device: str,
        call: Callable[[AsyncModbusSerialClient], Awaitable[T]],
        timeout: float,
    ) -> T:
        """Run one request/answer exchange in this device's turn.

        Raises ``TimeoutError`` when no answer came within ``timeout`` seconds
        of sending, and :class:`BusError` when the port is gone.
        """
        self._check()
        await self._turns.acquire(device in self._suspect)
        try:
            self._check()
            self.requests += 1
            try:
                async with asyncio.timeout(timeout) as self._inflight:
                    result = await call(self._client)
            except TimeoutError:
                self._check()  # a vanished port is not a silent unit
                self.timeouts += 1
                self._suspect.add(device)
                raise
            self._suspect.discard(device)
            return result
        finally:
            self._inflight = None
            self._turns.release()


_buses: dict[str, RtuBus] = {}


# Path lookups on /dev are in-memory file systems: plain calls, not threads.
def _resolve(port: str) -> str:
    return os.path.realpath(port)


def _access_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return "not found (unplugged?)"
    if not os.access(path, os.R_OK | os.W_OK):
        return "not accessible (add the gateway's user to the group owning it, often 'dialout')"
    return None


def buses() -> dict[str, RtuBus]:
    """The open buses by resolved port path (a copy; for diagnostics and tests)."""
    return dict(_buses)


async def acquire(port: str, settings: SerialSettings, device: str) -> RtuBus:
    """The bus on ``port`` for ``device``, opened by the first device that asks.

    Raises :class:`BusError` when the port cannot be opened or another device
    opened it with different line settings.
    """
    path = _resolve(port)
    label = port if path == port else f"{port} ({path})"
    loop = asyncio.get_running_loop()
    bus = _buses.get(path)
    if bus is None or bus.dead is not None or bus.loop is not loop:
        bus = RtuBus(path, label, settings, loop)
        _buses[path] = bus
    elif bus.settings != settings:
        raise BusError(
            f"serial port {label} is open at {bus.settings} for "
            f"{', '.join(sorted(bus.users)) or 'another device'}, this device asks for "
            f"{settings}: all units on one bus must use the same line settings"
        )
    bus.users.add(device)
    try:
        await bus.open()
    except BaseException:
        release(bus, device)
        raise
    return bus


def release(bus: RtuBus, device: str) -> None:
    """Drop ``device``'s reference; the last one closes the port."""
    bus.users.discard(device)
    if not bus.users:
        bus.close()
