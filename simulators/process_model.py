"""Fed-batch bioreactor culture model shared by the device simulators.

Pure and deterministic: no I/O, no clocks. A :class:`CultureModel` holds the
culture state and :meth:`CultureModel.step` advances it by ``dt`` *simulated*
seconds; the caller decides how wall time maps to simulated time. Every update
is solved exactly over the step (logistic growth, first-order flow lag,
Ornstein-Uhlenbeck noise), so a step of 1 s and a step of 1 h land on the same
trajectory and nothing becomes unstable when time is compressed.

Physics, deliberately simple but plausible for a ~10 L cell-therapy culture:

* viable cell density (VCD) grows logistically from ~0.2e6 to 20e6 cells/mL
  over ~14 days;
* oxygen uptake rate ``OUR = q_O2 * VCD`` (mmol/L/h), modulated by a slow
  sinusoid and bounded noise; CO2 evolution ``CER = RQ * OUR``;
* the aeration gas passes through the vessel: the O2 fraction leaving is the
  inlet fraction depleted by ``OUR * V`` against the molar air flow, written
  as ``y_out = y_in * exp(-OUR*V / (F*y_in))`` so it stays positive for any
  flow; the CO2 fraction rises by ``RQ`` times the O2 taken up;
* the mass-flow controller's actual flow tracks its setpoint with a first-order
  lag, and a totalizer integrates the true flow (standard litres);
* gas temperature sits near 37 °C with a slow daily swing and small noise.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

__all__ = ["MOLAR_VOLUME_L", "CultureModel", "CultureParams", "CultureState"]

#: Litres per mole of ideal gas at standard conditions (0 °C, 1 atm), the
#: reference mass-flow controllers quote "standard" flow against.
MOLAR_VOLUME_L = 22.414

_HOUR = 3600.0


@dataclass(frozen=True)
class CultureParams:
    """Constants of the culture and gas train (defaults: ~14-day run, 10 L)."""

    volume_l: float = 10.0
    initial_vcd: float = 0.2e6  # cells/mL
    max_vcd: float = 20e6  # cells/mL
    growth_rate_per_h: float = 0.03  # logistic rate; plateau from ~day 10
    q_o2: float = 2.8e-10  # mmol O2 / cell / h
    respiratory_quotient: float = 1.0
    inlet_o2_pct: float = 20.95
    inlet_co2_pct: float = 0.04
    gas_temp_c: float = 37.0
    air_flow_sccm: float = 500.0  # initial setpoint
    mfc_full_scale_sccm: float = 1000.0
    mfc_time_constant_s: float = 0.5
    # Slow multiplicative swing of OUR (relative amplitude, period).
    our_swing: float = 0.01
    our_swing_period_s: float = 6 * _HOUR
    # Bounded, smooth (Ornstein-Uhlenbeck) noise: (sigma, hard bound, tau s).
    o2_noise: tuple[float, float, float] = (0.003, 0.01, 600.0)  # % O2
    temp_noise: tuple[float, float, float] = (0.02, 0.06, 300.0)  # °C
    flow_noise: tuple[float, float, float] = (0.001, 0.003, 5.0)  # relative

    def __post_init__(self) -> None:
        """Reject parameters the model cannot run with."""
        if not 0 < self.initial_vcd < self.max_vcd:
            raise ValueError("need 0 < initial_vcd < max_vcd")
        if self.volume_l <= 0 or self.mfc_full_scale_sccm <= 0:
            raise ValueError("volume_l and mfc_full_scale_sccm must be > 0")
        if self.mfc_time_constant_s <= 0 or self.growth_rate_per_h < 0:
            raise ValueError("mfc_time_constant_s must be > 0, growth_rate_per_h >= 0")
        if not 0 <= self.air_flow_sccm <= self.mfc_full_scale_sccm:
            raise ValueError("air_flow_sccm must be within 0..mfc_full_scale_sccm")


@dataclass(frozen=True)
class CultureState:
    """Snapshot of the culture and gas train after a step."""

    elapsed_s: float
    viable_cell_density: float  # cells/mL
    our: float  # oxygen uptake rate, mmol/L/h
    cer: float  # CO2 evolution rate, mmol/L/h
    offgas_o2_pct: float
    offgas_co2_pct: float
    gas_temp_c: float
    air_flow_setpoint_sccm: float
    air_flow_sccm: float  # measured actual flow (includes sensor noise)
    totalizer_l: float  # standard litres of air delivered since start


@dataclass
class _OrnsteinUhlenbeck:
    """Mean-reverting noise, sampled exactly for any step and clipped to a bound."""

    sigma: float
    bound: float
    tau_s: float
    value: float = 0.0

    def step(self, dt_s: float, rng: random.Random) -> float:
        decay = math.exp(-dt_s / self.tau_s)
        spread = self.sigma * math.sqrt(1.0 - decay * decay)
        self.value = self.value * decay + spread * rng.gauss(0.0, 1.0)
        self.value = max(-self.bound, min(self.bound, self.value))
        return self.value


@dataclass
class _Phases:
    """Per-instance random phases so parallel units do not move in lockstep."""

    our: float
    temp: float


class CultureModel:
    """A fed-batch culture advanced in simulated time by :meth:`step`."""

    def __init__(self, params: CultureParams | None = None, *, seed: int = 1) -> None:
        """Create the culture at t=0; ``seed`` fixes noise, phases and inoculum."""
        base = params or CultureParams()
        self._rng = random.Random(seed)
        # Inoculum varies by a few percent between runs, like real seeding.
        self.params = replace(base, initial_vcd=base.initial_vcd * self._rng.uniform(0.9, 1.1))
        tau = 2 * math.pi
        self._phases = _Phases(our=self._rng.uniform(0, tau), temp=self._rng.uniform(0, tau))
        self._o2_noise = _OrnsteinUhlenbeck(*self.params.o2_noise)
        self._temp_noise = _OrnsteinUhlenbeck(*self.params.temp_noise)
        self._flow_noise = _OrnsteinUhlenbeck(*self.params.flow_noise)
        self._elapsed_s = 0.0
        self._vcd = self.params.initial_vcd
        self._setpoint = self.params.air_flow_sccm
        self._flow_true = self.params.air_flow_sccm  # MFC starts settled
        self._totalizer_l = 0.0
        self._state = self._observe()

    @property
    def state(self) -> CultureState:
        """Latest snapshot (unchanged until the next :meth:`step`)."""
        return self._state

    @property
    def air_flow_setpoint(self) -> float:
        """MFC air flow setpoint in sccm."""
        return self._setpoint

    @air_flow_setpoint.setter
    def air_flow_setpoint(self, sccm: float) -> None:
        if not 0.0 <= sccm <= self.params.mfc_full_scale_sccm:
            raise ValueError(f"setpoint {sccm} sccm outside 0..{self.params.mfc_full_scale_sccm}")
        self._setpoint = float(sccm)
        # The actual flow only follows on the next step; the snapshot shows
        # the new setpoint at once, as an MFC's setpoint readback would.
        self._state = replace(self._state, air_flow_setpoint_sccm=self._setpoint)

    def step(self, dt_s: float) -> CultureState:
        """Advance ``dt_s`` simulated seconds (>= 0) and return the new snapshot."""
        if not dt_s >= 0.0 or math.isinf(dt_s):
            raise ValueError(f"dt_s must be finite and >= 0, got {dt_s}")
        if dt_s == 0.0:
            return self._state
        p = self.params
        # Logistic growth, closed form: exact for any step length.
        k = p.max_vcd / self._vcd - 1.0
        self._vcd = p.max_vcd / (1.0 + k * math.exp(-p.growth_rate_per_h * dt_s / _HOUR))
        # First-order MFC lag; the totalizer integrates the exact response.
        tau = p.mfc_time_constant_s
        gap = self._flow_true - self._setpoint
        decay = math.exp(-dt_s / tau)
        litres_sccm_s = self._setpoint * dt_s + gap * tau * (1.0 - decay)
        self._totalizer_l += litres_sccm_s / 1000.0 / 60.0
        self._flow_true = self._setpoint + gap * decay
        self._o2_noise.step(dt_s, self._rng)
        self._temp_noise.step(dt_s, self._rng)
        self._flow_noise.step(dt_s, self._rng)
        self._elapsed_s += dt_s
        self._state = self._observe()
        return self._state

    def _observe(self) -> CultureState:
        """Derive measured quantities from the internal state."""
        p = self.params
        t = self._elapsed_s
        angle = 2 * math.pi * t / p.our_swing_period_s + self._phases.our
        swing = 1.0 + p.our_swing * math.sin(angle)
        cells_per_l = self._vcd * 1000.0
        our = p.q_o2 * cells_per_l * swing
        cer = p.respiratory_quotient * our
        y_in = p.inlet_o2_pct / 100.0
        # Molar air flow (mmol/h); floor it so zero flow gives a finite, fully
        # depleted headspace instead of a division by zero.
        air_mmol_h = max(self._flow_true, 1e-3) / 1000.0 * 60.0 / MOLAR_VOLUME_L * 1000.0
        uptake = our * p.volume_l / (air_mmol_h * y_in)
        o2 = p.inlet_o2_pct * math.exp(-uptake) + self._o2_noise.value
        o2 = max(0.0, min(p.inlet_o2_pct, o2))
        co2 = p.inlet_co2_pct + p.respiratory_quotient * (p.inlet_o2_pct - o2)
        temp = (
            p.gas_temp_c
            + 0.15 * math.sin(2 * math.pi * t / (24 * _HOUR) + self._phases.temp)
            + self._temp_noise.value
        )
        flow = max(0.0, self._flow_true * (1.0 + self._flow_noise.value))
        return CultureState(
            elapsed_s=t,
            viable_cell_density=self._vcd,
            our=our,
            cer=cer,
            offgas_o2_pct=o2,
            offgas_co2_pct=co2,
            gas_temp_c=temp,
            air_flow_setpoint_sccm=self._setpoint,
            air_flow_sccm=flow,
            totalizer_l=self._totalizer_l,
        )
