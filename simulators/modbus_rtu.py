"""Modbus RTU simulator: off-gas analysers as units on one serial bus, on pseudo-terminals.

No serial hardware is needed. Two pseudo-terminals joined back to back by a
byte pump make a null-modem cable with a device path at each end:

* pymodbus' real ``ModbusSerialServer`` (RTU framer) opens one end and serves
  every simulated unit id;
* the gateway (or any Modbus RTU master) opens the other end, optionally
  through a symlink that mimics ``/dev/serial/by-id/...``.

Each unit is the off-gas analyser of :mod:`simulators.offgas` (same register
map, same process model, same encoding; see ``docs/drivers/modbus.md``). A
unit id that is not simulated does not answer, as on a real bus.

Faults, per unit: ``dead`` (requests are received and never answered) and
``exception`` (every request answers the given exception code). For the whole
bus: :meth:`RtuBusSimulator.unplug` stops the server, closes the
pseudo-terminals (the gateway's open port fails with EIO, as when a USB
adapter is pulled) and removes the symlink; :meth:`RtuBusSimulator.replug`
creates new pseudo-terminals, points the symlink at the new one and serves
again. The culture model keeps running meanwhile.

The pump timestamps the traffic: :attr:`RtuBusSimulator.turnarounds` holds,
for every request that followed an answer, the silence the master left
between the end of the answer and its request (RTU needs at least t3.5).

A pseudo-terminal carries bytes, not bits: baud rate, parity and stop bits
have no effect on it. The server's end is opened 8N1; the gateway's end takes
what the gateway configures. Some kernels and sandboxes refuse parity on a
pseudo-terminal (``termios.error: Invalid argument`` when the gateway opens
it with parity E or O); use ``parity = "N"`` with ``stopbits = 2`` there
(the spec's no-parity framing, also 11 bits per character).

Standalone::

    python -m simulators.modbus_rtu --unit-id 1 --unit-id 2 --link /tmp/rtu-bus

prints the gateway-side path on its first line, then serves until SIGINT or
SIGTERM (exit 0). Commands on stdin: ``fault dead UNIT``, ``fault exception
UNIT [CODE]``, ``fault off [UNIT]``, ``unplug``, ``replug``, ``values``,
``help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import tty
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators import console
from simulators.console import run_until_signal

# OffGasSimulator._units (its _Unit objects) is
# private to offgas.py, used on purpose: the RTU units must be the very same
# analysers (register map, process model, fault behaviour) as the TCP
# simulator's, not a copy.
from simulators.offgas import EngValue, OffGasSimulator

__all__ = ["NullModem", "RtuBusSimulator", "RtuFault", "main"]

log = logging.getLogger(__name__)

RtuFault = Literal["dead", "exception"]
TRAFFIC_LEN = 4000


class NullModem:
    """Two pseudo-terminals joined back to back: bytes written at one end come out at the other.

    ``server_path`` and ``gateway_path`` are the two ends (``gateway_path`` is
    the symlink when ``link`` is given). Both slave ends stay open here too, so
    an end the gateway closes and reopens keeps working, and are set raw at
    once so nothing is echoed before a program configures its end.
    """

    def __init__(self, link: Path | None = None) -> None:
        self.link = link
        self.server_path = ""
        self.slave_path = ""
        #: (monotonic time, "g>s" or "s>g", bytes) of every chunk pumped.
        self.traffic: deque[tuple[float, str, bytes]] = deque(maxlen=TRAFFIC_LEN)
        self.dropped = 0  # bytes lost because the far end's buffer was full
        self._fds: list[int] = []
        self._masters: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def gateway_path(self) -> str:
        return str(self.link) if self.link is not None else self.slave_path

    @property
    def is_open(self) -> bool:
        return self._masters is not None

    def open(self) -> None:
        if self._masters is not None:
            raise RuntimeError("null modem already open")
        loop = asyncio.get_running_loop()
        ends = []
        for _ in range(2):
            master, slave = os.openpty()
            self._fds += [master, slave]
            tty.setraw(slave)
            os.set_blocking(master, False)
            ends.append((master, os.ttyname(slave)))
        (server_master, self.server_path), (gateway_master, self.slave_path) = ends
        self._masters = (server_master, gateway_master)
        self._loop = loop
        loop.add_reader(server_master, self._pump, server_master, gateway_master, "s>g")
        loop.add_reader(gateway_master, self._pump, gateway_master, server_master, "g>s")
        if self.link is not None:
            self.link.parent.mkdir(parents=True, exist_ok=True)
            self.link.unlink(missing_ok=True)
            self.link.symlink_to(self.slave_path)

    def close(self) -> None:
        """Pull the plug: the ends' users get EIO, the symlink disappears."""
        if self.link is not None:
            self.link.unlink(missing_ok=True)
        if self._masters is not None and self._loop is not None:
            for fd in self._masters:
                self._loop.remove_reader(fd)
        self._masters = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def _pump(self, src: int, dst: int, direction: str) -> None:
        try:
            data = os.read(src, 4096)
        except BlockingIOError:
            return
        except OSError:  # cannot happen while we hold the slave end; never spin
            assert self._loop is not None
            self._loop.remove_reader(src)
            return
        if not data:
            return
        self.traffic.append((time.monotonic(), direction, data))
        try:
            written = os.write(dst, data)
        except BlockingIOError:
            written = 0
        self.dropped += len(data) - written


