"""Fixtures: a real Mosquitto per session (and per test where a test stops it); a simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker shared by tests that never stop it."""
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker this test may stop and restart (persistent, so sessions survive)."""
    work = tmp_path / "mosquitto"
    b = Mosquitto(work, persistent=True)
    b.start()
    yield b
    b.stop()


@pytest.fixture
async def sim() -> AsyncIterator[OffGasSimulator]:
    """One Modbus TCP off-gas unit, 600x time. A module that needs another simulator
    (more units, RTU, OPC UA) defines its own ``sim``, which takes precedence."""
    s = OffGasSimulator(time_scale=600, update_interval=0.05)
    await s.start()
    yield s
    await s.stop()
