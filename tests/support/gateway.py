"""Building configs and running the gateway (in-process or as a real process)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import Config, load_config
from gateway.daemon import Gateway

SMALL_TAGS = """
[[devices.tags]]
name = "O2"
table = "input"
address = 0
data_type = "float32"
unit = "%"
[[devices.tags]]
name = "CO2"
table = "input"
address = 2
data_type = "float32"
byte_order = "CDAB"
unit = "%"
"""

# Every tag of the off-gas simulator's register map: each data type and byte order.
OFFGAS_TAGS = (
    SMALL_TAGS
    + """[[devices.tags]]
name = "O2_badc"
table = "input"
address = 4
data_type = "float32"
byte_order = "BADC"
unit = "%"
[[devices.tags]]
name = "CO2_dcba"
table = "input"
address = 6
data_type = "float32"
byte_order = "DCBA"
unit = "%"
[[devices.tags]]
name = "gas_temp"
table = "input"
address = 8
data_type = "int16"
scale = 0.01
unit = "Cel"
[[devices.tags]]
name = "air_flow"
table = "input"
address = 9
data_type = "uint16"
scale = 0.1
unit = "mL/min"
[[devices.tags]]
name = "totalizer"
table = "input"
address = 10
data_type = "uint32"
byte_order = "CDAB"
scale = 0.1
unit = "L"
[[devices.tags]]
name = "uptime"
table = "input"
address = 12
data_type = "uint64"
unit = "s"
[[devices.tags]]
name = "OUR"
table = "input"
address = 16
data_type = "float64"
unit = "mmol/(L.h)"
[[devices.tags]]
name = "cal_constant"
table = "input"
address = 20
data_type = "int32"
byte_order = "DCBA"
[[devices.tags]]
name = "status"
table = "input"
address = 22
[[devices.tags]]
name = "ready"
table = "input"
address = 22
data_type = "bit"
bit = 0
[[devices.tags]]
name = "status_bit15"
table = "input"
address = 22
data_type = "bit"
bit = 15
[[devices.tags]]
name = "serial"
table = "input"
address = 30
data_type = "string"
length = 8
[[devices.tags]]
name = "fixed_int64"
table = "input"
address = 40
data_type = "int64"
byte_order = "BADC"
[[devices.tags]]
name = "fixed_uint32"
table = "input"
address = 44
data_type = "uint32"
[[devices.tags]]
name = "air_flow_sp"
table = "holding"
address = 0
scale = 0.1
unit = "mL/min"
[[devices.tags]]
name = "o2_low_limit"
table = "holding"
address = 1
data_type = "float32"
unit = "%"
[[devices.tags]]
name = "sample_pump"
table = "coil"
address = 0
[[devices.tags]]
name = "cal_valve"
table = "coil"
address = 1
[[devices.tags]]
name = "o2_low_alarm"
table = "discrete"
address = 0
[[devices.tags]]
name = "analyser_fault"
table = "discrete"
address = 1
"""
)


@dataclass
class Device:
    id: str
    port: int
    unit_id: int = 1
    poll_interval: float = 0.1
    timeout: float = 0.3
    tags: str = SMALL_TAGS


@dataclass
class GatewaySpec:
    state_dir: Path
    broker_port: int
    devices: Sequence[Device] = field(default_factory=list)
    outbox: str = ""
    gateway_id: str = "gw-test"

    def toml(self) -> str:
        out = [
            f'[gateway]\nid = "{self.gateway_id}"\nstate_dir = "{self.state_dir}"\n'
            "shutdown_timeout = 5.0\n",
            f"[broker]\nport = {self.broker_port}\nreconnect_min = 0.1\nreconnect_max = 0.5\n",
            f"[outbox]\n{self.outbox}\n",
            # Port 0: tests run side by side; the bound port is Gateway.health_port.
            "[health]\nport = 0\n",
        ]
        for d in self.devices:
            out.append(
                f'[[devices]]\nid = "{d.id}"\ndriver = "modbus"\nhost = "127.0.0.1"\n'
                f"port = {d.port}\nunit_id = {d.unit_id}\npoll_interval = {d.poll_interval}\n"
                f"timeout = {d.timeout}\n{d.tags}\n"
            )
        return "\n".join(out)

    def write(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir.parent / f"{self.gateway_id}.toml"
        path.write_text(self.toml())
        return path

    def config(self) -> Config:
        return load_config(self.write())


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Gateway]:
    """The gateway running in this event loop; stopped (SIGTERM path) on exit."""
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    try:
        yield gw
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 30)


def spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """The gateway as a real process (`python -m gateway run`)."""
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config), "--log-json"],
            stdout=f,
            stderr=f,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> int:
    proc.send_signal(sig)
    return proc.wait(30)
