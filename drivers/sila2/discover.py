"""SiLA Server Discovery (mDNS/DNS-SD ``_sila._tcp.local.``) and ``gateway discover sila``.

Discovery only finds where servers are. Trust still comes from the
configuration: the CA a server announces in its TXT record is shown, but never
used to connect, because an mDNS answer is not authenticated.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

SERVICE_TYPE = "_sila._tcp.local."


@dataclass
class FoundServer:
    uuid: str
    host: str
    port: int
    name: str = ""
    version: str = ""
    description: str = ""
    announces_ca: bool = False
    features: list[str] = field(default_factory=list)
    error: str | None = None


def _txt(props: dict[bytes, bytes | None], key: str) -> str:
    raw = props.get(key.encode())
    return raw.decode("utf-8", "replace") if raw else ""


def browse(seconds: float) -> list[FoundServer]:
    """Every SiLA server that answers mDNS within ``seconds`` (blocking)."""
    from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

    found: dict[str, FoundServer] = {}
    lock = threading.Lock()

    class Listener(ServiceListener):
        def _add(self, zc: Zeroconf, type_: str, name: str) -> None:
            info = zc.get_service_info(type_, name, timeout=int(min(seconds, 3.0) * 1000))
            if info is None or not info.parsed_addresses() or info.port is None:
                return
            props: dict[bytes, bytes | None] = dict(info.properties or {})
            server = FoundServer(
                uuid=name.split(".", 1)[0],
                host=info.parsed_addresses()[0],
                port=int(info.port),
                name=_txt(props, "server_name"),
                version=_txt(props, "version"),
                description=_txt(props, "description"),
                announces_ca=b"ca0" in props,
            )
            with lock:
                found[name] = server

        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            self._add(zc, type_, name)

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            self._add(zc, type_, name)

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            with lock:
                found.pop(name, None)

    zc = Zeroconf()
    try:
        ServiceBrowser(zc, SERVICE_TYPE, Listener())
        time.sleep(seconds)
    finally:
        zc.close()
    with lock:
        return sorted(found.values(), key=lambda s: (s.name, s.uuid))


def find_server(
    seconds: float, *, server_uuid: UUID | None = None, server_name: str | None = None
) -> tuple[str, int]:
    """Host and port of the server with this UUID (or name); TimeoutError if none answers."""
    from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

    hit: list[tuple[str, int]] = []
    done = threading.Event()

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            info = zc.get_service_info(type_, name, timeout=int(seconds * 1000))
            if info is None or not info.parsed_addresses() or info.port is None:
                return
            props: dict[bytes, bytes | None] = dict(info.properties or {})
            if server_uuid is not None and name.split(".", 1)[0].lower() != str(server_uuid):
                return
            if server_name is not None and _txt(props, "server_name") != server_name:
                return
            hit.append((info.parsed_addresses()[0], int(info.port)))
            done.set()

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            self.add_service(zc, type_, name)

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            pass

    zc = Zeroconf()
    try:
        ServiceBrowser(zc, SERVICE_TYPE, Listener())
        done.wait(seconds)
    finally:
        zc.close()
    if not hit:
        who = f"UUID {server_uuid}" if server_uuid is not None else f"name {server_name!r}"
        raise TimeoutError(f"no SiLA server with {who} answered mDNS within {seconds:g} s")
    return hit[0]


async def list_features(
    server: FoundServer, *, insecure: bool, ca: Path | None, timeout: float
) -> None:
    """Fill ``server.features`` (or ``server.error``) by asking its SiLAService."""
    from drivers.sila2.client import Connection, SilaCallError
    from drivers.sila2.config import Sila2Connection

    if not 0 < server.port < 65536:
        server.error = f"announces port {server.port}"
        return
    conn_cfg = Sila2Connection(
        host=server.host, port=server.port, insecure=insecure, ca=ca, timeout=timeout
    )
    conn = Connection(conn_cfg, server.host, server.port)
    try:
        await conn.open()
        server.features = sorted(await conn.implemented_features())
    except SilaCallError as exc:
        server.error = exc.status
    except OSError as exc:
        server.error = str(exc)
    finally:
        conn.close()


def discover_command(
    seconds: float, *, insecure: bool = False, ca: Path | None = None, timeout: float = 3.0
) -> list[FoundServer]:
    """``gateway discover sila``: browse, then list each server's features."""
    servers = browse(seconds)

    async def features() -> None:
        await asyncio.gather(
            *(list_features(s, insecure=insecure, ca=ca, timeout=timeout) for s in servers)
        )

    if servers:
        asyncio.run(features())
    return servers


def render(servers: list[FoundServer]) -> str:
    lines: list[str] = []
    for s in servers:
        ca = " (announces a CA)" if s.announces_ca else ""
        lines.append(f"{s.name or '?'}  uuid={s.uuid}  {s.host}:{s.port}  version={s.version}{ca}")
        if s.description:
            lines.append(f"  {s.description}")
        if s.error is not None:
            lines.append(f"  features: not listed: {s.error}")
        for f in s.features:
            lines.append(f"  feature {f}")
    return "\n".join(lines) + ("\n" if lines else "")


def as_dicts(servers: list[FoundServer]) -> list[dict[str, Any]]:
    return [s.__dict__.copy() for s in servers]
