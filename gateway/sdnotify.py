"""systemd's notify protocol (sd_notify(3)) over ``$NOTIFY_SOCKET``, no dependency.

One datagram per message on an ``AF_UNIX``/``SOCK_DGRAM`` socket; a path
starting with ``@`` is a Linux abstract socket. Outside systemd (no
``$NOTIFY_SOCKET``) every call does nothing, so ``gateway run`` behaves the same
in a terminal. A send never raises and never blocks: a lost notification must
not stop acquisition (systemd then restarts us, which is the safe side).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("gateway.sdnotify")


class Notifier:
    """Sends ``READY=1``, ``STATUS=…``, ``STOPPING=1`` and ``WATCHDOG=1`` to systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One notification of ``KEY=value`` lines; True if it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a dead socket would otherwise log every second
                self._warned = True
                log.warning("cannot notify systemd", socket=str(self.address), error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``, or None when off.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; a
    child that inherited the environment must not feed its parent's watchdog.
    """
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6
