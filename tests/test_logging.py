"""Logs: JSON lines off a terminal (journald), every device line carries its id."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.support.broker import Mosquitto, free_port
from tests.support.gateway import Device, GatewaySpec


def test_json_logs_name_the_device_and_the_reason(broker: Mosquitto, tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here: the device is down from the start
    spec = GatewaySpec(tmp_path / "state", broker.port, [Device("dead-dev", dead)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(spec.write())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.5)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines, "no log output"
    assert all({"event", "level", "timestamp"} <= set(line) for line in lines)
    about_device = [line for line in lines if "offline" in line["event"]]
    assert about_device, lines
    assert all(line.get("device") == "dead-dev" for line in about_device)
    assert any(f"127.0.0.1:{dead}" in line.get("reason", "") for line in about_device)
    assert any(line["event"] == "gateway stopped" for line in lines)
