"""A SiLA 2 server not written in this project: the SiLA interoperability test
server (PyPI ``sila2-interop-communication-tester``, WEGA IT; built on grpcio
directly, not on the ``sila2`` package our simulator and driver use).

``python -m tests.support.sila_interop --port P [--cert C --key K]`` runs it
and prints ``listening`` once it serves; :class:`InteropServer` runs that as a
process for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from pathlib import Path
from uuid import uuid4

from simulators.children import free_port
from tests.support.sampler import sila_block

TEST = "org.silastandard/test"


class InteropServer:
    """The interoperability server on a free loopback port (TLS when ``cert_dir``)."""

    def __init__(self, cert_dir: Path | None = None) -> None:
        self.port = free_port()
        self.ca: Path | None = None
        self._tls: list[str] = []
        if cert_dir is not None:
            from simulators.sampler.certs import ensure_certificates

            certs = ensure_certificates(cert_dir, uuid4(), "127.0.0.1")
            self.ca = certs.ca
            self._tls = ["--cert", str(certs.cert), "--key", str(certs.key)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> InteropServer:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.sila_interop",
            "--port",
            str(self.port),
            *self._tls,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(30):
            line = await self.proc.stdout.readline()
        if not line.startswith(b"listening"):
            raise RuntimeError(f"interop server did not start: {line!r}")
        return self

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await self.proc.wait()

    def device_toml(self, dev_id: str, tags: dict[str, str]) -> str:
        """A [[devices]] block: tag name -> property path below ``org.silastandard/test``."""
        props = {name: f"{TEST}/{prop}" for name, prop in tags.items()}
        return sila_block(dev_id, self.port, self.ca, props, poll_interval=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    from sila2_interop_communication_tester.test_server.server_implementation import server

    srv = server.Server(f"127.0.0.1:{a.port}", cert_file=a.cert, key_file=a.key)
    srv.start()
    print("listening", flush=True)
    os.dup2(2, 1)  # its own chatter ("Call failed: ...") must not fill the pipe we read
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while not done.wait(0.2):
        pass
    srv.stop(None)  # cancels every call at once, like a server that dies


if __name__ == "__main__":
    main()
