"""Runs the demo: Mosquitto, the off-gas simulator, the gateway and a live tail.

Everything binds to free loopback ports and keeps its files under .demo/.
Ctrl-C stops the processes in reverse order (the gateway flushes its outbox).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.broker import Mosquitto, free_port  # noqa: E402

BIN = ROOT / ".venv" / "bin"


def main() -> int:
    work = ROOT / ".demo"
    work.mkdir(exist_ok=True)
    broker = Mosquitto(work / "mosquitto")
    broker.start()
    modbus_port = free_port()
    env = dict(
        os.environ,
        DEMO_BROKER_PORT=str(broker.port),
        DEMO_MODBUS_PORT=str(modbus_port),
        DEMO_STATE_DIR=str(work / "state"),
    )
    procs: list[subprocess.Popen[bytes]] = []
    sim_log = (work / "simulator.log").open("ab")
    gw_log = (work / "gateway.log").open("ab")
    try:
        procs.append(
            subprocess.Popen(
                [
                    BIN / "gateway",
                    "simulate",
                    "offgas",
                    "--port",
                    str(modbus_port),
                    "--unit-id",
                    "1",
                    "--unit-id",
                    "2",
                    "--time-scale",
                    "600",
                ],
                stdin=subprocess.DEVNULL,
                stdout=sim_log,
                stderr=sim_log,
                env=env,
            )
        )
        time.sleep(1.0)
        procs.append(
            subprocess.Popen(
                [BIN / "gateway", "run", "--config", ROOT / "config" / "demo.toml", "--log-json"],
                stdout=gw_log,
                stderr=gw_log,
                env=env,
            )
        )
        print(
            f"demo: broker mqtt://127.0.0.1:{broker.port}, off-gas simulator "
            f"modbus://127.0.0.1:{modbus_port} (units 1, 2; 10 simulated min per second)"
        )
        print(f"demo: gateway log {work / 'gateway.log'}; verify any time with:")
        print(f"  .venv/bin/gateway verify --port {broker.port} --seconds 10")
        print("demo: live records (Ctrl-C to stop)\n", flush=True)
        tail = subprocess.Popen(
            [BIN / "gateway", "tail", "--port", str(broker.port), "--format", "table"],
            env=env,
            start_new_session=True,
        )
        procs.append(tail)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = [p for p in procs if p.poll() is not None]
        print(f"demo: a process exited ({dead[0].args!r}); see the logs in {work}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        broker.stop()
        print("\ndemo: stopped", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
