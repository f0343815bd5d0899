"""Runs the demo: Mosquitto, the simulators, the gateway and a live tail.

Everything binds to free loopback ports and keeps its files under .demo/.
Ctrl-C stops the processes in reverse order (the gateway flushes its outbox).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulators.plant import DEMO_CONFIG, DemoPlant  # noqa: E402
from tests.support.broker import Mosquitto  # noqa: E402


def main() -> int:
    work = ROOT / ".demo"
    work.mkdir(exist_ok=True)
    broker = Mosquitto(work / "mosquitto")
    broker.start()
    gw_log = (work / "gateway.log").open("ab")
    plant = DemoPlant(work, broker.port, log=(work / "simulator.log").open("ab"))
    try:
        plant.start(time_scale=600)
        plant.spawn(
            ["run", "--config", str(DEMO_CONFIG), "--log-json"], stdout=gw_log, stderr=gw_log
        )
        print(
            f"demo: broker mqtt://127.0.0.1:{broker.port}, bioreactor {plant.bioreactor_url}, "
            f"off-gas analysers modbus://127.0.0.1:{plant.modbus_port} (units 1, 2; 10 "
            f"simulated min per second), balance on {plant.balance_port}, sampler (SiLA 2, "
            f"TLS) 127.0.0.1:{plant.sila_port}"
        )
        print(f"demo: gateway log {work / 'gateway.log'}; verify any time with:")
        print(f"  .venv/bin/gateway verify --port {broker.port} --seconds 10")
        print("demo: live records (Ctrl-C to stop)\n", flush=True)
        plant.spawn(
            ["tail", "--port", str(broker.port), "--format", "table"],
            stdin=None,
            stdout=None,
            stderr=None,
        )
        while all(p.poll() is None for p in plant.procs):
            time.sleep(0.5)
        dead = [p for p in plant.procs if p.poll() is not None]
        print(f"demo: a process exited ({dead[0].args!r}); see the logs in {work}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"demo: {exc}; see the logs in {work}", file=sys.stderr)
        return 1
    finally:
        plant.stop()
        broker.stop()
        print("\ndemo: stopped", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
