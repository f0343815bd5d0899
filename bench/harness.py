"""One measurement: start a subscriber and the system under test, measure a window, stop.

The system is the gateway (``python -m gateway run -c <generated toml>``, a real
process) or the Node-RED peer. Its CPU and RSS come from /proc of its own pid;
records/s and latency from the subscriber (another process), which verifies
every record. The servers it polls (pymodbus, the OPC UA simulator) are
measured the same way, to show when they, not the client, are the limit.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import nodered
from bench.procs import Usage, python, spawn, stop, usage
from bench.subscriber import read_messages

KEEP_UP = 0.97


@dataclass
class Servers:
    """The device servers of a workload: their processes and ports."""

    procs: list[subprocess.Popen[bytes]]
    ports: list[int]
    endpoints: list[str] = field(default_factory=list)
    counter: Path | None = None  # updates so far, written by bench/opcua_server.py

    def updates(self) -> tuple[float, int] | None:
        """(monotonic time, updates) of a counting server."""
        if self.counter is None:
            return None
        for _ in range(20):
            try:
                c = json.loads(self.counter.read_text())
                return float(c["t"]), int(c["ticks"])
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        return None

    def usage(self) -> list[Usage]:
        return [usage(p.pid) for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            stop(p, 10)


def modbus_servers(work: Path, count: int, registers: int) -> Servers:
    """``count`` pymodbus server processes, each holding all ``registers``."""
    procs, ports = [], []
    for i in range(count):
        log = work / f"modbus-server-{time.monotonic_ns()}-{i}.log"  # fresh: ports are read from it
        p = spawn([python(), "-m", "bench.modbus_server", "--registers", str(registers)], log)
        procs.append(p)
        ports.append(_wait_line(log, "port ", p, lambda s: int(s.split()[1])))
    return Servers(procs, ports)


def opcua_server(work: Path, items: int, interval: float) -> Servers:
    """The bioreactor simulator with ``items`` extra variables changing every ``interval``."""
    tag = time.monotonic_ns()
    log, counter = work / f"bioreactor-{tag}.log", work / f"bioreactor-{tag}.json"
    argv = [python(), "-m", "bench.opcua_server", "--items", str(items)]
    p = spawn([*argv, "--interval", str(interval), "--counter", str(counter)], log)
    endpoint = _wait_line(log, "endpoint ", p, lambda s: s.split()[1])
    return Servers([p], [], [endpoint], counter)


def _wait_line(
    log: Path, marker: str, proc: subprocess.Popen[bytes], parse: Callable[[str], Any]
) -> Any:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if marker in line:
                    return parse(line)
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}; see {log}")
        time.sleep(0.1)
    raise RuntimeError(f"{proc.args!r} did not start in 120 s; see {log}")


# ---------------------------------------------------------------- configs
def modbus_toml(
    run_dir: Path,
    broker_port: int,
    prefix: str,
    devices: list[tuple[str, int, int]],
    ports: list[int],
    interval: float,
) -> Path:
    """Gateway config: one Modbus device per (id, first register, count), uint16 tags."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = [_head(run_dir, broker_port, prefix)]
    for i, (dev, base, count) in enumerate(devices):
        tags = ", ".join(f'{{name = "r{a}", address = {a}}}' for a in range(base, base + count))
        out.append(
            f'[[devices]]\nid = "{dev}"\ndriver = "modbus"\nhost = "127.0.0.1"\n'
            f"port = {ports[i % len(ports)]}\nunit_id = 1\npoll_interval = {interval}\n"
            f"tags = [{tags}]\n"
        )
    path = run_dir / "gateway.toml"
    path.write_text("\n".join(out))
    return path


def opcua_toml(
    run_dir: Path,
    broker_port: int,
    prefix: str,
    endpoint: str,
    devices: int,
    items: int,
    interval: float,
) -> Path:
    """Gateway config: ``devices`` OPC UA devices, each subscribed to ``items`` variables."""
    uri = "urn:gateway:simulators:bioreactor"
    run_dir.mkdir(parents=True, exist_ok=True)
    out = [_head(run_dir, broker_port, prefix)]
    for d in range(devices):
        tags = ", ".join(
            f'{{name = "v{i:05d}", node_id = "nsu={uri};s=Scale.V{i:05d}", '
            f"sampling_interval = {interval}}}"
            for i in range(d * items, (d + 1) * items)
        )
        out.append(
            f'[[devices]]\nid = "ua{d:02d}"\ndriver = "opcua"\nendpoint = "{endpoint}"\n'
            f"publishing_interval = {interval}\ntimeout = 30.0\ntags = [{tags}]\n"
        )
    path = run_dir / "gateway.toml"
    path.write_text("\n".join(out))
    return path


