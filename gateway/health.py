"""Operations: the health endpoint (/healthz, /readyz, /metrics) and systemd notifications.

The HTTP server is a small GET-only responder on the gateway's own event loop
(``asyncio.start_server``), so every figure is read on the loop that owns it,
without locks (see docs/architecture.md for why not prometheus-client's
threaded server). Strict limits: 8 KiB of request head, 5 s to send it, 16
connections at once, one request per connection.

Semantics (docs/deployment.md has the operator's view):

* **live** (``/healthz`` 200, and the only condition for ``WATCHDOG=1``): the
  event loop runs (it answers at all), the publisher task has not ended, and
  the publisher's heartbeat is younger than ``PUBLISHER_STALL`` seconds. The
  publisher beats on every pass of its connect loop and of its pump, at least
  every 5 s when idle, and sets the beat into the future while it sleeps
  before a reconnect: a broker outage does not stop it, a hung database
  thread or a stuck publisher does.
* **ready** (``/readyz`` 200): the broker is connected, and every enabled
  device is *acquiring* (connected, with a good reading within
  ``max(10 s, 3 * poll_interval)``; for OPC UA ``mode = "subscribe"``, where
  a value that does not change produces no reading, connected is enough) or
  *known down* (disconnected, with its ``$offline`` event recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.metrics import GatewayCollector, registry, render
from gateway.sdnotify import Notifier

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.daemon import Gateway
    from gateway.supervisor import DeviceSupervisor

log = structlog.get_logger("gateway.health")

PUBLISHER_STALL = 30.0  # s without a publisher heartbeat before the watchdog stops
STATUS_EVERY = 5.0  # s between STATUS= refreshes (sent only when the text changed)
STALE_MIN = 10.0  # s: shortest "recent" window for a device's last good reading
MAX_HEAD = 8192
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
STATS_TIMEOUT = 2.0


@dataclass(slots=True)
class DeviceState:
    id: str
    state: str  # acquiring | down | connecting | stale
    ok: bool
    detail: str


def device_state(sup: DeviceSupervisor, last_good_ns: int | None, now_ns: int) -> DeviceState:
    """Where one device stands, for /readyz and STATUS=."""
    dev = sup.device
    if not sup.online:
        if sup.failures:
            return DeviceState(dev.id, "down", True, f"offline: {sup.last_error}")
        return DeviceState(dev.id, "connecting", False, "not connected yet")
    if getattr(dev, "mode", None) == "subscribe":
        return DeviceState(dev.id, "acquiring", True, "connected (subscription)")
    window = max(STALE_MIN, 3 * dev.poll_interval)
    if last_good_ns is None:
        return DeviceState(dev.id, "stale", False, "connected, no good reading yet")
    age = (now_ns - last_good_ns) / 1e9
    if age > window:
        return DeviceState(
            dev.id, "stale", False, f"connected, no good reading for {age:.0f} s (> {window:g} s)"
        )
    return DeviceState(dev.id, "acquiring", True, f"last good reading {age:.1f} s ago")


class Operations:
    """Health endpoint, readiness, liveness and the systemd notifier of one Gateway."""

    def __init__(self, gw: Gateway, notifier: Notifier | None = None) -> None:
        self.gw = gw
        self.notifier = notifier or Notifier()
        self.pings = 0
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._connections = 0
        self._registry: CollectorRegistry | None = None
        self._collector: GatewayCollector | None = None
        self._last_status = ""
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Open the endpoint, tell systemd we are ready, start the watchdog/status loop."""
        h = self.gw.cfg.health
        if h.enabled:
            self._registry, self._collector = registry(self.gw)
            try:
                self._server = await asyncio.start_server(
                    self._serve, h.listen, h.port, limit=MAX_HEAD, reuse_address=True
                )
            except OSError as exc:
                # Acquisition matters more than the endpoint: run on without it
                # (STATUS= and the watchdog still work), and say so loudly.
                log.error(
                    "health endpoint not started", listen=h.listen, port=h.port, error=str(exc)
                )
            else:
                self.port = int(self._server.sockets[0].getsockname()[1])
                log.info("health endpoint listening", url=f"http://{_host(h.listen)}:{self.port}/")
        self._last_status = self.status_line()
        self.notifier.ready(self._last_status)
        if self.notifier.watchdog_interval is not None:
            log.info("systemd watchdog on", ping_every_s=self.notifier.watchdog_interval)
        self._task = asyncio.create_task(self._notify_loop(), name="sdnotify")

    def stopping(self) -> None:
        # From here the publisher is meant to end; TimeoutStopSec bounds the stop.
        self._stopping = True
        self.notifier.stopping("stopping: stopping devices, publishing the backlog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
        self.notifier.close()

    # -- what the endpoint and systemd are told --------------------------------------
    def live(self) -> tuple[bool, str]:
        """The watchdog's rule (module docstring): the loop runs and the publisher is alive."""
        task, pub = self.gw.publisher_task, self.gw.publisher
        if task is None or pub is None:
            return False, "publisher not started"
        if task.done():
            return False, "publisher task ended"
        stall = time.monotonic() - pub.heartbeat
        if stall > PUBLISHER_STALL:
            return False, f"publisher made no progress for {stall:.0f} s"
        return True, "ok"

    def devices(self) -> list[DeviceState]:
        now = time.time_ns()
        gw = self.gw
        out = []
        for dev_id, sup in list(gw.supervisors.items()):
            stream = gw.streams.get(dev_id)
            out.append(device_state(sup, stream.last_good_ns if stream else None, now))
        return out

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        pub = self.gw.publisher
        connected = pub is not None and pub.connected
        devices = self.devices()
        reasons = []
        if not connected:
            why = pub.last_error if pub is not None and pub.last_error else "not connected yet"
            reasons.append(f"broker not connected: {why}")
        reasons += [f"device {d.id}: {d.detail}" for d in devices if not d.ok]
        live, why_not = self.live()
        if not live:
            reasons.append(why_not)
        body = {
            "ready": not reasons,
            "reasons": reasons,
            "broker": {"connected": connected, "last_error": pub.last_error if pub else None},
            "devices": {d.id: {"state": d.state, "detail": d.detail} for d in devices},
            "backlog_messages": self.gw.outbox.messages if self.gw.outbox else None,
        }
        return not reasons, body

    def status_line(self) -> str:
        devices = self.devices()
        acquiring = sum(d.state == "acquiring" for d in devices)
        text = f"{acquiring}/{len(devices)} devices acquiring"
        down = [d.id for d in devices if d.state == "down"]
        if down:
            text += f" ({len(down)} down: {', '.join(down[:5])}{'…' if len(down) > 5 else ''})"
        pub = self.gw.publisher
        text += ", broker connected" if pub is not None and pub.connected else ", broker DOWN"
        outbox = self.gw.outbox
        if outbox is not None:
            text += f", backlog {outbox.messages} messages"
        return text

    async def _notify_loop(self) -> None:
        interval = self.notifier.watchdog_interval
        tick = min(interval, STATUS_EVERY) if interval else STATUS_EVERY
        next_ping = 0.0
        starving = False
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if interval is not None and now >= next_ping:
                live, why = (True, "") if self._stopping else self.live()
                if live:
                    if self.notifier.watchdog():
                        self.pings += 1
                    next_ping = now + interval
                    if starving:
                        log.warning("feeding the systemd watchdog again")
                elif not starving:  # once per episode, not every tick
                    log.error("not feeding the systemd watchdog", reason=why)
                starving = not live
            text = self.status_line()
            if text != self._last_status and not self._stopping:
                self._last_status = text
                self.notifier.status(text)
            await asyncio.sleep(tick)

    # -- HTTP ---------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                await _respond(writer, 503, b"too many connections\n")
                return
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.LimitOverrunError, ValueError):
                await _respond(writer, 431, b"request head too large\n")
                return
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            method, path = _request_line(head)
            if method is None:
                await _respond(writer, 400, b"bad request\n")
            elif method not in ("GET", "HEAD"):
                await _respond(writer, 405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
            else:
                status, ctype, body = await self._route(path)
                await _respond(writer, status, body, ctype=ctype, head_only=method == "HEAD")
        except Exception:
            log.exception("health endpoint: request failed")
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(READ_TIMEOUT):
                    await writer.wait_closed()

    async def _route(self, path: str) -> tuple[int, bytes, bytes]:
        text = b"text/plain; charset=utf-8"
        if path == "/healthz":
            live, why = self.live()
            return (200, text, b"ok\n") if live else (503, text, f"{why}\n".encode())
        if path == "/readyz":
            ready, body = self.readiness()
            return 200 if ready else 503, b"application/json", _json(body)
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST.encode(), await self.scrape()
        return 404, text, b"not found: try /healthz, /readyz, /metrics\n"

    async def scrape(self) -> bytes:
        """The /metrics body; the oldest message's age needs one SQLite read first."""
        assert self._registry is not None and self._collector is not None
        oldest: int | None = None
        outbox = self.gw.outbox
        if outbox is not None and outbox.messages:
            try:
                async with asyncio.timeout(STATS_TIMEOUT):
                    oldest = (await outbox.stats()).oldest_ts
            except Exception as exc:  # a busy or failed disk must not fail the scrape
                log.warning("outbox stats unavailable for /metrics", error=str(exc))
        # No await from here on: the figures are one consistent snapshot.
        self._collector.oldest_ts = oldest
        return render(self._registry)


def _request_line(head: bytes) -> tuple[str | None, str]:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None, ""
    return parts[0], parts[1].split("?", 1)[0]


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    ctype: bytes = b"text/plain; charset=utf-8",
    extra: bytes = b"",
    head_only: bool = False,
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n".encode()
        + b"Content-Type: "
        + ctype
        + f"\r\nContent-Length: {len(body)}\r\n".encode()
        + b"Cache-Control: no-store\r\nConnection: close\r\n"
        + extra
        + b"\r\n"
    )
    writer.write(head if head_only else head + body)
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(READ_TIMEOUT):
            await writer.drain()


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _host(listen: str) -> str:
    return f"[{listen}]" if ":" in listen else listen