def _catch_all_device() -> SimDevice:
    # pymodbus answers unknown unit ids from device 0 (without one it logs a
    # KeyError per request); its answers are then dropped in _trace_packet.
    return SimDevice(id=0, simdata=[SimData(0, count=1, datatype=DataType.REGISTERS)])


class RtuBusSimulator:
    """Off-gas analysers as units 1-247 on one simulated RTU bus."""

    def __init__(
        self,
        unit_ids: Sequence[int] = (1, 2),
        *,
        link: Path | str | None = None,
        time_scale: float = 1.0,
        seed: int = 1,
        update_interval: float = 0.1,
    ) -> None:
        """Configure; no pseudo-terminal exists until :meth:`start`."""
        ids = list(unit_ids)
        if not ids or len(set(ids)) != len(ids) or not all(1 <= u <= 247 for u in ids):
            raise ValueError(f"unit_ids must be distinct values in 1..247, got {ids}")
        if update_interval <= 0:
            raise ValueError("update_interval must be > 0")
        # The TCP simulator, never started, is the model container: units,
        # culture model, values, history and the exception fault.
        self._model = OffGasSimulator(unit_ids=ids, time_scale=time_scale, seed=seed)
        self.update_interval = update_interval
        self._modem = NullModem(Path(link) if link is not None else None)
        self._server: ModbusSerialServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = frozenset(ids)
        self._dead: set[int] = set()
        self.unanswered = 0  # requests not answered (dead units, unknown unit ids)

    # ----------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Create the bus and serve; the model runs until :meth:`stop`."""
        if self._task is not None:
            raise RuntimeError("simulator already started")
        await self._plug()
        self._task = asyncio.create_task(self._run_updates(), name="rtu-sim-model")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.unplug()

    async def unplug(self) -> None:
        """The USB adapter is pulled: server gone, ptys closed, symlink removed."""
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
        self._modem.close()

    async def replug(self) -> None:
        """Plugged back in: new ptys (a new /dev/pts number), symlink restored."""
        if not self._modem.is_open:
            await self._plug()

    async def _plug(self) -> None:
        self._modem.open()
        # pymodbus 3.16: SimDevice datastore; the _Unit's own device definition.
        units = self._model._units  # see the import comment
        devices = [unit.sim_device() for unit in units.values()]
        devices.append(_catch_all_device())
        server = ModbusSerialServer(
            devices,
            port=self._modem.server_path,
            baudrate=19200,
            bytesize=8,
            parity="N",
            stopbits=1,
            ignore_missing_devices=True,
            trace_packet=self._trace_packet,
        )
        try:
            await server.serve_forever(background=True)
        except BaseException:
            self._modem.close()
            raise
        self._server = server

    # ---------------------------------------------------------------- paths
    @property
    def gateway_port(self) -> str:
        """Path the gateway opens: the symlink if one was asked for, else the pty."""
        return self._modem.gateway_path

    @property
    def pty_path(self) -> str:
        """The gateway-side pseudo-terminal itself (changes on replug)."""
        return self._modem.slave_path

    @property
    def plugged(self) -> bool:
        return self._modem.is_open

    @property
    def unit_ids(self) -> list[int]:
        return self._model.unit_ids

    # --------------------------------------------------------------- faults
    def set_fault(
        self, fault: RtuFault | None, exception_code: int = 4, *, unit_id: int | None = None
    ) -> None:
        """Inject a fault (``None`` clears) for one unit or, without ``unit_id``, all."""
        if fault not in (None, "dead", "exception"):
            raise ValueError(f"unknown fault {fault!r}")
        units = [unit_id] if unit_id is not None else self.unit_ids
        for u in units:
            # "silent" makes the analyser refuse writes; its answer is dropped below.
            self._model.set_fault("silent" if fault == "dead" else fault, exception_code, unit_id=u)
            if fault == "dead":
                self._dead.add(u)
            else:
                self._dead.discard(u)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        # An RTU answer starts with the unit id. Dead units and unit ids nobody
        # simulates stay silent: the master times out, as on a real bus.
        if sending and data and (data[0] in self._dead or data[0] not in self._ids):
            self.unanswered += 1
            return b""  # the transport writes nothing
        return data

    # ------------------------------------------------------------------ data
    def values(self, unit_id: int) -> dict[str, EngValue]:
        return self._model.values(unit_id)

    def registers(self, unit_id: int) -> dict[str, list[int]]:
        return self._model.registers(unit_id)

    def history_of(self, unit_id: int) -> deque[tuple[float, dict[str, EngValue]]]:
        return self._model.history_of(unit_id)

    @property
    def traffic(self) -> deque[tuple[float, str, bytes]]:
        """Chunks pumped between the ends: (monotonic time, "g>s"/"s>g", bytes)."""
        return self._modem.traffic

    @property
    def turnarounds(self) -> list[float]:
        """Seconds between the end of each answer and the next request on the wire."""
        out: list[float] = []
        last_answer: float | None = None
        for t, direction, _ in self._modem.traffic:
            if direction == "s>g":
                last_answer = t
            elif last_answer is not None:
                out.append(t - last_answer)
                last_answer = None
        return out

    async def _run_updates(self) -> None:
        while True:
            await asyncio.sleep(self.update_interval)
            try:
                self._model.tick()
            except Exception:  # keep serving even if one update misbehaves
                log.exception("off-gas model update failed")


