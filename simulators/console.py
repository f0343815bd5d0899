"""Running a simulator from the command line: until SIGINT/SIGTERM, with stdin commands.

Shared by every simulator's ``main()``: it installs the signal handlers, reads
command lines from stdin (when stdin is a pipe or a foreground terminal) and
hands them, in order, to the simulator's handler, then stops the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

CommandHandler = Callable[[str], Awaitable[None] | None]


def stdin_commands_wanted(fd: int) -> bool:
    """Read commands only from a pipe or a terminal we own (not /dev/null, not a file)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return True
    if os.isatty(fd):
        # A background job reading its terminal would be stopped by SIGTTIN.
        with contextlib.suppress(OSError):
            return os.tcgetpgrp(fd) == os.getpgrp()
    return False


async def run_until_signal(handle: CommandHandler, stop: Callable[[], Awaitable[None]]) -> int:
    """Serve until SIGINT/SIGTERM, feeding stdin lines to ``handle``; then ``stop()``."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    reading = fd >= 0 and stdin_commands_wanted(fd)
    lines: asyncio.Queue[str] = asyncio.Queue()
    pending = b""

    def on_stdin() -> None:
        nonlocal pending, reading
        # os.read on the raw fd: no Python buffer lock a reader thread could
        # hold at interpreter exit, and it returns whatever one line/chunk holds.
        chunk = os.read(fd, 4096)
        if not chunk:  # EOF: keep simulating, just stop listening for commands
            loop.remove_reader(fd)
            reading = False
            return
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            lines.put_nowait(raw.decode(errors="replace"))

    async def run_commands() -> None:
        # One at a time, in order: a command may await (e.g. a restart).
        while True:
            result = handle(await lines.get())
            if inspect.isawaitable(result):
                await result

    if reading:
        loop.add_reader(fd, on_stdin)
    commands = asyncio.create_task(run_commands())
    try:
        await stopping.wait()
    finally:
        commands.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await commands
        if reading:
            loop.remove_reader(fd)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await stop()
    return 0


def run(serve: Coroutine[Any, Any, int]) -> int:
    """A simulator's ``main``: run ``serve`` and return its exit code."""
    try:
        return asyncio.run(serve)
    except KeyboardInterrupt:  # SIGINT before the handler was installed
        return 0
