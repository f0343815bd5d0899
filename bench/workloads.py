"""Workloads M (Modbus rate steps), D (device count), O (OPC UA) and the outage."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import nodered
from bench.harness import (
    Run,
    Servers,
    gateway_argv,
    measure,
    modbus_servers,
    modbus_toml,
    opcua_server,
    opcua_toml,
    peer_run,
)
from bench.procs import usage
from simulators.plant import DEMO_CONFIG, DemoPlant
from tests.support.broker import Mosquitto

BLOCKS, BLOCK = 100, 100  # workload M: 100 blocks of 100 holding registers
PEERS = {"nodered-poll": "poll", "nodered-record": "record"}


@dataclass
class Settings:
    runs: int
    warmup: float
    seconds: float
    peer: bool
    servers: int
    rates: list[int]
    devices: list[int]
    outage_seconds: float
    opcua_devices: int
    opcua_items: int
    opcua_interval: float


class Bench:
    """Shared state of one `python -m bench` invocation."""

    def __init__(self, work: Path, settings: Settings) -> None:
        self.work = work
        self.s = settings
        self._n = 0

    def next_dir(self, name: str) -> tuple[Path, str]:
        self._n += 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.work / f"{self._n:03d}-{safe}", f"bench/r{self._n}"

    def broker(self, name: str, *, persistent: bool = False) -> Mosquitto:
        b = Mosquitto(self.work / f"broker-{name}", persistent=persistent)
        b.start()
        return b


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median of the numeric results of several runs; booleans must all hold."""
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        vals = [r.get(k) for r in runs]
        if isinstance(v, bool):
            out[k] = all(bool(x) for x in vals)
        else:
            nums = [x for x in vals if isinstance(x, int | float)]
            if isinstance(v, int | float) and len(nums) == len(vals):
                out[k] = round(statistics.median(nums), 2)
    return out


def _say(system: str, what: str, r: dict[str, Any]) -> None:
    print(
        f"  {system:15s} {what:>14s}: {r['delivered_per_s']:>7} rec/s "
        f"({100 * (r['delivered_ratio'] or 0):5.1f} %), {r['cpu_us_per_record']} µs/rec, "
        f"RSS {r['rss_mb']} MB, p50/p99 {r['latency_ms_p50']}/{r['latency_ms_p99']} ms, "
        f"CPU % server {r['server_cpu_percent']} sub {r['subscriber_cpu_percent']} "
        f"broker {r['broker_cpu_percent']}, verify {'ok' if r['verify_ok'] else 'FAILED'}"
        f"{'' if r['keeps_up'] else ', does NOT keep up'}",
        flush=True,
    )


def _one(
    b: Bench,
    system: str,
    broker: Mosquitto,
    servers: Servers,
    devices: list[tuple[str, int, int]],
    interval: float,
    offered: float,
    label: str,
) -> dict[str, Any]:
    run_dir, prefix = b.next_dir(f"{label}-{system}")
    if system == "gateway":
        cfg = modbus_toml(run_dir, broker.port, prefix, devices, servers.ports, interval)
        run = Run(run_dir, broker.port, prefix, "gateway", gateway_argv(cfg), streams=len(devices))
    else:
        variant = PEERS[system]
        run = peer_run(run_dir, broker.port, prefix, devices, servers.ports, interval, variant)
    try:
        # The window must hold several polls, or a slow rate measures as 0 or 2x.
        window = _whole(b.s.seconds, interval)
        r = measure(
            run, offered, max(b.s.warmup, interval), window, servers, _pid(broker), interval
        )
    except RuntimeError as exc:
        from bench.procs import stop

        stop(run.proc, 30)
        stop(run.sub, 10)
        print(f"  {system}: {label}: FAILED to run: {exc}", flush=True)
        return {"error": str(exc), "keeps_up": False, "verify_ok": False}
    _say(system, label, r)
    return r


def _pid(broker: Mosquitto) -> int | None:
    return broker.proc.pid if broker.proc is not None else None


def _whole(seconds: float, interval: float) -> float:
    """A window of whole poll periods (at least 4): the polls of all devices come in
    bursts, and a window cutting a period short would miscount them."""
    k = max(4, round(seconds / interval))
    return k * interval