def _head(run_dir: Path, broker_port: int, prefix: str) -> str:
    # Defaults everywhere (outbox durability "full", QoS 1, inflight) except:
    # a long shutdown_timeout so a stop publishes the whole backlog, and a short
    # reconnect_max so the outage's drain starts when the broker is back rather
    # than up to 30 s later (the backoff is not what is measured). The health
    # endpoint stays on (it is on by default), on a free port.
    return (
        f'[gateway]\nid = "bench"\nstate_dir = "{run_dir / "state"}"\n'
        'shutdown_timeout = 120.0\nlog_level = "warning"\n'
        f'[broker]\nport = {broker_port}\ntopic_prefix = "{prefix}"\n'
        "reconnect_min = 0.1\nreconnect_max = 1.0\n"
        "[health]\nport = 0\n"
    )


# ---------------------------------------------------------------- a run
@dataclass
class Run:
    """One system under test with its subscriber; see :func:`measure`."""

    run_dir: Path
    broker_port: int
    prefix: str
    fmt: str  # "gateway" or "peer"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    streams: int = 0  # $stop events that mean the gateway published everything
    sub: subprocess.Popen[bytes] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def sub_dir(self) -> Path:
        return self.run_dir / "sub"

    def start(self, first_record_timeout: float = 120.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sub = spawn(
            [
                python(),
                "-m",
                "bench.subscriber",
                "--port",
                str(self.broker_port),
                "--topic",
                f"{self.prefix}/#",
                "--format",
                self.fmt,
                "--client-id",
                f"bench-sub-{self.prefix.replace('/', '-')}",
                "--out",
                str(self.sub_dir),
            ],
            self.run_dir / "subscriber.log",
        )
        _wait(lambda: (self.sub_dir / "ready").exists(), 30, "subscriber ready", self.sub)
        self.proc = spawn(self.argv, self.run_dir / "system.log", env=self.env)
        _wait(lambda: self.status()["records"] > 0, first_record_timeout, "first record", self.proc)

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.sub_dir / "status.json").read_text()))
        except (OSError, ValueError):
            return {"records": 0, "stops": 0, "last_recv_ns": 0, "last_latency_ms": None}

    def finish(self) -> tuple[dict[str, Any], tuple[list[int], list[int], list[int]], int | None]:
        """Stop the system, wait for everything it sent, stop the subscriber."""
        rc = stop(self.proc, 180)
        if self.fmt == "gateway" and self.streams:
            # After SIGTERM the gateway publishes its backlog, then exits: the
            # $stop of every stream marks the end of what it will send.
            # (If some never comes, the verification reports the records missing.)
            with contextlib.suppress(RuntimeError):
                _wait(lambda: self.status()["stops"] >= self.streams, 60, "every $stop", None)
        _settle(self.status)
        stop(self.sub, 60)
        res = json.loads((self.sub_dir / "result.json").read_text())
        return res, read_messages(self.sub_dir / "messages.bin"), rc


