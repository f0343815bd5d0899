"""Where the gateway's CPU goes: one workload point sampled with py-spy.

``python -m bench.profile --devices 500 --tags 10000 --interval 1`` runs the
same processes as a benchmark point (Mosquitto, the pymodbus server, the
gateway, the verifying subscriber), samples the gateway with py-spy for
``--seconds`` and prints its CPU split by stage, in µs per record. py-spy is
a benchmark-only tool: it is installed into the venv on first use.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import Run, gateway_argv, modbus_servers, modbus_toml
from bench.procs import ROOT, python, usage
from tests.support.broker import Mosquitto

# The first stage whose frame is on a sample's stack takes the sample.
STAGES = (
    ("seal: hash + pack (per record)", ("Chain.seal_payload",)),
    (
        "Modbus request/response (pymodbus + driver)",
        ("ModbusDriver.poll", "ModbusProtocol.data_received", "_SelectorSocketTransport._read"),
    ),
    ("MQTT publish + PUBACK (paho)", ("Publisher._pump", "AsyncMqtt._readable", "AsyncMqtt._writ")),
    ("outbox (SQLite thread)", ("_worker (concurrent",)),
    ("normalize + submit", ("DeviceStream.emit",)),
    ("epoll wait / wake-ups", ("EpollSelector.select",)),
)
OTHER = "other (timers, task switches, supervisor)"


def py_spy() -> str:
    exe = Path(python()).parent / "py-spy"
    if not exe.exists():
        print("profile: installing py-spy into the venv (once)", flush=True)
        subprocess.run([python(), "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(exe)


def split(raw: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Samples in all, per stage, and per function (self time) of a py-spy raw file."""
    stages: collections.Counter[str] = collections.Counter()
    funcs: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        total += count
        funcs[re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1])] += count
        stage = next((name for name, keys in STAGES if any(k in stack for k in keys)), OTHER)
        stages[stage] += count
    return total, stages, funcs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--tags", type=int, default=10_000, help="in all, split over the devices")
    ap.add_argument("--interval", type=float, default=1.0, help="poll interval, s")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "profile")
    a = ap.parse_args(argv)
    spy = py_spy()
    work = a.work / f"{a.devices}x{a.tags // a.devices}-{time.strftime('%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(work / "broker")
    broker.start()
    servers = modbus_servers(work, 1, a.tags)
    per = a.tags // a.devices
    devices = [(f"p{i:03d}", i * per, per) for i in range(a.devices)]
    cfg = modbus_toml(work / "run", broker.port, "prof/r", devices, servers.ports, a.interval)
    run = Run(work / "run", broker.port, "prof/r", "gateway", gateway_argv(cfg), streams=a.devices)
    raw = work / "py-spy.txt"
    try:
        run.start()
        assert run.proc is not None
        time.sleep(max(5.0, 3 * a.interval))  # connected, phases settled
        u0 = usage(run.proc.pid)
        record = ["record", "--nonblocking", "-r", "250", "-d", str(int(a.seconds)), "-f", "raw"]
        out = ["-p", str(run.proc.pid), "-o", str(raw)]
        subprocess.run([spy, *record, *out], check=True, capture_output=True)
        u1 = usage(run.proc.pid)
    finally:
        res, _, _ = run.finish()
        servers.close()
        broker.stop()
    cpu = (u1.cpu_s - u0.cpu_s) / (u1.t - u0.t)  # cores
    rate = a.devices * per / a.interval
    total, stages, funcs = split(raw)
    print(
        f"{a.devices} devices x {per} tags every {a.interval:g} s ({rate:,.0f} records/s): "
        f"gateway {100 * cpu:.1f} % of a core = {cpu / rate * 1e6:.2f} µs/record "
        f"(under py-spy), verify {'ok' if res['verify_ok'] else 'FAILED'}"
    )
    for name, n in stages.most_common():
        print(f"  {100 * n / total:5.1f} %  {cpu * n / total / rate * 1e6:5.2f} µs/record  {name}")
    print("  top functions (self time):")
    for name, n in funcs.most_common(12):
        print(f"  {100 * n / total:5.1f} %  {name[:110]}")
    print(f"profile: raw samples in {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
