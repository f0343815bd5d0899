"""Serial instrument simulators on pseudo-terminals: an MT-SICS balance and a streaming meter.

Each instrument opens a pty pair: the gateway opens the slave (``.port``, e.g.
/dev/pts/7) with pyserial exactly as it would a USB adapter's tty, and the
simulator talks on the master. ``.link`` is a symlink to the slave in a
directory of its own, standing in for /dev/serial/by-id/...: configure the
gateway with the link, and "unplug" / "replug" behave like a USB adapter
re-enumerating (the tty hangs up and the link disappears; then a new tty
appears, usually under another /dev/pts number, and the link points to it).

Faults, on demand (``set_fault(kind, arg, count)``; ``count`` lines, or until
cleared with ``set_fault(None)``):

=============  ==============================================================
``garbage``    random bytes (no terminator inside) instead of the line
``silence``    nothing is sent (commands are still read)
``partial``    only the first half of the line, no terminator
``overlong``   ``arg`` (default 2000) bytes of junk, then the terminator
``checksum``   meter: a wrong checksum
``error``      balance: the error reply ``arg`` instead of a weight
               (``I`` busy, ``+`` overload, ``-`` underload, ``ES``, ``ET``, ``EL``)
``dynamic``    balance: every weight reported dynamic (``S D``)
=============  ==============================================================

The balance (:class:`MtSicsBalance`) answers MT-SICS ``SI``, ``S``, ``SIR``,
``Z``, ``T`` and ``@`` for a sample being dispensed: the weight rises (dynamic)
then settles (stable), once per ``cycle`` seconds. The meter
(:class:`StreamingMeter`) sends ``pH=7.02;T=25.1;DO=41.2*CS`` every
``interval`` seconds (``CS``: XOR of the bytes before ``*``, two hex digits)
and answers ``READ`` with one such line.

Standalone: ``python -m simulators.serial_instruments --instrument balance``
prints ``balance on /dev/pts/N link /tmp/.../usb-...`` on its first line,
reads commands on stdin (``help`` lists them) and exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulators import console
from simulators.console import run_until_signal

__all__ = [
    "FAULTS",
    "MtSicsBalance",
    "PtyInstrument",
    "StreamingMeter",
    "main",
    "xor_checksum",
]

FAULTS = ("garbage", "silence", "partial", "overlong", "checksum", "error", "dynamic")
BALANCE_ERRORS = {"I": "S I", "+": "S +", "-": "S -", "ES": "ES", "ET": "ET", "EL": "EL"}
# Garbage never holds a line end or the XON/XOFF flow-control characters.
_GARBAGE = bytes(b for b in range(256) if b not in b"\r\n\x11\x13")


_DECIMALS = {"pH": 2, "T": 1, "DO": 1}


def xor_checksum(data: bytes) -> str:
    acc = 0
    for b in data:
        acc ^= b
    return f"{acc:02X}"


@dataclass
class Fault:
    kind: str
    arg: str | None = None
    remaining: int | None = None  # lines left; None: until cleared


class PtyInstrument:
    """An instrument on a pty pair; subclasses answer commands and may stream lines."""

    terminator = b"\r\n"
    default_link_name = "usb-Simulated_Instrument-if00-port0"

    def __init__(
        self, *, link_dir: str | Path | None = None, link_name: str | None = None, seed: int = 1
    ) -> None:
        self._own_dir = link_dir is None
        self._link_dir = Path(link_dir) if link_dir is not None else None
        self.link_name = link_name or self.default_link_name
        self.rng = random.Random(seed)
        self.port = ""  # the slave tty, e.g. /dev/pts/7 (changes on replug)
        self.fault: Fault | None = None
        self.commands: list[str] = []  # every command received, in order
        self.lines_sent = 0
        self._master: int | None = None
        self._slave: int | None = None
        self._inbuf = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle --------------------------------------------------------------------

    @property
    def link(self) -> Path:
        """The stable path (a symlink to ``port``, absent while unplugged)."""
        assert self._link_dir is not None, "start() first"
        return self._link_dir / self.link_name

    @property
    def plugged(self) -> bool:
        return self._master is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._link_dir is None:
            self._link_dir = Path(tempfile.mkdtemp(prefix="serial-sim-"))
        self._link_dir.mkdir(parents=True, exist_ok=True)
        self.replug()

    async def stop(self) -> None:
        self.unplug()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._own_dir and self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)

    def unplug(self) -> None:
        """Like pulling the USB adapter: the tty hangs up and the link disappears."""
        self.on_unplug()
        if self._master is not None and self._loop is not None:
            self._loop.remove_reader(self._master)
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        self._inbuf.clear()
        if self._link_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def replug(self) -> None:
        """A new tty (usually another /dev/pts number) and the link re-pointed to it."""
        assert self._loop is not None, "start() first"
        if self.plugged:
            self.unplug()
        master, slave = os.openpty()
        # Raw at once: a cooked pty would echo our own output back to us as input.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.port = os.ttyname(slave)
        tmp = self.link.with_name(self.link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self.port, tmp)
        os.replace(tmp, self.link)  # atomic: the link is never half-made
        self._loop.add_reader(master, self._on_readable)
        self.on_plug()

    def on_plug(self) -> None:
        """Hook: the instrument was (re)connected."""

    def on_unplug(self) -> None:
        """Hook: the instrument is being disconnected."""

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- faults -----------------------------------------------------------------------

    def set_fault(self, kind: str | None, arg: str | None = None, count: int | None = None) -> None:
        """Inject ``kind`` for the next ``count`` lines (None: until cleared); None clears."""
        if kind is None:
            self.fault = None
            return
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; faults: {', '.join(FAULTS)}")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        self.fault = Fault(kind, arg, count)

    def _next_fault(self) -> Fault | None:
        f = self.fault
        if f is None:
            return None
        if f.remaining is not None:
            f.remaining -= 1
            if f.remaining <= 0:
                self.fault = None
        return f

    # --- I/O --------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._master is None:
            return
        try:
            chunk = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            return
        self._inbuf += chunk
        if len(self._inbuf) > 4096 and b"\n" not in self._inbuf and b"\r" not in self._inbuf:
            self._inbuf.clear()  # junk without a line end: drop it like a real instrument
        while True:
            cut = min(
                (i for i in (self._inbuf.find(b"\r"), self._inbuf.find(b"\n")) if i >= 0),
                default=-1,
            )
            if cut < 0:
                break
            raw = bytes(self._inbuf[:cut])
            del self._inbuf[: cut + 1]
            command = raw.decode("ascii", "replace").strip()
            if command:
                self.commands.append(command)
                self.handle(command)

    def handle(self, command: str) -> None:
        """Answer one command line (subclasses)."""

    def write_raw(self, data: bytes) -> None:
        if self._master is None:
            return
        # Like a line nobody reads: what does not fit in the tty buffer is lost.
        with contextlib.suppress(OSError):
            os.write(self._master, data)

    def send(self, render: Callable[[Fault | None], str]) -> None:
        """Send one line built by ``render`` (given the fault for this line, if any)."""
        fault = self._next_fault()
        kind = fault.kind if fault is not None else None
        if kind == "silence" or not self.plugged:
            return
        data = render(fault).encode("ascii")
        if kind == "garbage":
            data = bytes(self.rng.choice(_GARBAGE) for _ in range(self.rng.randint(3, 40)))
        elif kind == "partial":
            self.write_raw(data[: max(1, len(data) // 2)])
            self.lines_sent += 1
            return
        elif kind == "overlong":
            size = int(fault.arg) if fault is not None and fault.arg else 2000
            data = bytes(self.rng.choice(b"0123456789ABCDEF=;.") for _ in range(size))
        self.write_raw(data + self.terminator)
        self.lines_sent += 1

    def values(self) -> dict[str, Any]:
        """What the instrument would report now (subclasses)."""
        return {}


class MtSicsBalance(PtyInstrument):
    """A Mettler Toledo balance speaking MT-SICS, a sample being dispensed onto it.

    Every ``cycle`` seconds (x ``time_scale``) a portion of 2 to 15 g lands on the
    pan: for the first half of the cycle the weight rises towards the new total
    with noise (dynamic, ``S D``), then it is stable (``S S``) at the total
    rounded to the readability. After 8 portions the container is emptied.
    ``set_weight`` pins the weight instead (for tests); ``set_weight(None)``
    resumes dispensing.
    """

    default_link_name = "usb-Mettler_Toledo_Simulated_Balance-if00-port0"

    def __init__(
        self,
        *,
        capacity: float = 220.0,
        decimals: int = 3,
        unit: str = "g",
        cycle: float = 4.0,
        time_scale: float = 1.0,
        sir_interval: float = 0.1,
        serial_number: str = "B123456789",
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.capacity = capacity
        self.decimals = decimals
        self.unit = unit
        self.cycle = cycle
        self.time_scale = time_scale
        self.sir_interval = sir_interval
        self.serial_number = serial_number
        self.tare = 0.0
        self.zero = 0.0
        self.pinned: tuple[float, bool] | None = None
        self._t0 = time.monotonic()
        self._portions: list[float] = []
        self._sir: asyncio.Task[None] | None = None

    # --- the weight -------------------------------------------------------------------

    def set_weight(self, grams: float | None, stable: bool = True) -> None:
        """Pin the gross weight (None: back to dispensing)."""
        self.pinned = None if grams is None else (grams, stable)

    def _portion(self, i: int) -> float:
        while len(self._portions) <= i:
            self._portions.append(round(self.rng.uniform(2.0, 15.0), self.decimals))
        return self._portions[i]

    def gross(self) -> tuple[float, bool]:
        """(gross weight, stable) now."""
        if self.pinned is not None:
            return self.pinned
        t = (time.monotonic() - self._t0) * self.time_scale
        n, phase = divmod(t / self.cycle, 1.0)
        i = int(n)
        first = i - i % 8  # container emptied every 8 portions
        before = sum(self._portion(k) for k in range(first, i))
        if phase >= 0.5:
            return before + self._portion(i), True
        rise = self._portion(i) * (1.0 - math.exp(-phase * 12.0))
        return before + rise + self.rng.gauss(0.0, 0.004), False

    def net(self) -> tuple[float, bool]:
        g, stable = self.gross()
        return g - self.tare - self.zero, stable

    def values(self) -> dict[str, Any]:
        w, stable = self.net()
        return {
            "weight": round(w, self.decimals),
            "unit": self.unit,
            "stable": stable,
            "tare": self.tare,
            "sir": self._sir is not None,
        }

    # --- the protocol -----------------------------------------------------------------

    def _weight_line(self, fault: Fault | None, *, force_stable: bool = False) -> str:
        if fault is not None and fault.kind == "error":
            return BALANCE_ERRORS.get(fault.arg or "I", fault.arg or "S I")
        w, stable = self.net()
        gross, _ = self.gross()
        if gross > self.capacity:
            return "S +"
        if gross < -0.05 * self.capacity:
            return "S -"
        if fault is not None and fault.kind == "dynamic":
            stable = False
        flag = "S" if stable or force_stable else "D"
        return f"S {flag} {w:>10.{self.decimals}f} {self.unit}"

    def handle(self, command: str) -> None:
        word = command.split()[0].upper()
        if word != "SIR":
            self._stop_sir()
        if word == "SI":
            self.send(self._weight_line)
        elif word == "S":
            self.spawn(self._stable_reply())
        elif word == "SIR":
            self._stop_sir()
            self._sir = self.spawn(self._repeat())
        elif word == "Z":
            self.zero = self.gross()[0] - self.tare
            self.send(lambda f: "Z A")
        elif word == "T":
            self.tare = self.gross()[0] - self.zero
            self.send(lambda f: f"T S {self.tare:>10.{self.decimals}f} {self.unit}")
        elif word == "@":
            self.tare = 0.0
            self.send(lambda f: f'I4 A "{self.serial_number}"')
        else:
            self.send(lambda f: "ES")

    async def _stable_reply(self, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.net()[1] and not (self.fault and self.fault.kind == "dynamic"):
                self.send(self._weight_line)
                return
            await asyncio.sleep(0.05)
        self.send(lambda f: "S I")  # no stable weight within the balance's own limit

    async def _repeat(self) -> None:
        while True:
            self.send(self._weight_line)
            await asyncio.sleep(self.sir_interval)

    def _stop_sir(self) -> None:
        if self._sir is not None:
            self._sir.cancel()
            self._sir = None

    def on_unplug(self) -> None:
        self._stop_sir()  # a re-enumerated balance has forgotten SIR


class StreamingMeter(PtyInstrument):
    """A pH / temperature / DO meter streaming ``pH=7.02;T=25.1;DO=41.2*CS`` lines.

    ``interval`` None: it only answers ``READ``. ``set_values`` pins values.
    """

    default_link_name = "usb-Simulated_Meter-if00-port0"

    def __init__(
        self,
        *,
        interval: float | None = 0.2,
        checksum: bool = True,
        time_scale: float = 1.0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.interval = interval
        self.checksum = checksum
        self.time_scale = time_scale
        self.pinned: dict[str, float] | None = None
        self._t0 = time.monotonic()
        self._streamer: asyncio.Task[None] | None = None

    def set_values(self, values: dict[str, float] | None) -> None:
        self.pinned = dict(values) if values is not None else None

    def values(self) -> dict[str, Any]:
        if self.pinned is not None:
            return dict(self.pinned)
        t = (time.monotonic() - self._t0) * self.time_scale
        return {
            "pH": round(7.0 + 0.05 * math.sin(t / 60.0) + self.rng.gauss(0, 0.003), 2),
            "T": round(25.0 + 0.4 * math.sin(t / 300.0) + self.rng.gauss(0, 0.02), 1),
            "DO": round(40.0 + 2.0 * math.sin(t / 120.0) + self.rng.gauss(0, 0.1), 1),
        }

    def render(self, fault: Fault | None) -> str:
        v = self.values()
        body = ";".join(f"{k}={val:.{_DECIMALS.get(k, 2)}f}" for k, val in v.items())
        if not self.checksum:
            return body
        cs = xor_checksum(body.encode("ascii"))
        if fault is not None and fault.kind == "checksum":
            cs = f"{int(cs, 16) ^ 0x5A:02X}"
        return f"{body}*{cs}"

    def handle(self, command: str) -> None:
        if command.upper() == "READ":
            self.send(self.render)

    def on_plug(self) -> None:
        if self.interval is not None and self._streamer is None:
            self._streamer = self.spawn(self._stream())

    async def _stream(self) -> None:
        assert self.interval is not None
        while True:
            await asyncio.sleep(self.interval)
            if self.plugged:
                self.send(self.render)


# --- CLI ------------------------------------------------------------------------------

_HELP = (
    "commands: fault garbage|silence|partial|overlong|checksum|dynamic [count] | "
    "fault error I|+|-|ES|ET|EL [count] | fault off | unplug | replug | "
    "weight <g> [stable|dynamic] | weight auto | values | help"
)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gateway simulate serial",
        description="Serial instrument simulator on a pty. " + _HELP + " (on stdin)",
    )
    parser.add_argument("--instrument", choices=["balance", "meter"], required=True)
    parser.add_argument("--link-dir", type=Path, help="where the stable link goes (a temp dir)")
    parser.add_argument("--link-name", help="name of the link (like a /dev/serial/by-id name)")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="meter: seconds between lines; 0: answer READ only",
    )
    parser.add_argument("--no-checksum", action="store_true", help="meter: no *CS suffix")
    parser.add_argument("--cycle", type=float, default=4.0, help="balance: s per portion")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def _handle_command(inst: PtyInstrument, line: str) -> None:
    words = line.split()
    if not words:
        return
    try:
        if words == ["values"]:
            print(json.dumps({"port": inst.port, **inst.values()}), flush=True)
            return
        if words == ["unplug"]:
            inst.unplug()
        elif words == ["replug"]:
            inst.replug()
            print(f"port {inst.port} link {inst.link}", flush=True)
        elif words[0] == "fault" and len(words) >= 2:
            kind = words[1]
            if kind == "off" and len(words) == 2:
                inst.set_fault(None)
            elif kind == "error" and 3 <= len(words) <= 4:
                if words[2] not in BALANCE_ERRORS:
                    raise ValueError(f"error must be one of {' '.join(BALANCE_ERRORS)}")
                inst.set_fault("error", words[2], int(words[3]) if len(words) == 4 else None)
            elif kind in FAULTS and kind != "error" and len(words) <= 3:
                inst.set_fault(kind, None, int(words[2]) if len(words) == 3 else None)
            else:
                raise ValueError(f"bad fault command {line.strip()!r}")
        elif words[0] == "weight" and isinstance(inst, MtSicsBalance) and len(words) in (2, 3):
            if words[1] == "auto":
                inst.set_weight(None)
            else:
                stable = len(words) == 2 or words[2] == "stable"
                if len(words) == 3 and words[2] not in ("stable", "dynamic"):
                    raise ValueError("weight <g> [stable|dynamic]")
                inst.set_weight(float(words[1]), stable)
        else:
            print(_HELP, flush=True)
            return
        print(f"ok: {line.strip()}", flush=True)
    except ValueError as exc:
        print(f"error: {exc}; {_HELP}", flush=True)


async def _serve(args: argparse.Namespace) -> int:
    inst: PtyInstrument
    common: dict[str, Any] = {
        "link_dir": args.link_dir,
        "link_name": args.link_name,
        "seed": args.seed,
    }
    if args.instrument == "balance":
        inst = MtSicsBalance(cycle=args.cycle, **common)
    else:
        interval = args.interval if args.interval > 0 else None
        inst = StreamingMeter(interval=interval, checksum=not args.no_checksum, **common)
    try:
        await inst.start()
    except OSError as exc:
        print(f"serial simulator: cannot create the pty or link: {exc}", file=sys.stderr)
        return 1
    print(f"{args.instrument} on {inst.port} link {inst.link}", flush=True)

    return await run_until_signal(lambda line: _handle_command(inst, line), inst.stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the process exit code."""
    return console.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
