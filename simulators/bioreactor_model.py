"""Fed-batch stirred-tank bioreactor model for the OPC UA bioreactor simulator.

Pure and deterministic: no I/O, no clocks. A :class:`BioreactorModel` holds a
~10 L mammalian culture (CHO / T-cell expansion) and :meth:`BioreactorModel.step`
advances it by ``dt`` *simulated* seconds; the caller maps wall time to
simulated time.

Time stepping
=============

The process is integrated on a fixed internal grid of :data:`GRID_S` simulated
seconds, whatever step sizes the caller uses, and the observed state between
two grid points is interpolated linearly. The controllers run once per grid
point on the (noisy) measurements, as a real controller runs at a fixed scan
rate. So a run made of 1 s steps and a run made of 1 h steps visit exactly the
same grid states: results are step-size independent up to floating-point
rounding, and deterministic for a seed. Within a grid step the fast linear
parts (oxygen and CO2 transfer, heat balance, cell growth) use their exact
exponential solution, so nothing becomes unstable when time is compressed.
A setpoint change takes effect from the next grid point on (at most
``2 * GRID_S`` simulated seconds later); its readback changes at once.

Physics, deliberately simple but plausible
==========================================

* Cells: Monod growth on glucose, ``mu = mu_max * G / (Ks + G)``, further
  limited by lactate, cell density, temperature, pH and hypoxia. The death rate
  rises as glucose runs out, as lactate and ammonium accumulate, and with
  hypoxia or overheating; dead cells lyse slowly. Viability = viable / total.
* Metabolism: glucose uptake ``mu / Y + maintenance``; lactate is made from
  glucose while cells grow fast and consumed once growth slows (the
  "metabolic shift"), so it rises then falls; ammonium accumulates.
* Oxygen: uptake ``OUR = q_O2 * VCD``; transfer ``kLa * (DO* - DO)`` with
  ``kLa`` rising with agitation and gas flow, and ``DO*`` with the O2 fraction
  of the sparge gas. A PI cascade holds the DO setpoint: its output 0-100 %
  raises agitation from the agitation setpoint (cascade minimum) to the
  agitation maximum, 100-200 % then opens the O2 sparge up to its maximum.
  Late in the run both saturate and DO falls below setpoint.
* pH: bicarbonate buffer, ``pH = 6.1 + log10(HCO3 / (0.0307 * pCO2))``. Lactic
  acid consumes bicarbonate, lactate uptake returns it; cell CO2 and CO2
  gassing raise pCO2, aeration strips it. pH is held at setpoint +- a deadband
  with CO2 gassing (PI) when high and 1 M base (proportional pump) when low.
* Temperature: heat balance of the broth with losses to a room whose
  temperature swings daily, cold feed and metabolic heat; a PI loop drives a
  heater/cooler (-150..400 W). The medium starts below setpoint and warms up.
* Feed: from day 3, a daily bolus (4 % of the initial volume, 80 g/L glucose)
  delivered by the feed pump at the feed-rate setpoint; volume and glucose rise
  with it. Base additions add volume too.
* Measurements carry bounded, smooth Ornstein-Uhlenbeck noise
  (:class:`simulators.process_model._OrnsteinUhlenbeck`, shared with the
  off-gas model).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Literal

from simulators.process_model import MOLAR_VOLUME_L, _OrnsteinUhlenbeck

__all__ = [
    "GRID_S",
    "SETPOINT_LIMITS",
    "BioreactorModel",
    "BioreactorParams",
    "BioreactorState",
    "SetpointName",
]

#: Fixed internal integration / controller step, simulated seconds.
GRID_S = 20.0

_HOUR = 3600.0
_DAY = 24 * _HOUR
_AIR_O2 = 0.2095  # O2 fraction of air
_CO2_HENRY = 0.0307  # mM dissolved CO2 per mmHg at 37 °C
_GAS_PRESSURE_MMHG = 713.0  # 760 mmHg minus water vapour at 37 °C
_LACTATE_G_PER_MMOL = 0.09008
_WATER_J_PER_L_K = 4180.0

SetpointName = Literal["temperature", "ph", "do", "agitation", "agitation_max", "feed_rate"]

#: Accepted range of each writable setpoint (engineering units).
SETPOINT_LIMITS: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {
        "temperature": (20.0, 42.0),  # °C
        "ph": (6.5, 7.8),
        "do": (5.0, 100.0),  # % air saturation
        "agitation": (50.0, 500.0),  # rpm, cascade minimum
        "agitation_max": (50.0, 500.0),  # rpm, cascade maximum
        "feed_rate": (0.0, 2000.0),  # mL/h, feed pump rate while a bolus is due
    }
)

Noise = tuple[float, float, float]  # (sigma, hard bound, time constant s)


@dataclass(frozen=True)
class BioreactorParams:
    """Constants of the vessel, culture and control loops (default: 10 L CHO fed-batch)."""

    # Vessel and start conditions.
    initial_volume_l: float = 10.0
    max_volume_l: float = 15.0  # feed interlock: no bolus at or above this
    initial_vcd: float = 0.3  # 1e6 cells/mL
    initial_viability_pct: float = 96.0
    initial_glucose_g_l: float = 6.0
    initial_lactate_g_l: float = 0.1
    initial_ammonium_mm: float = 0.5
    initial_bicarbonate_mm: float = 20.0
    initial_pco2_mmhg: float = 60.0
    initial_temperature_c: float = 33.0  # medium not yet at setpoint: warm-up
    initial_do_pct: float = 95.0
    # Growth and death (rates per hour, VCD in 1e6 cells/mL).
    mu_max_per_h: float = 0.045
    ks_glucose_g_l: float = 0.15
    ki_lactate_g_l: float = 5.0
    max_vcd: float = 28.0  # density limitation (other nutrients, space)
    death_base_per_h: float = 0.002
    death_starvation_per_h: float = 0.015  # at zero glucose
    ks_starvation_g_l: float = 0.3
    death_lactate_per_h: float = 0.006  # x (lactate / 4 g/L)^2
    death_ammonium_per_h: float = 0.015  # x (ammonium / 8 mM)^4
    lysis_per_h: float = 0.01
    # Metabolism.
    yield_vcd_per_glucose: float = 2.0  # (1e6 cells/mL) per (g/L)
    maintenance_glucose: float = 0.0018  # g/L/h per (1e6 cells/mL)
    lactate_yield: float = 0.6  # g lactate / g glucose while growing
    lactate_uptake: float = 0.005  # g/L/h per (1e6 cells/mL), max
    ammonium_rate: float = 0.0022  # mM/h per (1e6 cells/mL)
    q_o2: float = 0.32  # mmol O2/L/h per (1e6 cells/mL), i.e. 0.32 pmol/cell/h
    respiratory_quotient: float = 0.95
    # Oxygen transfer and gassing.
    o2_saturation_mm: float = 0.21  # dissolved O2 at 100 % air saturation
    kla_ref_per_h: float = 2.5  # at agitation_ref and gas_ref
    agitation_ref_rpm: float = 100.0
    gas_ref_l_min: float = 0.2
    kla_agitation_exponent: float = 1.5
    kla_gas_exponent: float = 0.4
    co2_kla_ratio: float = 0.9
    air_flow_l_min: float = 0.2
    o2_flow_max_l_min: float = 0.13
    co2_flow_max_l_min: float = 0.1
    # DO cascade PI (output in % of the 0..200 % split range).
    do_kp: float = 1.5
    do_ti_s: float = 900.0
    # Temperature.
    heat_loss_w_per_k: float = 4.0
    ambient_c: float = 22.0
    ambient_swing_c: float = 1.0  # daily
    heater_max_w: float = 400.0
    cooler_max_w: float = 150.0
    temp_kp_w_per_k: float = 150.0
    temp_ti_s: float = 1200.0
    metabolic_heat_j_per_mmol_o2: float = 460.0
    # pH.
    ph_deadband: float = 0.05
    co2_kp_l_min_per_ph: float = 0.2
    co2_ti_s: float = 1800.0
    base_molarity: float = 1.0  # mol/L
    base_gain_ml_min_per_ph: float = 20.0
    base_pump_max_ml_min: float = 1.0
    # Feed.
    feed_start_s: float = 3 * _DAY
    feed_period_s: float = _DAY
    feed_bolus_ml: float = 400.0
    feed_glucose_g_l: float = 80.0
    feed_temperature_c: float = 22.0
    # Default setpoints.
    temperature_sp: float = 37.0
    ph_sp: float = 7.0
    do_sp: float = 40.0
    agitation_sp: float = 100.0
    agitation_max: float = 300.0
    feed_rate_sp: float = 600.0  # mL/h
    # Bounded measurement noise: (sigma, bound, tau s); "relative" ones are fractions.
    temperature_noise: Noise = (0.015, 0.04, 120.0)  # °C
    ph_noise: Noise = (0.004, 0.012, 120.0)
    do_noise: Noise = (0.3, 0.8, 60.0)  # % air saturation
    vcd_noise: Noise = (0.008, 0.02, 1800.0)  # relative
    viability_noise: Noise = (0.2, 0.5, 1800.0)  # %
    metabolite_noise: Noise = (0.02, 0.05, 1800.0)  # g/L
    agitation_noise: Noise = (0.3, 1.0, 30.0)  # rpm
    flow_noise: Noise = (0.004, 0.01, 30.0)  # relative
    volume_noise: Noise = (0.003, 0.008, 600.0)  # L (load cell)

    def __post_init__(self) -> None:
        """Reject parameters the model cannot run with."""
        if not 0 < self.initial_vcd < self.max_vcd:
            raise ValueError("need 0 < initial_vcd < max_vcd")
        if not 0 < self.initial_viability_pct <= 100:
            raise ValueError("initial_viability_pct must be in (0, 100]")
        if self.initial_volume_l <= 0 or self.max_volume_l < self.initial_volume_l:
            raise ValueError("need 0 < initial_volume_l <= max_volume_l")
        if self.air_flow_l_min <= 0 or self.o2_flow_max_l_min < 0 or self.co2_flow_max_l_min < 0:
            raise ValueError("air_flow_l_min must be > 0, O2/CO2 maxima >= 0")
        for name, (lo, hi) in SETPOINT_LIMITS.items():
            value = getattr(self, _SP_PARAM[name])
            if not lo <= value <= hi:
                raise ValueError(f"default {name} setpoint {value} outside {lo}..{hi}")


_SP_PARAM: dict[str, str] = {
    "temperature": "temperature_sp",
    "ph": "ph_sp",
    "do": "do_sp",
    "agitation": "agitation_sp",
    "agitation_max": "agitation_max",
    "feed_rate": "feed_rate_sp",
}


@dataclass(frozen=True)
class BioreactorState:
    """What the bioreactor's sensors and controllers report at one instant."""

    elapsed_s: float
    vcd: float  # viable cell density, 1e6 cells/mL
    viability: float  # %
    glucose: float  # g/L
    lactate: float  # g/L
    dissolved_oxygen: float  # % air saturation
    ph: float
    temperature: float  # °C
    agitation: float  # rpm
    o2_flow: float  # L/min
    air_flow: float  # L/min
    co2_flow: float  # L/min
    base_added: float  # mL
    volume: float  # L
    feed_added: float  # mL
    feed_rate: float  # mL/h, actual feed pump rate
    our: float  # oxygen uptake rate, mmol/L/h
    pco2: float  # dissolved CO2, mmHg
    heater_power: float  # W, negative = cooling
    temperature_sp: float
    ph_sp: float
    do_sp: float
    agitation_sp: float  # cascade minimum, rpm
    agitation_max: float  # cascade maximum, rpm
    feed_rate_sp: float  # mL/h