# ---------------------------------------------------------------- CLI runner
_HELP = (
    "commands: fault dead UNIT | fault exception UNIT [CODE] | fault off [UNIT] | "
    "unplug | replug | values | help"
)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def unit_id(text: str) -> int:
        value = int(text)
        if not 1 <= value <= 247:
            raise argparse.ArgumentTypeError("unit id must be 1..247")
        return value

    parser = argparse.ArgumentParser(
        prog="gateway simulate modbus-rtu",
        description="Modbus RTU bus of off-gas analysers on a pseudo-terminal. "
        "Prints the gateway-side path first. " + _HELP + " (on stdin)",
    )
    parser.add_argument(
        "--unit-id", type=unit_id, action="append", dest="unit_ids", help="repeatable; default 1 2"
    )
    parser.add_argument(
        "--link",
        type=Path,
        help="create this symlink to the gateway's end (like /dev/serial/by-id)",
    )
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--update-interval", type=float, default=0.1, help="wall seconds")
    return parser.parse_args(argv)


async def _handle_command(sim: RtuBusSimulator, line: str) -> None:
    words = line.split()
    if not words:
        return
    try:
        cmd = words[0]
        if cmd == "values" and len(words) == 1:
            for unit in sim.unit_ids:
                print(json.dumps({"unit": unit, **sim.values(unit)}), flush=True)
            return
        if cmd == "unplug" and len(words) == 1:
            await sim.unplug()
        elif cmd == "replug" and len(words) == 1:
            await sim.replug()
            print(sim.gateway_port, flush=True)
        elif cmd == "fault" and len(words) >= 2:
            kind, rest = words[1], [int(w) for w in words[2:]]
            if kind == "off" and len(rest) <= 1:
                sim.set_fault(None, unit_id=rest[0] if rest else None)
            elif kind == "dead" and len(rest) == 1:
                sim.set_fault("dead", unit_id=rest[0])
            elif kind == "exception" and len(rest) in (1, 2):
                sim.set_fault("exception", rest[1] if len(rest) == 2 else 4, unit_id=rest[0])
            else:
                raise ValueError(f"bad fault command {line.strip()!r}")
        else:
            print(_HELP, flush=True)
            return
        print(f"ok: {line.strip()}", flush=True)
    except ValueError as exc:
        print(f"error: {exc}; {_HELP}", flush=True)


async def _serve(args: argparse.Namespace) -> int:
    sim = RtuBusSimulator(
        args.unit_ids or [1, 2],
        link=args.link,
        time_scale=args.time_scale,
        seed=args.seed,
        update_interval=args.update_interval,
    )
    try:
        await sim.start()
    except (OSError, RuntimeError) as exc:
        print(f"modbus rtu simulator: cannot start: {exc}", file=sys.stderr)
        return 1
    print(sim.gateway_port, flush=True)
    print(
        f"modbus rtu simulator: units {sim.unit_ids} on {sim.gateway_port} (pty {sim.pty_path})",
        file=sys.stderr,
        flush=True,
    )
    return await run_until_signal(lambda line: _handle_command(sim, line), sim.stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the process exit code."""
    return console.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
