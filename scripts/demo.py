"""Runs the demo: Mosquitto, the simulators, the gateway and a live tail.

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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.broker import Mosquitto, free_port  # noqa: E402

BIN = ROOT / ".venv" / "bin"


def _link(line: str) -> str:
    """The stable link path from the serial simulator's first line."""
    words = line.split()  # "balance on /dev/pts/N link /path/to/by-id/usb-..."
    if "link" in words and words.index("link") + 1 < len(words):
        return words[words.index("link") + 1]
    raise SystemExit(f"demo: cannot read the balance's port from {line!r}")


def main() -> int:
    work = ROOT / ".demo"
    work.mkdir(exist_ok=True)
    broker = Mosquitto(work / "mosquitto")
    broker.start()
    modbus_port = free_port()
    opcua_port = free_port()
    sila_port = free_port()
    env = dict(
        os.environ,
        DEMO_BROKER_PORT=str(broker.port),
        DEMO_MODBUS_PORT=str(modbus_port),
        DEMO_OPCUA_PORT=str(opcua_port),
        DEMO_SILA_PORT=str(sila_port),
        DEMO_SILA_CA=str(work / "sampler-certs" / "ca.crt"),
        DEMO_STATE_DIR=str(work / "state"),
    )
    procs: list[subprocess.Popen[bytes]] = []
    sim_log = (work / "simulator.log").open("ab")
    gw_log = (work / "gateway.log").open("ab")

    def start(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        # Own session: a Ctrl-C in the terminal reaches only this script, which
        # then stops the others in order (the gateway flushes while the broker
        # is still up).
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(
            [str(BIN / "gateway"), *args], env=env, start_new_session=True, **kw
        )
        procs.append(proc)
        return proc

    try:
        start(
            [
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
            stdout=sim_log,
            stderr=sim_log,
        )
        bioreactor = start(
            ["simulate", "bioreactor", "--port", str(opcua_port), "--time-scale", "600"],
            stdout=subprocess.PIPE,
            stderr=sim_log,
        )
        assert bioreactor.stdout is not None
        bioreactor.stdout.readline()  # "bioreactor simulator listening on ..." once it serves
        balance = start(
            ["simulate", "serial", "--instrument", "balance", "--link-dir", str(work / "by-id")],
            stdout=subprocess.PIPE,
            stderr=sim_log,
        )
        assert balance.stdout is not None
        env["DEMO_BALANCE_PORT"] = _link(balance.stdout.readline().decode())
        sampler = start(
            [
                "simulate",
                "sampler",
                "--port",
                str(sila_port),
                "--cert-dir",
                str(work / "sampler-certs"),
                "--bioreactor",  # samples from the OPC UA bioreactor above
                f"opc.tcp://127.0.0.1:{opcua_port}/bioreactor",
            ],
            stdout=subprocess.PIPE,
            stderr=sim_log,
        )
        assert sampler.stdout is not None
        sampler.stdout.readline()  # "sampler simulator listening on ..." once it serves
        time.sleep(1.0)
        start(
            ["run", "--config", str(ROOT / "config" / "demo.toml"), "--log-json"],
            stdout=gw_log,
            stderr=gw_log,
        )
        print(
            f"demo: broker mqtt://127.0.0.1:{broker.port}, bioreactor "
            f"opc.tcp://127.0.0.1:{opcua_port}/bioreactor, off-gas analysers "
            f"modbus://127.0.0.1:{modbus_port} (units 1, 2; 10 simulated min per second), "
            f"balance on {env['DEMO_BALANCE_PORT']}, sampler (SiLA 2, TLS) "
            f"127.0.0.1:{sila_port}"
        )
        print(f"demo: gateway log {work / 'gateway.log'}; verify any time with:")
        print(f"  .venv/bin/gateway verify --port {broker.port} --seconds 10")
        print("demo: live records (Ctrl-C to stop)\n", flush=True)
        start(["tail", "--port", str(broker.port), "--format", "table"], stdin=None)
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