def _systems(b: Bench) -> list[str]:
    return ["gateway", *(PEERS if b.s.peer else [])]


def workload_m(b: Bench) -> dict[str, Any]:
    """Rate steps on 100 devices x 100 registers; each system until it stops keeping up."""
    print(f"M: {BLOCKS} devices x {BLOCK} registers, rates {b.s.rates}", flush=True)
    broker = b.broker("M")
    servers = modbus_servers(b.work, b.s.servers, BLOCKS * BLOCK)
    devices = [(f"m{i:03d}", i * BLOCK, BLOCK) for i in range(BLOCKS)]
    systems = _systems(b)
    failed: set[str] = set()
    steps: list[dict[str, Any]] = []
    try:
        for rate in b.s.rates:
            interval = round(BLOCKS * BLOCK / rate, 4)
            offered = BLOCKS * BLOCK / interval
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems if s not in failed}
            if not runs:
                break
            for _ in range(b.s.runs):  # alternate: gateway, peer(s), gateway, ...
                for system in runs:
                    runs[system].append(
                        _one(b, system, broker, servers, devices, interval, offered, f"{rate}/s")
                    )
            for system, rs in runs.items():
                ok = [r for r in rs if "error" not in r]
                med = _median(ok) if ok else {"keeps_up": False, "verify_ok": False}
                med["keeps_up"] = (
                    bool(ok)
                    and statistics.median([1 if r["keeps_up"] else 0 for r in rs]) >= 0.5
                    and all(r.get("verify_ok") for r in ok)
                )
                steps.append(
                    {
                        "rate": rate,
                        "interval_s": interval,
                        "system": system,
                        "median": med,
                        "runs": rs,
                    }
                )
                if not med["keeps_up"]:
                    failed.add(system)
    finally:
        servers.close()
        broker.stop()
    ceiling = {}
    for system in systems:
        kept = [s for s in steps if s["system"] == system and s["median"]["keeps_up"]]
        best = max(kept, key=lambda s: s["median"]["delivered_per_s"], default=None)
        ceiling[system] = {
            "rate_step": best["rate"] if best else None,
            "delivered_per_s": best["median"]["delivered_per_s"] if best else None,
            "first_failed_step": next(
                (s["rate"] for s in steps if s["system"] == system and not s["median"]["keeps_up"]),
                None,
            ),
        }
    return {
        "devices": BLOCKS,
        "tags_per_device": BLOCK,
        "modbus_servers": b.s.servers,
        "steps": steps,
        "ceiling": ceiling,
    }


