"""The demo works: its four simulators and a gateway on config/demo.toml (real
processes, real broker) deliver verified records from every device.

The same plant serves the benchmark's workload A, so this also keeps that
workload from rotting.
"""

from __future__ import annotations

import signal
from pathlib import Path

from simulators.plant import DemoPlant
from tests.support.broker import Mosquitto
from tests.support.collector import Collector

DEVICES = {"offgas-1", "offgas-2", "balance-1", "bioreactor-1", "sampler-1"}


async def test_demo_plant_delivers_verified_records_from_every_device(
    broker: Mosquitto, tmp_path: Path
) -> None:
    log = (tmp_path / "plant.log").open("ab")
    plant = DemoPlant(tmp_path, broker.port, log=log)
    try:
        plant.start(time_scale=600)
        cfg = plant.write_config(tmp_path / "gateway.toml")  # state dir: tmp_path/state
        async with Collector(broker.port, "plant/demo-gw/#") as col:
            gw = plant.spawn(["run", "--config", str(cfg)])

            def good_from_all() -> bool:
                seen = {r["dev"] for r in col.records if r["q"] == "good" and r["tag"][0] != "$"}
                return seen >= DEVICES

            await col.wait_for(good_from_all, 60, "a good reading from every demo device")
            gw.send_signal(signal.SIGTERM)
            assert gw.wait(30) == 0
            await col.wait_for(
                lambda: {r["dev"] for r in col.records if r["tag"] == "$stop"} >= DEVICES,
                10,
                "$stop of every device",
            )
        report = col.verifier.report()
        assert report.ok, report.summary()
        assert {r["unit"] for r in col.of("bioreactor-1", "temperature")} == {"Cel"}
    finally:
        plant.stop()
        log.close()
        # No simulator may outlive the test.
        assert all(p.poll() is not None for p in plant.procs)
