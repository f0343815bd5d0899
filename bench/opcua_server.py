"""Workload O's server: the bioreactor simulator with N extra variables, counting its updates.

The simulator waits ``--interval`` after each update, and writing thousands of
variables takes time of its own, so it may change them less often than asked.
This process writes its update count to ``--counter`` twice a second so the
harness can state the rate actually offered. Prints ``endpoint <url>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

from simulators.bioreactor import BioreactorSimulator


class CountingSimulator(BioreactorSimulator):
    ticks = 0

    async def tick(self, wall_seconds: float | None = None) -> None:
        await super().tick(wall_seconds)
        self.ticks += 1


async def serve(items: int, interval: float, counter: Path) -> None:
    sim = CountingSimulator(update_interval=interval, extra_variables=items)
    await sim.start()
    print(f"endpoint {sim.endpoint}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    tmp = counter.with_suffix(".tmp")
    while not done.is_set():
        tmp.write_text(json.dumps({"ticks": sim.ticks, "t": time.monotonic()}))
        os.replace(tmp, counter)
        await asyncio.sleep(0.5)
    await sim.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--counter", type=Path, required=True)
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    asyncio.run(serve(a.items, a.interval, a.counter))


if __name__ == "__main__":
    main()