def workload_d(b: Bench) -> dict[str, Any]:
    """10,000 tags at 1 s (10,000 records/s) split over 1..500 devices: the gateway alone."""
    total, interval = 10_000, 1.0
    print(f"D: {total} tags at {interval} s over {b.s.devices} devices", flush=True)
    broker = b.broker("D")
    servers = modbus_servers(b.work, b.s.servers, total)
    steps: list[dict[str, Any]] = []
    try:
        for _ in range(b.s.runs):
            for n in b.s.devices:
                per = total // n
                devices = [(f"d{i:03d}", i * per, per) for i in range(n)]
                offered = n * per / interval
                r = _one(b, "gateway", broker, servers, devices, interval, offered, f"{n} dev")
                steps.append({"devices": n, "tags_per_device": per, "run": r})
    finally:
        servers.close()
        broker.stop()
    rows = []
    for n in b.s.devices:
        rs = [s["run"] for s in steps if s["devices"] == n and "error" not in s["run"]]
        med = _median(rs) if rs else {}
        rows.append({"devices": n, "tags_per_device": total // n, "median": med, "runs": rs})
    return {"total_tags": total, "interval_s": interval, "rows": rows}


def workload_o(b: Bench) -> dict[str, Any]:
    """OPC UA: devices x items monitored at the interval, from one bioreactor simulator."""
    d, n, iv = b.s.opcua_devices, b.s.opcua_items, b.s.opcua_interval
    print(f"O: {d} OPC UA devices x {n} items at {iv} s", flush=True)
    broker = b.broker("O")
    server = opcua_server(b.work, d * n, iv)
    offered = d * n / iv
    runs = []
    try:
        for _ in range(b.s.runs):
            run_dir, prefix = b.next_dir("O-gateway")
            cfg = opcua_toml(run_dir, broker.port, prefix, server.endpoints[0], d, n, iv)
            run = Run(run_dir, broker.port, prefix, "gateway", gateway_argv(cfg), streams=d)
            try:
                r = measure(run, offered, max(b.s.warmup, 5.0), b.s.seconds, server, _pid(broker))
            except RuntimeError as exc:
                print(f"  O: FAILED to run: {exc}", flush=True)
                runs.append({"error": str(exc), "keeps_up": False, "verify_ok": False})
                continue
            # What the simulator really offered (it can change its variables less
            # often than asked): judge keeping up against that, say both.
            ups = r.get("server_updates_per_s")
            if ups:
                r["offered_by_server_per_s"] = round(d * n * ups)
                ratio = r["delivered_per_s"] / r["offered_by_server_per_s"]
                r["delivered_vs_server"] = round(ratio, 4)
                r["keeps_up"] = bool(r["verify_ok"] and ratio >= 0.97)
            _say("gateway", f"{d}x{n} items", r)
            runs.append(r)
    finally:
        server.close()
        broker.stop()
    ok = [r for r in runs if "error" not in r]
    return {
        "devices": d,
        "items_per_device": n,
        "interval_s": iv,
        "median": _median(ok) if ok else {},
        "runs": runs,
    }


def outage(b: Bench) -> dict[str, Any]:
    """5,000 records/s; the broker stopped for outage_seconds, then restarted."""
    rate, secs = 5_000, b.s.outage_seconds
    interval = BLOCKS * BLOCK / rate
    print(f"outage: {rate} records/s, broker down {secs} s", flush=True)
    broker = b.broker("outage", persistent=True)  # the subscriber's session survives
    servers = modbus_servers(b.work, b.s.servers, BLOCKS * BLOCK)
    devices = [(f"o{i:03d}", i * BLOCK, BLOCK) for i in range(BLOCKS)]
    run_dir, prefix = b.next_dir("outage-gateway")
    cfg = modbus_toml(run_dir, broker.port, prefix, devices, servers.ports, interval)
    run = Run(run_dir, broker.port, prefix, "gateway", gateway_argv(cfg), streams=len(devices))
    samples: list[tuple[float, float, str]] = []
    try:
        run.start()
        assert run.proc is not None
        pid = run.proc.pid
        time.sleep(max(b.s.warmup, 2 * interval))

        def sample(phase: str, until: float) -> None:
            while time.monotonic() < until:
                samples.append((round(time.time(), 2), usage(pid).rss_mb, phase))
                time.sleep(1.0)

        sample("before", time.monotonic() + 2 * interval)
        c0 = usage(pid).cpu_s
        t_down = time.time_ns()
        broker.stop()
        sample("outage", time.monotonic() + secs)
        broker.start()
        t_up = time.time_ns()
        # Back: drain while acquisition goes on; caught up once fresh records arrive fast.
        deadline = time.monotonic() + max(120.0, secs)
        while time.monotonic() < deadline:
            samples.append((round(time.time(), 2), usage(pid).rss_mb, "drain"))
            st = run.status()
            lat = st.get("last_latency_ms")
            if st["last_recv_ns"] > t_up and lat is not None and lat < 1000:
                break
            time.sleep(0.5)
        sample("after", time.monotonic() + 2 * interval)
        c1 = usage(pid).cpu_s
        hwm = usage(pid).hwm_mb
        res, msgs, rc = run.finish()
    finally:
        from bench.procs import stop

        stop(run.proc, 180)
        stop(run.sub, 10)
        servers.close()
        broker.stop()
    recv, count, lat = msgs
    ts = [recv[i] - lat[i] for i in range(len(recv))]
    backlog_idx = [i for i in range(len(recv)) if t_down <= ts[i] < t_up]
    backlog = sum(count[i] for i in backlog_idx)
    after = [i for i in range(len(recv)) if recv[i] >= t_up]
    drain: dict[str, Any] = {}
    if backlog_idx and after:
        t_first = min(recv[i] for i in after)
        t_caught = max(recv[i] for i in range(len(recv)) if ts[i] < t_up)
        moved = sum(count[i] for i in after if recv[i] <= t_caught)
        span = (t_caught - t_first) / 1e9
        drain = {
            "reconnect_s": round((t_first - t_up) / 1e9, 2),
            "drain_s": round(span, 2),
            "drain_records_per_s": round(moved / span) if span > 0 else None,
        }
        if drain["drain_records_per_s"]:
            drain["drain_over_acquisition"] = round(drain["drain_records_per_s"] / rate, 1)
    during = [m for _, m, p in samples if p == "outage"]
    rss = {
        "rss_mb_outage_start": during[0] if during else None,
        "rss_mb_outage_end": during[-1] if during else None,
        "rss_mb_outage_max": max(during) if during else None,
        "rss_mb_before": next((m for _, m, p in samples if p == "before"), None),
        "hwm_mb": round(hwm, 1),
    }
    if during:
        rss["rss_growth_mb"] = round(during[-1] - during[0], 1)
    wall = (samples[-1][0] - samples[0][0]) if samples else 0
    out = {
        "rate": rate,
        "outage_s": secs,
        "backlog_records": backlog,
        **drain,
        **rss,
        "cpu_s": round(c1 - c0, 1),
        "verify_ok": bool(res["verify_ok"]) and rc == 0,
        "records_total": res["records"],
        "missing": res["missing"],
        "duplicates": res["duplicates"],
        "problems": res["problems"][:10],
        "rss_samples": [(t, round(m, 1), p) for t, m, p in samples],
        "sample_span_s": round(wall, 1),
    }
    print(
        f"  gateway outage {secs:.0f} s: backlog {backlog} records, drained at "
        f"{out.get('drain_records_per_s')} rec/s ({out.get('drain_over_acquisition')}x), "
        f"RSS {rss['rss_mb_outage_start']} -> {rss['rss_mb_outage_end']} MB, "
        f"missing {res['missing']}, verify {'ok' if out['verify_ok'] else 'FAILED'}",
        flush=True,
    )
    return out


def workload_a(b: Bench) -> dict[str, Any]:
    """Every driver kind in one gateway: the demo plant and config/demo.toml."""
    print("A: the demo plant (Modbus TCP, OPC UA, serial, SiLA 2 over TLS)", flush=True)
    broker = b.broker("A")
    work = b.work / "plant"
    work.mkdir(parents=True, exist_ok=True)
    plant = DemoPlant(work, broker.port, log=(work / "simulators.log").open("ab"))
    devices = DEMO_CONFIG.read_text().count("[[devices]]")
    runs = []
    try:
        plant.start(time_scale=600)
        servers = Servers(plant.procs, [])
        for _ in range(b.s.runs):
            run_dir, prefix = b.next_dir("A-gateway")
            run_dir.mkdir(parents=True)
            cfg = plant.write_config(run_dir / "gateway.toml", prefix)
            env = dict(plant.env, DEMO_STATE_DIR=str(run_dir / "state"))
            run = Run(run_dir, broker.port, prefix, "gateway", gateway_argv(cfg), env, devices)
            try:
                # The sampler answers every 10 s: a window of several of its polls.
                r = measure(
                    run, 0, max(b.s.warmup, 5.0), max(b.s.seconds, 20.0), servers, _pid(broker)
                )
            except RuntimeError as exc:
                print(f"  A: FAILED to run: {exc}", flush=True)
                runs.append({"error": str(exc), "verify_ok": False})
                continue
            print(
                f"  gateway     all four drivers: {r['delivered_per_s']} good rec/s, "
                f"CPU {r['cpu_percent']} %, RSS {r['rss_mb']} MB (max {r['rss_mb_max']}, "
                f"HWM {r['hwm_mb']}), verify {'ok' if r['verify_ok'] else 'FAILED'}",
                flush=True,
            )
            runs.append(r)
    finally:
        plant.stop()
        broker.stop()
    ok = [r for r in runs if "error" not in r]
    return {"devices": devices, "median": _median(ok) if ok else {}, "runs": runs}


WORKLOADS = {
    "M": workload_m,
    "D": workload_d,
    "O": workload_o,
    "A": workload_a,
    "outage": outage,
}
__all__ = ["WORKLOADS", "Bench", "Settings", "nodered"]
