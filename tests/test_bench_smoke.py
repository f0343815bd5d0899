"""The benchmark harness still runs: one short workload M step, gateway only.

Not a performance test: it asserts that the harness produces a sane result
(records delivered, every record verified), never how fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_m_quick_produces_a_verified_result(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "M",
            "--quick",
            "--no-peer",
            "--no-docs",
            "--rates",
            "20000",
            "--seconds",
            "2",
            "--warmup",
            "0.5",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["machine"]["cores"] >= 1
    (step,) = res["workloads"]["M"]["steps"]
    assert step["system"] == "gateway"
    (run,) = step["runs"]
    assert "error" not in run, run
    assert run["records_in_window"] > 0
    assert run["delivered_per_s"] > 0
    assert run["cpu_us_per_record"] > 0
    assert run["rss_mb"] > 10
    assert run["verify_ok"], run["problems"]
    assert run["missing"] == 0
    # Every stream was published to the end: 100 devices, each with its $stop.
    assert run["records_total"] >= run["records_in_window"]
    assert run["exit_status"] == 0
