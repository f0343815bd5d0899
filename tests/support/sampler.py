"""The SiLA 2 sampler simulator as a real process, driven through its stdin commands."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

SILA = "org.equipmentgateway/examples"
ANALYSER = f"{SILA}/CellAnalyser/v1"
SAMPLER = f"{SILA}/Sampler/v1"


class SamplerProcess:
    """``python -m simulators.sampler`` on a free port; ``command()`` waits for its ``ok:``."""

    def __init__(self, *args: str, cert_dir: Path | None = None) -> None:
        self.args = list(args)
        self.cert_dir = cert_dir
        self.port = 0
        self.ca: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> SamplerProcess:
        tls = ["--insecure"] if self.cert_dir is None else ["--cert-dir", str(self.cert_dir)]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "simulators.sampler",
            "--port",
            "0",
            *tls,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        async with asyncio.timeout(30):
            while True:
                line = await self.lines.get()
                m = re.match(r"sampler simulator listening on [\d.]+:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                m = re.match(r"CA certificate: (.+)", line)
                if m:
                    self.ca = Path(m.group(1))
                if line.startswith("server uuid:"):
                    return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.put_nowait(line.decode().strip())

    async def command(self, text: str, timeout: float = 15.0) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        while not self.lines.empty():
            self.lines.get_nowait()
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(timeout):
            while True:
                line = await self.lines.get()
                if line.startswith(("ok:", "error:", "{")):
                    return line

    async def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit code and how long it took."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                code = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
        return code, time.monotonic() - started


def sila_block(
    dev_id: str,
    port: int,
    ca: Path | None,
    tags: dict[str, str],
    *,
    poll_interval: float = 0.2,
    timeout: float = 1.0,
    extra: str = "",
) -> str:
    """A [[devices]] block for a SiLA 2 server on 127.0.0.1 (insecure without ``ca``):
    tag name -> fully qualified property; fast liveness checks and re-subscriptions."""
    trust = "insecure = true\n" if ca is None else f'ca = "{ca}"\n'
    out = [
        f'[[devices]]\nid = "{dev_id}"\ndriver = "sila2"\nhost = "127.0.0.1"\n'
        f"port = {port}\n{trust}timeout = {timeout}\npoll_interval = {poll_interval}\n"
        f"liveness_interval = 0.5\nresubscribe_delay = 0.3\n{extra}"
    ]
    for name, prop in tags.items():
        out.append(f'[[devices.tags]]\nname = "{name}"\nproperty = "{prop}"\n')
    return "\n".join(out)


def sila_device_toml(
    dev_id: str,
    sampler: SamplerProcess,
    *,
    poll_interval: float = 0.2,
    timeout: float = 1.0,
    extra: str = "",
) -> str:
    """A [[devices]] block reading every property of the simulator."""
    tags = {
        "vcd": f"{ANALYSER}/Property/ViableCellDensity",
        "viability": f"{ANALYSER}/Property/Viability",
        "glucose": f"{ANALYSER}/Property/Glucose",
        "lactate": f"{ANALYSER}/Property/Lactate",
        "sampled_at": f"{ANALYSER}/SampleTimestamp",
        "cell_temp": f"{ANALYSER}/Property/InstrumentTemperature",
        "state": f"{SAMPLER}/Property/State",
        "count": f"{SAMPLER}/Property/SampleCount",
        "interval": f"{SAMPLER}/Property/SampleInterval",
    }
    return sila_block(
        dev_id,
        sampler.port,
        sampler.ca,
        tags,
        poll_interval=poll_interval,
        timeout=timeout,
        extra=extra,
    )
