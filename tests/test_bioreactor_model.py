"""Unit tests of the fed-batch bioreactor process model (pure, no I/O)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from simulators.bioreactor_model import (
    GRID_S,
    SETPOINT_LIMITS,
    BioreactorModel,
    BioreactorParams,
    BioreactorState,
)

DAY = 86400.0
HOUR = 3600.0
SAMPLE_S = 600.0  # 10 simulated minutes


@pytest.fixture(scope="module")
def run() -> list[BioreactorState]:
    """One 14-day run sampled every 10 simulated minutes (t=0 included)."""
    model = BioreactorModel(seed=1)
    states = [model.state]
    for _ in range(int(14 * DAY / SAMPLE_S)):
        states.append(model.step(SAMPLE_S))
    return states


def at(run: list[BioreactorState], day: float) -> BioreactorState:
    return run[round(day * DAY / SAMPLE_S)]


def test_vcd_grows_peaks_then_declines(run: list[BioreactorState]) -> None:
    assert 0.25 < run[0].vcd < 0.35
    peak = max(run, key=lambda s: s.vcd)
    assert 15.0 < peak.vcd < 25.0
    assert 7 * DAY < peak.elapsed_s < 12 * DAY
    assert run[-1].vcd < 0.8 * peak.vcd
    # Exponential phase: roughly one doubling per day early on.
    assert 1.5 < at(run, 2).vcd / at(run, 1).vcd < 3.0
    assert run[0].viability > 90 and run[-1].viability < 70
    assert all(0 <= s.viability <= 100 for s in run)


def test_glucose_falls_and_feeds_replenish_it(run: list[BioreactorState]) -> None:
    assert at(run, 0).glucose == pytest.approx(6.0, abs=0.1)
    assert at(run, 3).glucose < at(run, 0).glucose - 1.0  # consumed before feeding
    assert at(run, 2.99).feed_added == 0.0
    # Each daily bolus raises glucose while it is pumped in.
    for day in (3, 5, 7):
        before, after = at(run, day), at(run, day + 1 / 12)
        assert after.feed_added - before.feed_added == pytest.approx(400.0)
        assert after.glucose > before.glucose + 1.5
    assert all(s.glucose >= 0 for s in run)
    assert min(s.glucose for s in run if s.elapsed_s > 10 * DAY) < 1.0  # runs low late


def test_lactate_rises_then_falls(run: list[BioreactorState]) -> None:
    peak = max(run, key=lambda s: s.lactate)
    assert 1.2 < peak.lactate < 4.0
    assert 3 * DAY < peak.elapsed_s < 9 * DAY
    assert run[0].lactate < 0.3
    assert run[-1].lactate < 0.5 * peak.lactate


def test_do_cascade_holds_setpoint_while_capacity_allows(run: list[BioreactorState]) -> None:
    p = BioreactorParams()
    assert run[0].dissolved_oxygen > 80  # air-saturated medium, few cells
    reached = next(i for i, s in enumerate(run) if s.dissolved_oxygen <= 41.0)
    assert reached * SAMPLE_S < 3 * DAY
    hour = int(HOUR / SAMPLE_S)
    checked = 0
    for i in range(reached, len(run)):
        window = run[max(reached, i - hour) : i + 1]
        if all(s.o2_flow < 0.9 * p.o2_flow_max_l_min for s in window):
            assert abs(run[i].dissolved_oxygen - 40.0) < 5.0, run[i]
            checked += 1
    assert checked > len(run) // 2
    # Cascade order: agitation first, the O2 sparge only once agitation is at max.
    assert run[reached].agitation < 150
    for s in run:
        if s.o2_flow > 0.01:
            assert s.agitation > p.agitation_max - 3
    # Late in the run both saturate and DO sags below setpoint.
    saturated = [s for s in run if s.o2_flow > 0.97 * p.o2_flow_max_l_min]
    assert saturated and min(s.dissolved_oxygen for s in saturated) < 35.0
    assert min(s.elapsed_s for s in saturated) > 7 * DAY


def test_ph_is_controlled(run: list[BioreactorState]) -> None:
    assert all(6.8 <= s.ph <= 7.3 for s in run)
    assert all(abs(s.ph - 7.0) < 0.08 for s in run if s.elapsed_s > 2 * HOUR)
    assert run[1].co2_flow > 0  # medium starts alkaline: CO2 gassing
    assert at(run, 3).base_added == 0.0
    assert 50.0 < run[-1].base_added < 600.0  # lactic acid needs base later
    assert all(b.base_added >= a.base_added for a, b in itertools.pairwise(run))


def test_temperature_within_tolerance_after_warm_up(run: list[BioreactorState]) -> None:
    assert run[0].temperature < 35.0
    assert run[0].heater_power == pytest.approx(400.0)  # warming at full power
    late = [s for s in run if s.elapsed_s >= 2 * HOUR]
    assert max(abs(s.temperature - 37.0) for s in late) < 0.3
    assert len({round(s.temperature, 4) for s in late}) > 100  # small noise, not constant


def test_volume_grows_with_feeds(run: list[BioreactorState]) -> None:
    assert at(run, 2.9).volume == pytest.approx(10.0, abs=0.02)
    end = run[-1]
    assert end.feed_added == pytest.approx(11 * 400.0)  # days 3..13
    expected = 10.0 + (end.feed_added + end.base_added) / 1000.0
    assert end.volume == pytest.approx(expected, abs=0.02)
    grow = [at(run, d).volume for d in range(3, 15)]
    assert grow == sorted(grow)


def test_deterministic_for_a_seed() -> None:
    a, b, c = BioreactorModel(seed=7), BioreactorModel(seed=7), BioreactorModel(seed=8)
    for _ in range(48):
        sa, sb, sc = a.step(HOUR), b.step(HOUR), c.step(HOUR)
    assert sa == sb
    assert sa != sc
    assert sa.vcd != sc.vcd


def _fields_close(a: BioreactorState, b: BioreactorState) -> None:
    for f in dataclasses.fields(BioreactorState):
        assert getattr(a, f.name) == pytest.approx(getattr(b, f.name), rel=1e-6, abs=1e-6), f.name


def test_step_size_independent() -> None:
    fine, coarse, ragged = (BioreactorModel(seed=3) for _ in range(3))
    for _ in range(int(DAY / 5.0)):
        fine.step(5.0)
    for _ in range(24):
        coarse.step(HOUR)
    rng = random.Random(0)
    left = DAY
    while left > 0:
        dt = min(left, rng.uniform(0.1, 2000.0))
        ragged.step(dt)
        left -= dt
    assert fine.state.elapsed_s == pytest.approx(DAY)
    _fields_close(fine.state, coarse.state)
    _fields_close(fine.state, ragged.state)
    # Between grid points values are interpolated, not held.
    m = BioreactorModel(seed=3)
    m.step(GRID_S * 10)
    first = m.state.temperature
    m.step(GRID_S / 2)
    assert m.state.temperature != first


def test_setpoints_are_writable_and_followed() -> None:
    m = BioreactorModel(seed=2)
    m.step(4 * HOUR)
    m.set_setpoint("temperature", 32.0)
    assert m.state.temperature_sp == 32.0 and m.setpoints["temperature"] == 32.0
    m.step(2 * HOUR)
    assert abs(m.state.temperature - 32.0) < 0.3
    m.set_setpoint("ph", 7.2)
    m.step(6 * HOUR)
    assert abs(m.state.ph - 7.2) < 0.08
    m.set_setpoint("agitation", 200.0)
    m.step(HOUR)
    assert m.state.agitation > 195.0 and m.state.agitation_sp == 200.0
    m.set_setpoint("agitation_max", 250.0)
    m.set_setpoint("do", 60.0)
    m.set_setpoint("feed_rate", 100.0)
    m.step(3 * DAY)
    assert m.state.agitation <= 251.0
    assert m.state.feed_rate in (0.0, 100.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [("temperature", 50.0), ("ph", 5.0), ("do", 0.0), ("agitation", 900.0), ("feed_rate", -1.0)],
)
def test_setpoint_outside_limits_is_refused(name: str, value: float) -> None:
    m = BioreactorModel()
    before = dict(m.setpoints)
    with pytest.raises(ValueError):
        m.set_setpoint(name, value)  # type: ignore[arg-type]
    assert dict(m.setpoints) == before
    with pytest.raises(ValueError):
        m.set_setpoint(name, math.nan)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.set_setpoint("speed", 1.0)  # type: ignore[arg-type]
    assert set(SETPOINT_LIMITS) == set(before)


def test_rejects_bad_steps_and_params() -> None:
    m = BioreactorModel()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            m.step(bad)
    assert m.step(0.0) == m.state
    with pytest.raises(ValueError):
        BioreactorParams(initial_vcd=0.0)
    with pytest.raises(ValueError):
        BioreactorParams(temperature_sp=60.0)
