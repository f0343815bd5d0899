"""Shutdown stops every device even when a library swallows a cancellation.

Python 3.11's asyncio.wait_for, used inside protocol libraries, can swallow a
cancellation that races a response; seen here with pymodbus under load.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Literal

from gateway import registry
from gateway.config import DeviceConfig, parse_config
from gateway.driver import PolledDriver, Reading
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import running


class StubbornConfig(DeviceConfig):
    driver: Literal["stubborn"]


class StubbornDriver(PolledDriver[StubbornConfig]):
    """Swallows the first cancellation that reaches it mid-poll."""

    config_model = StubbornConfig
    swallowed = 0
    polls = 0

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def poll(self) -> list[Reading]:
        StubbornDriver.polls += 1
        # After 30 quick polls it blocks in a "library call", so the shutdown's
        # cancellation lands there, and is swallowed as the buggy library does.
        try:
            await asyncio.sleep(0.001 if StubbornDriver.polls <= 30 else 30)
        except asyncio.CancelledError:
            StubbornDriver.swallowed += 1
        return [Reading("x", 1.0)]


async def test_device_that_swallows_a_cancellation_still_stops(
    broker: Mosquitto, tmp_path: Path
) -> None:
    registry.register("stubborn", StubbornDriver)
    cfg = parse_config(
        f'[gateway]\nid = "gw"\nstate_dir = "{tmp_path}"\n[broker]\nport = {broker.port}\n'
        '[[devices]]\nid = "s"\ndriver = "stubborn"\npoll_interval = 0.001\n'
        '[[devices.tags]]\nname = "x"\n',
        tmp_path / "gw.toml",
        {},
    )
    async with Collector(broker.port) as col:
        t0 = 0.0
        async with running(cfg):
            await col.wait_for(lambda: len(col.of("s", "x")) >= 30, what="readings")
            t0 = time.monotonic()
        stopped_in = time.monotonic() - t0
        await col.wait_for(lambda: col.of("s", "$stop"), what="stop event")
    assert StubbornDriver.swallowed >= 1
    assert stopped_in < 5, f"shutdown took {stopped_in:.1f} s"
    report = col.verifier.report()
    assert report.ok, report.summary()
