"""OPC UA driver benchmark: monitored items per second the driver sustains, and its CPU.

The bioreactor simulator (a real asyncua server) runs in a child process with
``--items`` extra Double variables that all change at every update; the driver
runs here, subscribed to every one of them (sampling and publishing interval
``--interval``), and hands its readings to a counting sink (no outbox, no MQTT:
``bench/pipeline.py`` measures those). Prints one JSON line:

* ``subscribe_s`` / ``items_per_s_created``: time to create the monitored items
  (in batches of ``--batch``) and the rate;
* ``offered_per_s``: notifications the server was asked to produce
  (items x simulator updates per second, as achieved by the simulator);
* ``delivered_per_s``: readings the driver delivered in the steady state;
* ``driver_cpu_pct``: this process's CPU time / wall time (100 = one core);
* ``sim_cpu_pct``: the simulator's, for comparison (it runs in its own process);
* ``coalesced``: notifications the driver dropped by coalescing (0 unless the
  sink is slower than the server);
* ``max_rss_mb``: this process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def simulator(items: int, interval: float, ready: Any, stop: Any, out: Any) -> None:
    """Child process: serve ``items`` changing variables until ``stop`` is set."""
    import logging

    logging.disable(logging.WARNING)
    from simulators.bioreactor import BioreactorSimulator

    async def main() -> None:
        sim = BioreactorSimulator(time_scale=3600, update_interval=interval, extra_variables=items)
        await sim.start()
        ready.put(sim.endpoint)
        t0, c0 = time.monotonic(), time.process_time()
        h0 = len(sim.history)
        await asyncio.to_thread(stop.wait)  # a multiprocessing.Event
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        updates = len(sim.history) - h0  # history is bounded: fine for short runs
        out.put({"sim_updates_per_s": updates / wall, "sim_cpu_pct": 100 * cpu / wall})
        await sim.stop()

    asyncio.run(main())


async def bench(endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    from drivers.opcua.config import OpcUaDevice
    from drivers.opcua.driver import OpcUaDriver
    from gateway.driver import Reading

    uri = "urn:gateway:simulators:bioreactor"
    dev = OpcUaDevice.model_validate(
        {
            "id": "bench",
            "driver": "opcua",
            "endpoint": endpoint,
            "timeout": 10.0,
            "publishing_interval": args.interval,
            "max_items_per_call": args.batch,
            "buffer_size": args.buffer_size,
            "tags": [
                {
                    "name": f"v{i:05d}",
                    "node_id": f"nsu={uri};s=Scale.V{i:05d}",
                    "sampling_interval": args.interval,
                    "unit": "1",
                }
                for i in range(args.items)
            ],
        }
    )
    drv = OpcUaDriver(dev)
    count = 0
    seen: set[str] = set()
    all_seen = asyncio.Event()

    async def emit(readings: list[Reading]) -> None:
        nonlocal count
        count += len(readings)
        if not all_seen.is_set():
            seen.update(r.tag for r in readings)
            if len(seen) >= args.items:
                all_seen.set()

    t0 = time.monotonic()
    await drv.connect()
    connect_s = time.monotonic() - t0
    task = asyncio.create_task(drv.run(emit))
    await asyncio.wait_for(all_seen.wait(), 120)
    first_round_s = time.monotonic() - t0
    await asyncio.sleep(1.0)  # settle
    n0, w0, c0 = count, time.monotonic(), time.process_time()
    await asyncio.sleep(args.seconds)
    n1, w1, c1 = count, time.monotonic(), time.process_time()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await drv.close()
    wall = w1 - w0
    return {
        "items": args.items,
        "interval_s": args.interval,
        "connect_s": round(connect_s, 3),
        "subscribe_s": round(drv.subscribe_seconds, 3),
        "items_per_s_created": round(args.items / drv.subscribe_seconds)
        if drv.subscribe_seconds
        else None,
        "first_value_of_every_item_s": round(first_round_s, 3),
        "delivered_per_s": round((n1 - n0) / wall),
        "driver_cpu_pct": round(100 * (c1 - c0) / wall, 1),
        "driver_cpu_us_per_reading": round(1e6 * (c1 - c0) / max(1, n1 - n0), 2),
        "coalesced": drv.coalesced,
        "lost_messages": drv.lost_messages,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=0.1, help="sampling/publishing, s")
    parser.add_argument("--sim-interval", type=float, default=None, help="default: --interval")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=500, help="items per CreateMonitoredItems")
    parser.add_argument("--buffer-size", type=int, default=20000)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    ctx = mp.get_context("spawn")
    ready, out, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    sim_interval = args.sim_interval or args.interval
    proc = ctx.Process(target=simulator, args=(args.items, sim_interval, ready, stop, out))
    proc.start()
    try:
        endpoint = ready.get(timeout=120)
        result = asyncio.run(bench(endpoint, args))
    finally:
        stop.set()
    sim = out.get(timeout=30)
    proc.join(30)
    result["sim_interval_s"] = sim_interval
    result["offered_per_s"] = round(args.items * sim["sim_updates_per_s"])
    result["sim_updates_per_s"] = round(sim["sim_updates_per_s"], 2)
    result["sim_cpu_pct"] = round(sim["sim_cpu_pct"], 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
