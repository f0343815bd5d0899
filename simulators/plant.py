"""The demo plant: the four simulators as processes, and the environment that
``config/demo.toml`` reads their ports from.

Used by ``scripts/demo`` and by the benchmark's workload A (every driver kind in
one gateway), so both run exactly the same plant.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from simulators.children import die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "config" / "demo.toml"


def _gateway_command() -> list[str]:
    venv = ROOT / ".venv" / "bin" / "gateway"
    return [str(venv)] if venv.exists() else [sys.executable, "-m", "gateway"]


def _link(line: str) -> str:
    """The stable link path from the serial simulator's first line."""
    words = line.split()  # "balance on /dev/pts/N link /path/to/by-id/usb-..."
    if "link" in words and words.index("link") + 1 < len(words):
        return words[words.index("link") + 1]
    raise RuntimeError(f"cannot read the balance's port from {line!r}")


class DemoPlant:
    """Off-gas analysers (Modbus TCP), bioreactor (OPC UA), balance (serial pty)
    and sampler (SiLA 2, TLS) on free loopback ports, files under ``work``."""

    def __init__(self, work: Path, broker_port: int, *, log: IO[bytes]) -> None:
        self.work = work
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []
        self.modbus_port, self.opcua_port, self.sila_port = free_port(), free_port(), free_port()
        self.env = dict(
            os.environ,
            DEMO_BROKER_PORT=str(broker_port),
            DEMO_MODBUS_PORT=str(self.modbus_port),
            DEMO_OPCUA_PORT=str(self.opcua_port),
            DEMO_SILA_PORT=str(self.sila_port),
            DEMO_SILA_CA=str(work / "sampler-certs" / "ca.crt"),
            DEMO_STATE_DIR=str(work / "state"),
        )

    def spawn(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """``gateway <args>`` in its own session: a Ctrl-C in the terminal reaches
        only the caller, which then stops the others in order."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", self.log)
        kw.setdefault("stderr", self.log)
        proc = subprocess.Popen(
            [*_gateway_command(), *args],
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent,
            **kw,
        )
        self.procs.append(proc)
        return proc

    def _first_line(self, args: list[str]) -> str:
        proc = self.spawn(args, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # each prints one line once it serves
        if not line:
            raise RuntimeError(f"simulator {args[1]} exited with {proc.wait()}; see its log")
        return line

    def start(self, time_scale: float = 600.0) -> None:
        scale = ["--time-scale", str(time_scale)]
        mb = ["--port", str(self.modbus_port), "--unit-id", "1", "--unit-id", "2"]
        self.spawn(["simulate", "offgas", *mb, *scale])
        self._first_line(["simulate", "bioreactor", "--port", str(self.opcua_port), *scale])
        by_id = str(self.work / "by-id")
        line = self._first_line(
            ["simulate", "serial", "--instrument", "balance", "--link-dir", by_id]
        )
        self.env["DEMO_BALANCE_PORT"] = _link(line)
        self._first_line(
            [
                "simulate",
                "sampler",
                "--port",
                str(self.sila_port),
                "--cert-dir",
                str(self.work / "sampler-certs"),
                "--bioreactor",  # samples from the OPC UA bioreactor above
                self.bioreactor_url,
            ]
        )
        time.sleep(1.0)

    def write_config(self, path: Path, topic_prefix: str = "plant") -> Path:
        """``config/demo.toml`` for a run beside the demo's own: its topic prefix and
        a free health port (the state dir comes from ``env``)."""
        text = DEMO_CONFIG.read_text().replace(
            'topic_prefix = "plant"', f'topic_prefix = "{topic_prefix}"'
        )
        path.write_text(text + "\n[health]\nport = 0\n")
        return path

    @property
    def bioreactor_url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.opcua_port}/bioreactor"

    @property
    def balance_port(self) -> str:
        return self.env.get("DEMO_BALANCE_PORT", "")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process in reverse order of start, SIGKILL what lingers."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