# Fields interpolated between grid points: everything but time and setpoints,
# in the order _Grid.obs holds them.
_OBSERVED = (
    "vcd",
    "viability",
    "glucose",
    "lactate",
    "dissolved_oxygen",
    "ph",
    "temperature",
    "agitation",
    "o2_flow",
    "air_flow",
    "co2_flow",
    "base_added",
    "volume",
    "feed_added",
    "feed_rate",
    "our",
    "pco2",
    "heater_power",
)
assert set(_OBSERVED) | {"elapsed_s", *_SP_PARAM.values()} == {
    f.name for f in fields(BioreactorState)
}


@dataclass
class _PI:
    """Discrete PI controller with output clamping and conditional anti-windup."""

    kp: float
    ti_s: float
    lo: float
    hi: float
    integral: float = 0.0

    def update(self, error: float, dt_s: float) -> float:
        candidate = self.integral + self.kp * error * dt_s / self.ti_s
        raw = self.kp * error + candidate
        # Integrate only while the output is not pushed further into saturation.
        if (raw < self.hi or error < 0) and (raw > self.lo or error > 0):
            self.integral = min(max(candidate, self.lo), self.hi)
        return min(max(self.kp * error + self.integral, self.lo), self.hi)


@dataclass(slots=True)
class _Grid:
    """True process state at one grid point plus the actuators chosen there."""

    t: float
    xv: float  # viable cells, 1e6/mL
    xd: float  # dead cells, 1e6/mL
    glucose: float  # g/L
    lactate: float  # g/L
    ammonium: float  # mM
    volume: float  # L
    bicarbonate: float  # mM
    pco2: float  # mmHg
    do: float  # % air saturation
    temp: float  # °C
    base_ml: float
    feed_ml: float
    feed_pending_ml: float
    next_feed_s: float
    our: float = 0.0
    # Actuators, held until the next grid point.
    agitation: float = 0.0
    o2_flow: float = 0.0
    co2_flow: float = 0.0
    base_ml_min: float = 0.0
    feed_ml_h: float = 0.0
    heater_w: float = 0.0
    # Measured values at this grid point, in _OBSERVED order.
    obs: tuple[float, ...] = ()

    @property
    def ph(self) -> float:
        return 6.1 + math.log10(self.bicarbonate / (_CO2_HENRY * max(self.pco2, 0.1)))


