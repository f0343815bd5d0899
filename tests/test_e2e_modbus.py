"""End to end: off-gas simulator (real pymodbus) -> gateway -> real Mosquitto -> subscriber."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.verify import record_to_json
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import OFFGAS_TAGS, Device, GatewaySpec, running

# Values the simulator serves as constants: decoded exactly or the decoder is wrong.
FIXED = {
    "cal_constant": -123456789,
    "fixed_int64": -1234567890123,
    "fixed_uint32": 4000000000,
    "status_bit15": True,
}
# tag -> scale applied in the config (raw engineering value = served value)
SCALED = {"gas_temp", "air_flow", "totalizer", "air_flow_sp"}


def verify_capture(capture: Path) -> subprocess.CompletedProcess[str]:
    """`gateway verify --capture` as a user runs it (a few hundred ms, once per test)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "verify", "--capture", str(capture)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
async def sim() -> AsyncIterator[OffGasSimulator]:
    s = OffGasSimulator(unit_ids=(1, 2), time_scale=3600, update_interval=0.05)
    await s.start()
    yield s
    await s.stop()


async def test_values_types_and_byte_orders_arrive_verified(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    spec = GatewaySpec(
        tmp_path / "state",
        broker.port,
        [
            Device("offgas-1", sim.port, 1, poll_interval=0.1, tags=OFFGAS_TAGS),
            Device("offgas-2", sim.port, 2, poll_interval=0.1, tags=OFFGAS_TAGS),
        ],
    )
    async with Collector(broker.port) as col:
        async with running(spec.config()):
            await col.wait_for(lambda: len(col.of("offgas-2", "O2")) >= 10, what="10 polls")
        await col.wait_for(lambda: col.of("offgas-1", "$stop"), what="stop event")

    report = col.verifier.report()
    assert report.ok, report.summary()
    assert {(s.dev, s.first_seq) for s in report.streams} == {
        ("offgas-1", 1),
        ("offgas-2", 1),
        ("$gateway", 1),  # the gateway's audit stream: $start, $stop
    }
    assert all(s.duplicates == 0 and not s.explained for s in report.streams)

    for dev, unit in (("offgas-1", 1), ("offgas-2", 2)):
        served = [values for _, values in sim.history_of(unit)]
        readings = [r for r in col.of(dev) if not r["tag"].startswith("$")]
        assert {r["tag"] for r in readings} >= {*FIXED, "serial", "O2", "CO2", "uptime", "OUR"}
        for r in readings:
            assert r["q"] == "good", r
            tag, val = r["tag"], r["val"]
            if tag in FIXED:
                assert val == FIXED[tag], (dev, tag, val)
                continue
            if tag == "serial":
                assert val == f"OGA-2000-SN{unit:04d}", val
                continue
            # Every moving value must be one the simulator really served at some point.
            candidates = [v[tag] for v in served if tag in v]
            if tag in SCALED:
                assert any(math.isclose(val, c, abs_tol=1e-6) for c in candidates), (tag, val)
            else:
                assert val in candidates, (dev, tag, val, candidates[-3:])
        o2 = [r["val"] for r in readings if r["tag"] == "O2"]
        assert all(15.0 < v < 21.5 for v in o2)
        assert len(set(o2)) > 1, "values must move"
        # The same quantity decoded through two byte orders agrees.
        last = {r["tag"]: r["val"] for r in readings}
        assert isinstance(last["uptime"], int) and last["uptime"] > 0
        assert isinstance(last["serial"], str) and isinstance(last["ready"], bool)
        units = {r["tag"]: r["unit"] for r in readings}
        assert units["gas_temp"] == "Cel" and units["O2"] == "%"


async def test_verify_command_passes_on_capture_and_names_a_tampered_record(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    spec = GatewaySpec(tmp_path / "state", broker.port, [Device("offgas-1", sim.port, 1)])
    async with Collector(broker.port) as col:
        async with running(spec.config()):
            await col.wait_for(lambda: len(col.of("offgas-1", "O2")) >= 5, what="5 polls")
        await col.wait_for(lambda: col.of("offgas-1", "$stop"), what="stop event")

    capture = tmp_path / "capture.jsonl"
    capture.write_text("".join(record_to_json(r) + "\n" for r in col.records))
    ok = verify_capture(capture)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout

    lines = capture.read_text().splitlines()
    victim = next(i for i, line in enumerate(lines) if '"tag":"CO2"' in line)
    lines[victim] = lines[victim].replace('"q":"good"', '"q":"uncertain"')
    capture.write_text("\n".join(lines) + "\n")
    bad = verify_capture(capture)
    seq = col.records[victim]["seq"]
    assert bad.returncode == 1
    assert f"BAD RECORD seq {seq}: hash does not match" in bad.stdout
