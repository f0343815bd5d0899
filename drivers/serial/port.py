"""One serial port, read by the event loop: open/close in a thread, I/O on readiness.

Why ``loop.add_reader`` on pyserial's non-blocking file descriptor, and not a
reader thread:

* pyserial opens the port with ``O_NONBLOCK`` and uses ``select`` itself, so
  the descriptor is made for readiness-driven I/O. A callback reads whatever
  arrived (``os.read`` never blocks here) into the :class:`LineFramer`, and
  never sleeps or waits.
* Nothing read is ever lost to a cancellation. With a thread, a timeout or
  shutdown that cancels the awaiting task leaves the thread's ``read`` running,
  and the bytes it returns have nobody to go to. Here bytes go to the framer
  as they arrive, whoever is (or is not) waiting for a line.
* An unplugged adapter is seen at once, even between two polls: the kernel
  hangs the tty up, the descriptor becomes readable and ``read`` returns
  nothing (or EIO). A thread would only notice on its next read.
* No thread per port, and cancellation is immediate: shutdown never waits for
  a blocked read to time out.

The calls that may block run in a worker thread: opening (``open`` and
``tcsetattr``, which a struggling USB adapter driver can hold up) and closing
(``close`` of a tty can wait for pending output to drain). Both are bounded by
the supervisor (connect timeout, 5 s close); an open that completes after its
caller gave up is closed at once. Writes are small and non-blocking; if the
tty does not take them (flow control holding them), ``add_writer`` waits, up
to the exchange's deadline. This needs a POSIX descriptor, which the gateway's
Linux targets have; Windows COM ports would need a reader thread instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections import deque

import serial  # type: ignore[import-untyped,unused-ignore]

from drivers.serial.config import PortSettings
from drivers.serial.parse import Event, LineFramer

READ_CHUNK = 4096
VANISHED = "port vanished (device disconnected)"
MAX_QUEUED = 256  # complete lines waiting for the driver; older ones are dropped beyond

_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}


class SerialPortError(Exception):
    """The port cannot be opened, or it failed or vanished; the message says which."""


class SerialPort:
    """An open serial port that frames what it receives into lines.

    ``open`` then ``next_event``/``write`` (from one task at a time), then
    ``close``. After a failure every call raises :class:`SerialPortError`;
    lines received before it are still delivered first.
    """

    def __init__(self, settings: PortSettings, framer: LineFramer) -> None:
        self.settings = settings
        self.framer = framer
        self.device: str | None = None  # what the path resolved to when opened
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0  # complete lines dropped because the driver fell behind
        self._serial: serial.Serial | None = None
        self._fd: int | None = None
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- open / close -------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        fut = loop.run_in_executor(None, self._open_blocking)
        try:
            ser, device = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread cannot be stopped: close the port if it opens after all.
            fut.add_done_callback(_close_late)
            raise
        self._serial, self.device = ser, device
        self._fd = int(ser.fileno())
        self.framer.reset()
        loop.add_reader(self._fd, self._on_readable)

    def _open_blocking(self) -> tuple[serial.Serial, str]:
        s = self.settings
        ser = serial.Serial()
        ser.port = s.path
        ser.baudrate = s.baudrate
        ser.bytesize = s.bytesize
        ser.parity = _PARITY[s.parity]
        ser.stopbits = s.stopbits if s.stopbits == 1.5 else int(s.stopbits)
        ser.rtscts = s.flow_control == "rtscts"
        ser.xonxoff = s.flow_control == "xonxoff"
        ser.exclusive = s.exclusive
        ser.timeout = 0  # never block: reads happen only when the fd is readable
        ser.write_timeout = 0
        try:
            ser.open()  # also flushes the input the kernel buffered while closed
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SerialPortError(_open_reason(s.path, exc, s.exclusive)) from None
        return ser, os.path.realpath(s.path)

    async def close(self) -> None:
        """Release the port; never raises."""
        self._detach("port closed")
        ser, self._serial = self._serial, None
        if ser is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(_close_blocking, ser)

    def _detach(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = None
        self._ready.set()

    # --- receiving ------------------------------------------------------------------

    def _on_readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._detach(_io_reason(exc))
            return
        if not data:
            # Readable yet empty: the tty was hung up (adapter unplugged, device gone).
            self._detach(VANISHED)
            return
        self.bytes_in += len(data)
        events = self.framer.feed(data)
        if events:
            for ev in events:
                if len(self._events) >= MAX_QUEUED:
                    self._events.popleft()
                    self.dropped += 1
                self._events.append(ev)
            self._ready.set()

    async def next_event(self, deadline: float) -> Event | None:
        """The next line (or over-long line) received; None if none by ``deadline``
        (``loop.time()``); SerialPortError once the port has failed."""
        while True:
            if self._events:
                return self._events.popleft()
            if self._error is not None:
                raise SerialPortError(self._error)
            self._ready.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ready.wait()
            except TimeoutError:
                if not self._events and self._error is None:
                    return None

    def discard_input(self) -> tuple[int, bytes]:
        """Drop lines not yet taken and the unfinished line: (lines dropped, partial bytes)."""
        n = len(self._events)
        self._events.clear()
        return n, self.framer.reset()

    @property
    def failed(self) -> str | None:
        return self._error

    # --- sending --------------------------------------------------------------------

    async def write(self, data: bytes, deadline: float) -> None:
        """Write all of ``data`` by ``deadline``; SerialPortError if the port failed or
        does not take the bytes in time (e.g. hardware flow control holds them)."""
        view = memoryview(data)
        while view:
            fd = self._fd
            if fd is None or self._error is not None:
                raise SerialPortError(self._error or "port not open")
            try:
                n = os.write(fd, view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._detach(_io_reason(exc))
                raise SerialPortError(self._error or "port failed") from None
            self.bytes_out += n
            view = view[n:]
            if view:
                await self._writable(fd, deadline)

    async def _writable(self, fd: int, deadline: float) -> None:
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._loop.add_writer(fd, ready)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            raise SerialPortError(
                "the port does not take data (flow control holding it, or no device)"
            ) from None
        finally:
            if self._fd == fd:
                self._loop.remove_writer(fd)


def _io_reason(exc: OSError) -> str:
    # A hung-up tty (unplugged adapter) fails reads and writes with EIO; a
    # removed device node can also give ENXIO or ENODEV.
    if exc.errno in (errno.EIO, errno.ENXIO, errno.ENODEV):
        return VANISHED
    return f"port failed: {exc.strerror or exc}"


def _open_reason(path: str, exc: BaseException, exclusive: bool) -> str:
    code = getattr(exc, "errno", None)
    if exclusive and code in (errno.EAGAIN, errno.EWOULDBLOCK):
        return f"cannot open {path}: in use by another program (exclusive lock)"
    if isinstance(code, int) and code > 0:
        return f"cannot open {path}: {os.strerror(code)}"
    return f"cannot open {path}: {exc}"


def _close_blocking(ser: serial.Serial) -> None:
    # Drop unsent output first: closing a tty otherwise waits for it to drain,
    # which never happens while flow control holds it or the device is gone.
    with contextlib.suppress(Exception):
        ser.reset_output_buffer()
    ser.close()


def _close_late(fut: asyncio.Future[tuple[serial.Serial, str]]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        with contextlib.suppress(Exception):
            fut.result()[0].close()