class BioreactorModel:
    """A fed-batch bioreactor advanced in simulated time by :meth:`step`."""

    def __init__(self, params: BioreactorParams | None = None, *, seed: int = 1) -> None:
        """Create the culture at t=0; ``seed`` fixes noise, phases and the inoculum."""
        base = params or BioreactorParams()
        self._rng = random.Random(seed)
        # Inoculum density varies by a few percent between runs, like real seeding.
        self.params = replace(base, initial_vcd=base.initial_vcd * self._rng.uniform(0.95, 1.05))
        p = self.params
        self._ambient_phase = self._rng.uniform(0.0, 2 * math.pi)
        self._sp: dict[str, float] = {name: getattr(p, attr) for name, attr in _SP_PARAM.items()}
        # One noise process per measured signal, always advanced in this order.
        self._noise = [
            _OrnsteinUhlenbeck(*spec)
            for spec in (
                p.temperature_noise,
                p.ph_noise,
                p.do_noise,
                p.vcd_noise,
                p.viability_noise,
                p.metabolite_noise,  # glucose
                p.metabolite_noise,  # lactate
                p.agitation_noise,
                p.flow_noise,  # O2
                p.flow_noise,  # air
                p.flow_noise,  # CO2
                p.volume_noise,
            )
        ]
        self._do_pi = _PI(p.do_kp, p.do_ti_s, 0.0, 200.0)
        self._temp_pi = _PI(p.temp_kp_w_per_k, p.temp_ti_s, -p.cooler_max_w, p.heater_max_w)
        self._co2_pi = _PI(p.co2_kp_l_min_per_ph, p.co2_ti_s, 0.0, p.co2_flow_max_l_min)
        viab = p.initial_viability_pct / 100.0
        first = _Grid(
            t=0.0,
            xv=p.initial_vcd,
            xd=p.initial_vcd * (1.0 - viab) / viab,
            glucose=p.initial_glucose_g_l,
            lactate=p.initial_lactate_g_l,
            ammonium=p.initial_ammonium_mm,
            volume=p.initial_volume_l,
            bicarbonate=p.initial_bicarbonate_mm,
            pco2=p.initial_pco2_mmhg,
            do=p.initial_do_pct,
            temp=p.initial_temperature_c,
            base_ml=0.0,
            feed_ml=0.0,
            feed_pending_ml=0.0,
            next_feed_s=p.feed_start_s,
        )
        first.our = self._our(first)
        self._control(first)
        self._elapsed_s = 0.0
        self._a = first
        self._b = self._advance(first)
        self._state = self._observe()

    # ------------------------------------------------------------ public API
    @property
    def state(self) -> BioreactorState:
        """Latest snapshot (unchanged until the next :meth:`step` or setpoint change)."""
        return self._state

    @property
    def setpoints(self) -> MappingProxyType[str, float]:
        """Current setpoints by name (see :data:`SETPOINT_LIMITS`)."""
        return MappingProxyType(dict(self._sp))

    def set_setpoint(self, name: SetpointName, value: float) -> None:
        """Change a setpoint; ``ValueError`` if unknown or outside :data:`SETPOINT_LIMITS`.

        The readback in :attr:`state` changes at once; the process follows
        from the next internal grid point on.
        """
        if name not in SETPOINT_LIMITS:
            raise ValueError(f"unknown setpoint {name!r}")
        lo, hi = SETPOINT_LIMITS[name]
        value = float(value)
        if not lo <= value <= hi:  # also rejects NaN
            raise ValueError(f"{name} setpoint {value} outside {lo}..{hi}")
        self._sp[name] = value
        self._state = replace(self._state, **{_SP_PARAM[name]: value})

    def step(self, dt_s: float) -> BioreactorState:
        """Advance ``dt_s`` simulated seconds (>= 0) and return the new snapshot."""
        if not dt_s >= 0.0 or math.isinf(dt_s):
            raise ValueError(f"dt_s must be finite and >= 0, got {dt_s}")
        self._elapsed_s += dt_s
        while self._elapsed_s >= self._b.t:
            self._a = self._b
            self._b = self._advance(self._a)
        self._state = self._observe()
        return self._state

    # ------------------------------------------------------------- internals
    def _observe(self) -> BioreactorState:
        a, b = self._a, self._b
        frac = (self._elapsed_s - a.t) / (b.t - a.t)
        values = {
            name: va + (vb - va) * frac
            for name, va, vb in zip(_OBSERVED, a.obs, b.obs, strict=True)
        }
        setpoints = {_SP_PARAM[name]: value for name, value in self._sp.items()}
        return BioreactorState(elapsed_s=self._elapsed_s, **values, **setpoints)

    def _our(self, g: _Grid) -> float:
        # Uptake falls off only when the culture is nearly anoxic.
        return self.params.q_o2 * g.xv * g.do / (g.do + 1.0)

    def _advance(self, g: _Grid) -> _Grid:
        """Integrate one grid step with the actuators chosen at ``g``, then control."""
        p = self.params
        h = GRID_S
        hh = h / _HOUR

        # --- Liquid additions (feed pump, base pump) and the dilution they cause.
        feed_ml = min(g.feed_pending_ml, g.feed_ml_h * hh)
        base_ml = g.base_ml_min * h / 60.0
        volume = g.volume + (feed_ml + base_ml) / 1000.0
        dilution = g.volume / volume

        # --- Cells: growth and death rates at the start of the step, exact growth.
        glc, lac, do, temp = g.glucose, g.lactate, g.do, g.temp
        dph = g.ph - 7.05
        dtemp = temp - 37.0
        monod = glc / (p.ks_glucose_g_l + glc)
        lactate_inhibition = p.ki_lactate_g_l / (p.ki_lactate_g_l + lac)
        density = max(0.0, 1.0 - g.xv / p.max_vcd)
        # Growth halves 5 °C off 37 °C and 0.4 off pH 7.05; hypoxia slows it too.
        comfort = math.exp(-(dtemp * dtemp) / 36.0 - (dph * dph) / 0.25) * do / (do + 2.0)
        phi = monod * lactate_inhibition * density * comfort  # fraction of mu_max
        mu = p.mu_max_per_h * phi
        starving = p.ks_starvation_g_l / (p.ks_starvation_g_l + glc)
        kd = (
            p.death_base_per_h
            + p.death_starvation_per_h * starving * starving
            + p.death_lactate_per_h * (lac / 4.0) ** 2
            + p.death_ammonium_per_h * (g.ammonium / 8.0) ** 4
            + (0.02 * (1.0 - do / 5.0) if do < 5.0 else 0.0)  # hypoxia
            + (0.05 * (temp - 39.0) ** 2 if temp > 39.0 else 0.0)  # hyperthermia
        )
        xv = g.xv * math.exp((mu - kd) * hh)
        xv_mean = 0.5 * (g.xv + xv)
        xd = g.xd * math.exp(-p.lysis_per_h * hh) + kd * xv_mean * hh

        # --- Metabolism over the step (g/L), limited by what is there.
        glc_use = (mu / p.yield_vcd_per_glucose + p.maintenance_glucose * glc / (glc + 0.05)) * (
            xv_mean * hh
        )
        glc_use = min(glc_use, glc)
        lac_made = p.lactate_yield * glc_use * phi
        lac_used = min(p.lactate_uptake * xv_mean * hh * lac / (lac + 0.3) * (1.0 - phi) ** 2, lac)
        lac_mm = (lac_made - lac_used) / _LACTATE_G_PER_MMOL
        # Lactic acid uses up bicarbonate (releasing CO2); lactate uptake returns it.
        bicarbonate = g.bicarbonate - lac_mm + base_ml * p.base_molarity / g.volume

        # --- Oxygen transfer: exact first-order response over the step.
        gas = p.air_flow_l_min + g.o2_flow + g.co2_flow
        kla = (
            p.kla_ref_per_h
            * (max(g.agitation, 1.0) / p.agitation_ref_rpm) ** p.kla_agitation_exponent
            * (gas / p.gas_ref_l_min) ** p.kla_gas_exponent
        )
        do_star = 100.0 * (_AIR_O2 * p.air_flow_l_min + g.o2_flow) / gas / _AIR_O2
        do_eq = do_star - g.our / p.o2_saturation_mm * 100.0 / kla
        do_new = max(0.0, do_eq + (do - do_eq) * math.exp(-kla * hh))

        # --- CO2 stripping, limited by liquid-side transfer and by how much CO2
        # the sparge gas can carry away (in series), exact over the step.
        liquid_k = p.co2_kla_ratio * kla * _CO2_HENRY * g.volume  # mmol/h/mmHg
        gas_k = gas * 60.0 / MOLAR_VOLUME_L * 1000.0 / _GAS_PRESSURE_MMHG  # mmol/h/mmHg
        strip_k = liquid_k * gas_k / (liquid_k + gas_k)
        cer = (p.respiratory_quotient * g.our + max(0.0, lac_mm) / hh) * g.volume  # mmol/h
        pco2_in = (g.co2_flow + 0.0004 * p.air_flow_l_min) / gas * _GAS_PRESSURE_MMHG
        pco2_eq = pco2_in + cer / strip_k
        rate = strip_k / (_CO2_HENRY * g.volume)  # 1/h
        pco2 = pco2_eq + (g.pco2 - pco2_eq) * math.exp(-rate * hh)

        # --- Heat balance, exact over the step: heater, losses, cold feed, metabolism.
        heat_cap = g.volume * _WATER_J_PER_L_K
        feed_w_per_k = g.feed_ml_h / 1000.0 / _HOUR * _WATER_J_PER_L_K if feed_ml > 0 else 0.0
        ambient = p.ambient_c + p.ambient_swing_c * math.sin(
            2 * math.pi * g.t / _DAY + self._ambient_phase
        )
        met_w = p.metabolic_heat_j_per_mmol_o2 * g.our * g.volume / _HOUR
        loss = p.heat_loss_w_per_k + feed_w_per_k
        t_eq = (
            g.heater_w + met_w + p.heat_loss_w_per_k * ambient + feed_w_per_k * p.feed_temperature_c
        ) / loss
        temp_new = t_eq + (temp - t_eq) * math.exp(-h * loss / heat_cap)

        n = _Grid(
            t=g.t + h,
            xv=xv * dilution,
            xd=xd * dilution,
            glucose=(glc - glc_use) * dilution + p.feed_glucose_g_l * feed_ml / 1000.0 / volume,
            lactate=max(0.0, lac + lac_made - lac_used) * dilution,
            ammonium=(g.ammonium + p.ammonium_rate * xv_mean * hh) * dilution,
            volume=volume,
            bicarbonate=max(0.05, bicarbonate * dilution),
            pco2=pco2,
            do=do_new,
            temp=temp_new,
            base_ml=g.base_ml + base_ml,
            feed_ml=g.feed_ml + feed_ml,
            feed_pending_ml=g.feed_pending_ml - feed_ml,
            next_feed_s=g.next_feed_s,
        )
        # --- Feed schedule: a bolus falls due once a day from feed_start_s.
        while n.t >= n.next_feed_s:
            if n.volume < p.max_volume_l:
                n.feed_pending_ml += p.feed_bolus_ml
            n.next_feed_s += p.feed_period_s
        n.our = self._our(n)
        self._control(n)
        return n

    def _control(self, g: _Grid) -> None:
        """Measure at ``g`` (noise advanced one grid step) and set the actuators."""
        p = self.params
        sp = self._sp
        rng = self._rng
        (
            n_temp,
            n_ph,
            n_do,
            n_vcd,
            n_viab,
            n_glc,
            n_lac,
            n_agit,
            n_o2,
            n_air,
            n_co2,
            n_vol,
        ) = [proc.step(GRID_S, rng) for proc in self._noise]
        temp_meas = g.temp + n_temp
        ph_meas = g.ph + n_ph
        do_meas = max(0.0, g.do + n_do)

        # DO cascade: output 0..100 % moves agitation min->max, 100..200 % opens O2.
        u = self._do_pi.update(sp["do"] - do_meas, GRID_S)
        agit_min = min(sp["agitation"], sp["agitation_max"])
        g.agitation = agit_min + (sp["agitation_max"] - agit_min) * min(u, 100.0) / 100.0
        g.o2_flow = p.o2_flow_max_l_min * max(0.0, u - 100.0) / 100.0

        # pH: CO2 gassing when high, base when low, nothing inside the deadband.
        g.co2_flow = self._co2_pi.update(ph_meas - (sp["ph"] + p.ph_deadband), GRID_S)
        low = (sp["ph"] - p.ph_deadband) - ph_meas
        g.base_ml_min = min(max(p.base_gain_ml_min_per_ph * low, 0.0), p.base_pump_max_ml_min)

        g.heater_w = self._temp_pi.update(sp["temperature"] - temp_meas, GRID_S)
        g.feed_ml_h = sp["feed_rate"] if g.feed_pending_ml > 1e-9 else 0.0

        viability = 100.0 * g.xv / (g.xv + g.xd) + n_viab
        g.obs = (  # _OBSERVED order
            g.xv * (1.0 + n_vcd),
            min(100.0, max(0.0, viability)),
            max(0.0, g.glucose + n_glc),
            max(0.0, g.lactate + n_lac),
            do_meas,
            ph_meas,
            temp_meas,
            max(0.0, g.agitation + n_agit),
            g.o2_flow * (1.0 + n_o2),
            p.air_flow_l_min * (1.0 + n_air),
            g.co2_flow * (1.0 + n_co2),
            g.base_ml,
            g.volume + n_vol,
            g.feed_ml,
            g.feed_ml_h,
            g.our,
            g.pco2,
            g.heater_w,
        )