def _wait(
    cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: {proc.args!r:.200} exited with {proc.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not within {timeout} s")


def _settle(status: Callable[[], dict[str, Any]], quiet: float = 2.0, timeout: float = 120) -> None:
    """Wait until the subscriber has received nothing new for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = status()["records"]
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.25)


# ---------------------------------------------------------------- statistics
def window(msgs: tuple[list[int], list[int], list[int]], t0_ns: int, t1_ns: int) -> dict[str, Any]:
    """Records and latency of the messages received in [t0, t1)."""
    recv, count, lat = msgs
    sel = [(lat[i], count[i], recv[i]) for i in range(len(recv)) if t0_ns <= recv[i] < t1_ns]
    n = sum(c for _, c, _ in sel)
    third = (t1_ns - t0_ns) / 3
    first = [(lt, c) for lt, c, r in sel if r < t0_ns + third]
    last = [(lt, c) for lt, c, r in sel if r >= t1_ns - third]
    pairs = [(lt, c) for lt, c, _ in sel]
    return {
        "records": n,
        "messages": len(sel),
        "latency_ms_p50": _pct(pairs, 0.50),
        "latency_ms_p99": _pct(pairs, 0.99),
        "latency_ms_p50_first_third": _pct(first, 0.50),
        "latency_ms_p50_last_third": _pct(last, 0.50),
    }


def _pct(pairs: list[tuple[int, int]], p: float) -> float | None:
    """Percentile of latencies weighted by the records each message carried."""
    if not pairs:
        return None
    pairs = sorted(pairs)
    total = sum(c for _, c in pairs)
    goal, acc = p * total, 0
    for lt, c in pairs:
        acc += c
        if acc >= goal:
            return round(lt / 1e6, 2)
    return round(pairs[-1][0] / 1e6, 2)


def latency_growing(m: dict[str, Any]) -> bool:
    """The queue is building up: the last third's median latency is well above the first's."""
    a, b = m.get("latency_ms_p50_first_third"), m.get("latency_ms_p50_last_third")
    if a is None or b is None:
        return True
    return bool(b > 2 * a + 20)


def measure(
    run: Run,
    offered: float,
    warmup: float,
    seconds: float,
    servers: Servers | None,
    broker_pid: int | None = None,
    period: float | None = None,
) -> dict[str, Any]:
    """Start ``run``, measure ``seconds`` after ``warmup``, stop; one result dict.

    With a poll ``period`` the window starts half a period after a poll burst
    (the first record received, plus whole periods), so that a window of whole
    periods counts every burst exactly once.
    """
    t_start = time.monotonic()
    run.start()
    assert run.proc is not None
    startup = time.monotonic() - t_start
    start_ns = time.time_ns() + int(warmup * 1e9)
    if period:
        first = int(run.status().get("first_recv_ns") or time.time_ns())
        k = math.ceil((start_ns - first) / 1e9 / period - 0.5)
        start_ns = first + int((k + 0.5) * period * 1e9)
    time.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
    pid = run.proc.pid
    assert run.sub is not None
    # The subscriber and the broker share the 2 cores: their CPU shows when they are the limit.
    others = [run.sub.pid, *([broker_pid] if broker_pid else [])]
    o0 = [usage(p) for p in others]
    u0 = usage(pid)
    s0 = servers.usage() if servers else []
    c0 = servers.updates() if servers else None
    t0 = time.time_ns()
    rss: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        u = usage(pid)
        rss.append(u.rss_mb)
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    u1 = usage(pid)
    s1 = servers.usage() if servers else []
    o1 = [usage(p) for p in others]
    c1 = servers.updates() if servers else None
    t1 = t0 + int(seconds * 1e9)  # exactly the window asked for (see workloads._whole)
    while time.time_ns() < t1 + 200_000_000:  # what was sent in the window, received
        time.sleep(0.05)
    rss.append(u1.rss_mb)
    res, msgs, rc = run.finish()
    wall = (t1 - t0) / 1e9
    w = window(msgs, t0, t1)
    delivered = w["records"] / wall
    # CPU over the same span (the usage samples bracket it within milliseconds).
    cpu = (u1.cpu_s - u0.cpu_s) * wall / (u1.t - u0.t)
    out: dict[str, Any] = {
        "offered_per_s": round(offered),
        "delivered_per_s": round(delivered),
        "delivered_ratio": round(delivered / offered, 4) if offered else None,
        "cpu_us_per_record": round(cpu / w["records"] * 1e6, 2) if w["records"] else None,
        "cpu_percent": round(100 * cpu / wall, 1),
        "rss_mb": round(statistics.median(rss), 1),
        "rss_mb_max": round(max(rss), 1),
        "hwm_mb": round(u1.hwm_mb, 1),
        "server_cpu_percent": [_pct_cpu(a, b) for a, b in zip(s0, s1, strict=True)],
        "server_updates_per_s": round((c1[1] - c0[1]) / (c1[0] - c0[0]), 2)
        if c0 and c1 and c1[0] > c0[0]
        else None,
        "subscriber_cpu_percent": _pct_cpu(o0[0], o1[0]),
        "broker_cpu_percent": _pct_cpu(o0[1], o1[1]) if broker_pid else None,
        "startup_s": round(startup, 1),
        "window_s": round(wall, 2),
        "exit_status": rc,
        **{k: v for k, v in w.items() if k != "records"},
        "records_in_window": w["records"],
        "verify_ok": bool(res["verify_ok"]) and (rc in (0, None) or run.fmt == "peer"),
        "records_total": res["records"],
        "missing": res["missing"],
        "bad_quality": res["bad_quality"],
        "duplicates": res["duplicates"],
        "problems": res["problems"][:10],
    }
    out["keeps_up"] = bool(
        out["verify_ok"]
        and out["delivered_ratio"] is not None
        and out["delivered_ratio"] >= KEEP_UP
        and not latency_growing(out)
    )
    return out


def _pct_cpu(a: Usage, b: Usage) -> float:
    return round(100 * (b.cpu_s - a.cpu_s) / (b.t - a.t), 1)


def gateway_argv(config: Path) -> list[str]:
    return [python(), "-m", "gateway", "run", "--config", str(config)]


def peer_run(
    run_dir: Path,
    broker_port: int,
    prefix: str,
    devices: list[tuple[str, int, int]],
    ports: list[int],
    interval: float,
    variant: str,
) -> Run:
    flows = nodered.flow(devices, ports, interval, broker_port, prefix, variant)
    argv, env = nodered.command(run_dir, flows)
    return Run(run_dir, broker_port, prefix, "peer", argv, env)
