"""`python -m bench [workloads...]`: set up, run, write JSON results, regenerate the doc."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import nodered, report
from bench.procs import ROOT, machine
from bench.workloads import PEERS, WORKLOADS, Bench, Settings

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / ".work"


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the gateway (and the Node-RED peer side by side). "
        "`python -m bench report [results.json]` only regenerates docs/performance.md.",
    )
    p.add_argument(
        "workloads",
        nargs="*",
        metavar="WORKLOAD",
        help=f"any of {', '.join(WORKLOADS)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="short runs: a check, not numbers")
    p.add_argument("--runs", type=int, default=None, help="runs per point (default 3; quick 1)")
    p.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the Node-RED peer side by side on workload M (default: yes)",
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="measured window (default 20; quick 5)"
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="before the window (default 5; quick 2)"
    )
    p.add_argument(
        "--rates",
        type=_ints,
        default=None,
        help="workload M steps, records/s (default 1000,5000,20000,50000,100000,150000)",
    )
    p.add_argument("--devices", type=_ints, default=None, help="workload D (default 1,10,100,500)")
    p.add_argument("--outage-seconds", type=float, default=None, help="default 300; quick 20")
    p.add_argument(
        "--modbus-servers",
        type=int,
        default=1,
        help="pymodbus server processes sharing the devices (default 1)",
    )
    p.add_argument("--opcua", default="10x500@0.1", help="workload O: DEVICESxITEMS@INTERVAL")
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/<time>.json)"
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="configs, logs and outboxes of the runs (default bench/.work/<time>)",
    )
    p.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="regenerate docs/performance.md from the results (default: yes)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        src = Path(argv[1]) if len(argv) > 1 else RESULTS / "latest.json"
        report.write(json.loads(src.read_text()))
        print(f"bench: wrote {report.DOC} from {src}")
        return 0
    a = parser().parse_args(argv)
    names = a.workloads or list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser().error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    q = a.quick
    d, rest = a.opcua.split("x")
    items, iv = rest.split("@")
    s = Settings(
        runs=a.runs or (1 if q else 3),
        warmup=a.warmup if a.warmup is not None else (2.0 if q else 5.0),
        seconds=a.seconds or (5.0 if q else 20.0),
        peer=a.peer,
        servers=a.modbus_servers,
        rates=a.rates or ([5000, 20000] if q else [1000, 5000, 20000, 50000, 100000, 150000]),
        devices=a.devices or ([1, 100] if q else [1, 10, 100, 500]),
        outage_seconds=a.outage_seconds or (20.0 if q else 300.0),
        opcua_devices=int(d),
        opcua_items=int(items) if not q else min(int(items), 100),
        opcua_interval=float(iv),
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    work = a.work or WORK / stamp
    work.mkdir(parents=True, exist_ok=True)
    if s.peer and "M" in names:
        nodered.install(WORK / "npm-install.log")
    results: dict[str, Any] = {
        "started": stamp,
        "command": "python -m bench " + " ".join(argv),
        "quick": q,
        "settings": s.__dict__,
        "peers": list(PEERS) if s.peer else [],
        "machine": machine(),
        "workloads": {},
    }
    b = Bench(work, s)
    t0 = time.monotonic()
    out = a.out or RESULTS / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            t = time.monotonic()
            results["workloads"][name] = WORKLOADS[name](b)
            results["workloads"][name]["elapsed_s"] = round(time.monotonic() - t)
            results["elapsed_s"] = round(time.monotonic() - t0)
            out.write_text(json.dumps(results, indent=1))  # partial results survive a crash
    finally:
        results["elapsed_s"] = round(time.monotonic() - t0)
        out.write_text(json.dumps(results, indent=1))
    if a.out is None:
        shutil.copyfile(out, RESULTS / "latest.json")
    print(f"bench: results in {out} ({results['elapsed_s']} s)")
    if a.docs:
        report.write(results)
        print(f"bench: wrote {report.DOC}")
    # The outboxes are large (the outage's holds its whole backlog): drop them,
    # keep configs and logs; forget work dirs of invocations a day old.
    for state in work.glob("*/state"):
        shutil.rmtree(state, ignore_errors=True)
    for old in WORK.glob("20*"):
        if old != work and time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    return 0
