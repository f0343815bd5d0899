"""Hot-path benchmark: readings -> records -> chain -> outbox -> MQTT -> verifying subscriber.

Runs the real pipeline (DeviceStream, Outbox with fsync, Publisher, Mosquitto)
with a synthetic driver so the number measured is the gateway's own cost, not a
device's. The subscriber runs in another process and verifies every record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import BrokerSection, DeviceConfig, TagConfig  # noqa: E402
from gateway.driver import Reading  # noqa: E402
from gateway.outbox import Outbox  # noqa: E402
from gateway.publisher import Publisher  # noqa: E402
from gateway.stream import DeviceStream  # noqa: E402
from tests.support.broker import Mosquitto  # noqa: E402

DURABILITY = "full"


def subscriber(port: int, expect: int, ready: mp.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    from gateway.record import decode_payload
    from gateway.subscribe import subscribe
    from gateway.verify import Verifier

    v = Verifier()
    seqs: set[int] = set()
    latencies: list[int] = []
    stop = asyncio.Event()

    def on(topic: str, payload: bytes) -> None:
        if topic.endswith("$status"):
            return
        now = time.time_ns()
        records = decode_payload(payload)
        for r in records:
            v.add(r, topic)
            seqs.add(r["seq"])
        latencies.append(now - records[-1]["ts"])
        if len(seqs) >= expect:
            stop.set()

    async def run() -> None:
        r = asyncio.Event()
        task = asyncio.create_task(
            subscribe(
                BrokerSection(port=port),
                "bench/#",
                on,
                stop=stop,
                ready=r,
                client_id="bench-sub",
                session_expiry=600,
            )
        )
        await r.wait()
        ready.set()
        await asyncio.wait_for(task, 600)

    asyncio.run(run())
    rep = v.report()
    latencies.sort()
    pct = lambda p: round(latencies[int(p * (len(latencies) - 1))] / 1e6, 2)  # noqa: E731
    out.put(
        {
            "received": len(seqs),
            "verify_ok": rep.ok,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p99": pct(0.99),
        }
    )


async def gateway_side(port: int, per_cycle: int, rate: float, seconds: float, db: Path) -> dict:
    dev = DeviceConfig(
        id="dev", driver="bench", tags=[TagConfig(name=f"t{i}") for i in range(per_cycle)]
    )
    outbox = await Outbox.open(db, gateway_id="bench", durability=DURABILITY)
    broker = BrokerSection(port=port, topic_prefix="bench")
    pub = Publisher(broker, "bench", outbox)
    ptask = asyncio.create_task(pub.run())
    stream = DeviceStream("bench", dev, outbox)
    names = [t.name for t in dev.tags]
    await asyncio.sleep(0.5)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    cycles = int(rate * seconds)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for c in range(cycles):
        await stream.emit([Reading(n, float(c) + i * 0.001) for i, n in enumerate(names)])
        target = start + (c + 1) / rate
        delay = target - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    acquired = time.perf_counter() - t0
    await pub.drain(120)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    await pub.stop()
    ptask.cancel()
    await asyncio.gather(ptask, return_exceptions=True)
    await outbox.close()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    n = cycles * per_cycle
    return {
        "records": n,
        "offered_per_s": round(n / acquired),
        "delivered_per_s": round(n / wall),
        "cpu_us_per_record": round(cpu / n * 1e6, 2),
        "user_s": round(r1.ru_utime - r0.ru_utime, 2),
        "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
        "outbox_commits": outbox.commits,
        "gateway_cpu_percent": round(cpu / wall * 100, 1),
        "rss_mb": round(r1.ru_maxrss / 1024, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records-per-cycle", type=int, default=100)
    ap.add_argument("--cycles-per-s", type=float, default=50)
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    broker = Mosquitto(work / "mq")
    broker.start()
    try:
        expect = int(a.cycles_per_s * a.seconds) * a.records_per_cycle
        ready, out = mp.Event(), mp.Queue()
        sub = mp.Process(target=subscriber, args=(broker.port, expect, ready, out))
        sub.start()
        ready.wait(10)
        res = asyncio.run(
            gateway_side(
                broker.port, a.records_per_cycle, a.cycles_per_s, a.seconds, work / "outbox.db"
            )
        )
        sub.join(120)
        res.update(out.get(timeout=5) if not out.empty() else {"received": None})
        res.update(records_per_cycle=a.records_per_cycle, cycles_per_s=a.cycles_per_s)
        print(json.dumps(res))
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
