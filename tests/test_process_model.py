"""Tests for the shared bioreactor culture model (pure, no I/O)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from simulators.process_model import CultureModel, CultureParams, CultureState

DAY = 86400.0


def run(model: CultureModel, seconds: float, dt: float) -> list[CultureState]:
    """Step ``model`` for ``seconds`` in steps of ``dt``; return every state."""
    states = [model.state]
    for _ in range(round(seconds / dt)):
        states.append(model.step(dt))
    return states


def test_fourteen_day_trends_and_bounds() -> None:
    states = run(CultureModel(seed=1), 14 * DAY, 360.0)
    first, last = states[0], states[-1]
    # Off-gas starts at ambient and ends near O2 ~17 %, CO2 ~4 %.
    assert 20.8 < first.offgas_o2_pct <= 20.95
    assert 0.04 <= first.offgas_co2_pct < 0.15
    assert 16.8 < last.offgas_o2_pct < 17.6
    assert 3.4 < last.offgas_co2_pct < 4.2
    for s in states:
        assert 16.5 < s.offgas_o2_pct <= 20.95
        assert 0.04 <= s.offgas_co2_pct < 4.5
        assert 36.7 < s.gas_temp_c < 37.3
        assert abs(s.air_flow_sccm - 500.0) <= 500.0 * 0.004
        assert 0.0 < s.our < 6.0
        assert math.isclose(s.cer, s.our)  # RQ = 1
    # Cell growth has no noise: strictly monotone, bounded by max_vcd.
    vcd = [s.viable_cell_density for s in states]
    assert all(b > a for a, b in pairwise(vcd))
    assert vcd[-1] < CultureParams().max_vcd
    # Noise is bounded, so the trend shows at daily resolution until plateau.
    daily = states[:: round(DAY / 360.0)]
    o2 = [s.offgas_o2_pct for s in daily]
    co2 = [s.offgas_co2_pct for s in daily]
    assert all(b < a for a, b in pairwise(o2[:11]))
    assert all(b > a for a, b in pairwise(co2[:11]))
    # Uptime and totalizer only ever grow.
    elapsed = [s.elapsed_s for s in states]
    total = [s.totalizer_l for s in states]
    assert all(b > a for a, b in pairwise(elapsed))
    assert all(b > a for a, b in pairwise(total))


def test_values_never_jump() -> None:
    # A 6-minute step (time_scale 3600 at 0.1 s updates) moves values only a bit.
    states = run(CultureModel(seed=3), 14 * DAY, 360.0)
    for a, b in pairwise(states):
        assert abs(b.offgas_o2_pct - a.offgas_o2_pct) < 0.05
        assert abs(b.offgas_co2_pct - a.offgas_co2_pct) < 0.05
        assert abs(b.gas_temp_c - a.gas_temp_c) < 0.15


def test_step_size_does_not_change_the_trajectory() -> None:
    fine, coarse = CultureModel(seed=5), CultureModel(seed=5)
    run(fine, 3 * DAY, 60.0)
    run(coarse, 3 * DAY, 3 * DAY)
    assert fine.state.viable_cell_density == pytest.approx(coarse.state.viable_cell_density)
    assert fine.state.totalizer_l == pytest.approx(coarse.state.totalizer_l)
    assert fine.state.elapsed_s == pytest.approx(coarse.state.elapsed_s)


def test_seed_is_deterministic_and_distinguishes_units() -> None:
    a, b, c = CultureModel(seed=7), CultureModel(seed=7), CultureModel(seed=8)
    assert run(a, DAY, 600.0) == run(b, DAY, 600.0)
    assert a.state != c.step(DAY)


def test_totalizer_integrates_flow() -> None:
    model = CultureModel(seed=1)  # 500 sccm, settled
    model.step(3600.0)
    assert model.state.totalizer_l == pytest.approx(30.0, rel=1e-9)  # 0.5 L/min x 60 min


def test_mfc_first_order_lag() -> None:
    model = CultureModel(seed=1)
    tau = model.params.mfc_time_constant_s
    model.air_flow_setpoint = 800.0
    assert model.state.air_flow_setpoint_sccm == 800.0
    assert model.state.air_flow_sccm == pytest.approx(500.0, rel=0.004)  # not moved yet
    model.step(tau)
    expected = 800.0 - 300.0 * math.exp(-1.0)  # 63 % of the way after one tau
    assert model.state.air_flow_sccm == pytest.approx(expected, rel=0.004)
    flows = [s.air_flow_sccm for s in run(model, 10 * tau, tau / 10)]
    assert flows[-1] == pytest.approx(800.0, rel=0.004)
    # More flow dilutes the off-gas: O2 rises toward the inlet value.
    low, high = CultureModel(seed=2), CultureModel(seed=2)
    high.air_flow_setpoint = 1000.0
    low.step(8 * DAY)
    high.step(8 * DAY)
    assert high.state.offgas_o2_pct > low.state.offgas_o2_pct


def test_zero_flow_stays_bounded() -> None:
    model = CultureModel(seed=1)
    model.step(10 * DAY)
    model.air_flow_setpoint = 0.0
    model.step(600.0)
    s = model.state
    assert 0.0 <= s.offgas_o2_pct < 1.0
    assert s.offgas_co2_pct <= 20.95 + 0.04
    assert s.air_flow_sccm < 1e-6


def test_rejects_bad_input() -> None:
    model = CultureModel()
    with pytest.raises(ValueError):
        model.step(-1.0)
    with pytest.raises(ValueError):
        model.step(math.nan)
    with pytest.raises(ValueError):
        model.air_flow_setpoint = 1000.1
    with pytest.raises(ValueError):
        CultureParams(initial_vcd=30e6)
    assert model.step(0.0) is model.state
