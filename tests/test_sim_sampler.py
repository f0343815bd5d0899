"""The sampler simulator seen by sila2's own client (not this project's driver)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sila2.client import SilaClient

from simulators import bioreactor_model
from simulators.bioreactor import BioreactorSimulator
from simulators.sampler import server as sampler_server
from simulators.sampler.server import SampleFailed, SamplerSimulator


@pytest.fixture(scope="module")
def sim() -> Iterator[SamplerSimulator]:
    s = SamplerSimulator(port=0, insecure=True, sample_interval=3600, analysis_time=0.2)
    s.start()
    yield s
    s.stop()


def test_take_sample_reports_progress_and_publishes_results(sim: SamplerSimulator) -> None:
    deadline = time.monotonic() + 10
    while sim.sample_count < 1 or sim.state != "Idle":  # the first automatic sample
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client = SilaClient("127.0.0.1", sim.port, insecure=True)
    try:
        assert client.SiLAService.ServerName.get() == "At-line sampler"
        before = client.Sampler.SampleCount.get()
        instance = client.Sampler.TakeSample()
        progress = []
        deadline = time.monotonic() + 10
        while not instance.done:  # sila2 updates it from an execution-info subscription
            assert time.monotonic() < deadline
            progress.append(instance.progress)
            time.sleep(0.01)
        result = instance.get_responses()
        assert result.SampleNumber == before + 1
        assert client.Sampler.SampleCount.get() == before + 1
        assert any(p is not None and 0 < p < 1 for p in progress), progress
        vcd = client.CellAnalyser.ViableCellDensity.get()
        assert 0.05 < vcd < 100
        assert 36 < client.CellAnalyser.InstrumentTemperature.get() < 38
        assert client.Sampler.SampleInterval.get() == 3600
    finally:
        client.close()


def test_values_come_from_the_shared_bioreactor_model(sim: SamplerSimulator) -> None:
    # The same model class and default parameters as the OPC UA bioreactor.
    assert sampler_server.BioreactorModel is bioreactor_model.BioreactorModel
    assert sim.model.state.vcd == pytest.approx(sim._last_results["ViableCellDensity"], rel=0.05)  # type: ignore[index]


def test_a_modbus_only_gateway_never_imports_sila2_or_grpc(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from gateway import registry, daemon, cli\n"
        "registry.driver_class('modbus')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'sila2', 'zeroconf'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


async def test_samples_drawn_from_a_running_bioreactor_simulator() -> None:
    reactor = BioreactorSimulator(port=0, time_scale=0)  # frozen: values stay put
    await reactor.start()
    sim = SamplerSimulator(
        port=0, insecure=True, sample_interval=3600, analysis_time=0.05, bioreactor=reactor.endpoint
    )
    try:
        await asyncio.to_thread(sim.start)
        await asyncio.sleep(0.3)  # let the first automatic sample finish
        number = await asyncio.to_thread(sim.take_sample)
        assert number is not None and number >= 1
        served = reactor.values()
        got = sim.values()
        assert got["ViableCellDensity"] == pytest.approx(served["VCD"], abs=1e-3)
        assert got["Viability"] == pytest.approx(served["viability"], abs=1e-2)
        assert got["Glucose"] == pytest.approx(served["glucose"], abs=1e-3)
        # The bioreactor goes away: no sample, and the results say why.
        await reactor.stop()
        with pytest.raises(SampleFailed, match="no sample from the bioreactor"):
            await asyncio.to_thread(sim.take_sample)
    finally:
        await asyncio.to_thread(sim.stop)
        await reactor.stop()
