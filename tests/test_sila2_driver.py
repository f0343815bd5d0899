"""SiLA 2 driver against the sampler simulator (a real sila2 server process) and a real Mosquitto.

The gateway runs in-process; records are collected from the broker and
verified with the same logic as `gateway verify`. One simulator per trust
mode (TLS with a generated CA, and insecure) serves the whole module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sila2.framework.data_types.date import SilaDateType

from drivers.sila2.client import conversion_error, to_value
from drivers.sila2.config import Sila2Device, parse_property
from drivers.sila2.driver import Sila2Driver
from gateway.config import load_config
from gateway.driver import Reading
from gateway.errors import DriverError
from gateway.record import Record
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import Device, GatewaySpec, running
from tests.support.sampler import ANALYSER, SamplerProcess, sila_device_toml

SIM_ARGS = ("--sample-interval", "0.3", "--analysis-time", "0.1", "--time-scale", "3600")
UNITS = {
    "vcd": "10*6/mL",
    "viability": "%",
    "glucose": "g/L",
    "lactate": "g/L",
    "cell_temp": "Cel",
    "interval": "s",
}
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
async def tls_sampler(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SamplerProcess]:
    sim = await SamplerProcess(*SIM_ARGS, cert_dir=tmp_path_factory.mktemp("sila-certs")).start()
    yield sim
    await sim.stop()


@pytest.fixture(scope="module")
async def plain_sampler() -> AsyncIterator[SamplerProcess]:
    sim = await SamplerProcess(*SIM_ARGS).start()
    yield sim
    await sim.stop()


def config_with(tmp_path: Path, broker: Mosquitto, blocks: str, modbus: list[Device] | None = None):  # type: ignore[no-untyped-def]
    spec = GatewaySpec(tmp_path / "state", broker.port, modbus or [])
    path = tmp_path / "gw.toml"
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.toml() + "\n" + blocks)
    return load_config(path)


def good(col: Collector, dev: str, tag: str, after: float = 0.0) -> list[Record]:
    return [r for r in col.of(dev, tag) if r["q"] == "good" and r["ts"] / 1e9 > after]


def tags_all_good(col: Collector, dev: str, after: float = 0.0) -> bool:
    names = ("vcd", "viability", "glucose", "lactate", "sampled_at", "cell_temp", "state")
    return all(good(col, dev, t, after) for t in (*names, "count", "interval"))


# --- records end to end ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["tls", "insecure"])
async def test_polled_and_subscribed_properties_arrive_as_records(
    mode: str,
    tls_sampler: SamplerProcess,
    plain_sampler: SamplerProcess,
    broker: Mosquitto,
    tmp_path: Path,
) -> None:
    sim = tls_sampler if mode == "tls" else plain_sampler
    cfg = config_with(tmp_path, broker, sila_device_toml("sampler", sim))
    async with Collector(broker.port) as col, running(cfg):
        await col.wait_for(lambda: tags_all_good(col, "sampler"), 15, "a good record per tag")
        start = len(good(col, "sampler", "count"))
        await col.wait_for(lambda: len(good(col, "sampler", "count")) >= start + 3, 10, "samples")
        await col.wait_for(lambda: len(good(col, "sampler", "cell_temp")) >= 5, 10, "5 polls")
    for tag, unit in UNITS.items():
        assert good(col, "sampler", tag)[0]["unit"] == unit, tag  # from the FDL
    counts = [r["val"] for r in good(col, "sampler", "count")]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
    assert {r["val"] for r in good(col, "sampler", "state")} >= {"Sampling", "Analysing", "Idle"}
    vcd = [r["val"] for r in good(col, "sampler", "vcd")]
    assert all(isinstance(v, float) and 0.05 < v < 100 for v in vcd)
    # Each subscription value is a record: the sample timestamp came from the
    # server (ns), drawn shortly before the gateway stamped the record.
    lags = [
        (r["ts"] - r["val"]) / 1e9 - 0.1  # minus the analysis time
        for r in good(col, "sampler", "sampled_at")
    ]
    assert all(-0.05 < lag < 2.0 for lag in lags), lags
    FIGURES[f"subscription latency {mode} (median s)"] = sorted(lags)[len(lags) // 2]
    polled = good(col, "sampler", "cell_temp")
    assert len(polled) >= 5 and all(36 < r["val"] < 38 for r in polled)
    assert col.of("sampler", "$online")
    report = col.verifier.report()
    assert report.ok, report.summary()


async def test_sila_errors_become_bad_records_with_the_error_identifier(
    tls_sampler: SamplerProcess, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = config_with(tmp_path, broker, sila_device_toml("sampler", tls_sampler))
    measurement_failed = f"{ANALYSER}/DefinedExecutionError/MeasurementFailed"
    try:
        async with Collector(broker.port) as col, running(cfg):
            await col.wait_for(lambda: tags_all_good(col, "sampler"), 15, "good records")

            def bad(tag: str, prefix: str) -> list[Record]:
                return [
                    r
                    for r in col.of("sampler", tag)
                    if r["q"] == "bad" and str(r.get("status", "")).startswith(prefix)
                ]

            await tls_sampler.command("error defined")
            await col.wait_for(
                lambda: bad("vcd", measurement_failed) and bad("cell_temp", measurement_failed),
                10,
                "MeasurementFailed on a subscribed and a polled property",
            )
            await tls_sampler.command("error undefined")
            await col.wait_for(
                lambda: (
                    bad("glucose", "UndefinedExecutionError")
                    and bad("cell_temp", "UndefinedExecutionError")
                ),
                10,
                "undefined execution errors",
            )
            await tls_sampler.command("error off")
            t_off = time.time()
            await col.wait_for(
                lambda: (
                    good(col, "sampler", "vcd", t_off) and good(col, "sampler", "cell_temp", t_off)
                ),
                10,
                "good values again",
            )
    finally:
        await tls_sampler.command("error off")
    errors = [r for r in col.of("sampler") if r["q"] == "bad"]
    assert all(r["val"] is None for r in errors)
    # A repeated identical error on a subscription is recorded once, not per retry.
    vcd_defined = bad("vcd", measurement_failed)
    assert 1 <= len(vcd_defined) <= 2, len(vcd_defined)
    assert not col.of("sampler", "$offline"), "a SiLA error is not a disconnect"
    report = col.verifier.report()
    assert report.ok, report.summary()


# --- resilience -------------------------------------------------------------------


async def test_server_restart_is_offline_then_resubscribed_and_verify_passes(
    tls_sampler: SamplerProcess, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = config_with(tmp_path, broker, sila_device_toml("sampler", tls_sampler))
    async with Collector(broker.port) as col, running(cfg):
        await col.wait_for(lambda: tags_all_good(col, "sampler"), 15, "good records")
        t_restart = time.time()
        await tls_sampler.command("restart 1.0")
        await col.wait_for(lambda: col.of("sampler", "$offline"), 10, "$offline")
        await col.wait_for(
            lambda: len(col.of("sampler", "$online")) >= 2, 15, "$online after the restart"
        )
        back = col.of("sampler", "$online")[-1]["ts"] / 1e9
        # Every subscription is re-established: each subscribed tag gets new values.
        await col.wait_for(lambda: tags_all_good(col, "sampler", back), 15, "values after restart")
        first_value = min(r["ts"] / 1e9 for r in good(col, "sampler", "vcd", back))
    offline = col.of("sampler", "$offline")
    detected = offline[0]["ts"] / 1e9 - t_restart
    FIGURES["restart: offline detected after (s)"] = detected
    FIGURES["restart: first value after restart command (s, 1 s downtime)"] = (
        first_value - t_restart
    )
    assert detected < 3.0, f"server stop noticed after {detected:.1f} s"
    assert "subscription" in offline[0]["val"] or "answer" in offline[0]["val"], offline[0]
    # Subscribed values never duplicated or replayed: SampleCount strictly increases.
    counts = [r["val"] for r in good(col, "sampler", "count")]
    assert all(b >= a for a, b in itertools.pairwise(counts)), counts
    report = col.verifier.report()
    assert report.ok, report.summary()


async def test_stalled_server_does_not_block_another_device_and_timeouts_fire(
    plain_sampler: SamplerProcess, broker: Mosquitto, tmp_path: Path
) -> None:
    offgas = OffGasSimulator(update_interval=0.05)
    await offgas.start()
    block = sila_device_toml("sampler", plain_sampler, timeout=0.5)
    cfg = config_with(tmp_path, broker, block, [Device("offgas", offgas.port, timeout=0.3)])

    def rate(col: Collector, t0: float, t1: float) -> float:
        n = sum(1 for r in col.of("offgas", "O2") if t0 <= r["ts"] / 1e9 < t1)
        return n / (t1 - t0)

    try:
        async with Collector(broker.port) as col, running(cfg):
            await col.wait_for(lambda: tags_all_good(col, "sampler"), 15, "good records")
            t_stall = time.time()
            await plain_sampler.command("stall")
            try:
                await col.wait_for(lambda: col.of("sampler", "$offline"), 10, "$offline")
                await asyncio.sleep(3.0)  # reconnect attempts against the stalled server
                during = rate(col, t_stall + 0.2, time.time() - 0.1)
            finally:
                await plain_sampler.command("stall off")
            t_back = time.time()
            await col.wait_for(lambda: tags_all_good(col, "sampler", t_back), 15, "recovery")
    finally:
        await offgas.stop()
    assert 8.0 <= during <= 11.0, f"modbus device polled at {during:.1f}/s during the stall"
    offline = col.of("sampler", "$offline")
    FIGURES["stall: offline detected after (s)"] = offline[0]["ts"] / 1e9 - t_stall
    assert "no answer" in offline[0]["val"] or "timeout" in offline[0]["val"], offline[0]
    stalled = [r for r in col.of("sampler", "cell_temp") if t_stall < r["ts"] / 1e9 < t_back]
    assert any(r["q"] == "bad" and "timeout" in str(r["status"]) for r in stalled) or any(
        "no answer" in str(r.get("status")) for r in stalled
    ), stalled
    assert len(col.of("sampler", "$online")) >= 2
    report = col.verifier.report()
    assert report.ok, report.summary()


# --- driver level: trust, configuration ------------------------------------------


def device(sim: SamplerProcess, **over: Any) -> Sila2Device:
    base: dict[str, Any] = {
        "id": "s",
        "driver": "sila2",
        "host": "127.0.0.1",
        "port": sim.port,
        "timeout": 1.0,
        "tags": [{"name": "vcd", "property": f"{ANALYSER}/ViableCellDensity"}],
    }
    if sim.ca is not None:
        base["ca"] = str(sim.ca)
    else:
        base["insecure"] = True
    base.update(over)
    return Sila2Device.model_validate(base)


async def connect_fails(cfg: Sila2Device) -> str:
    d = Sila2Driver(cfg)
    try:
        with pytest.raises(DriverError) as info:
            async with asyncio.timeout(10):
                await d.connect()
    finally:
        await d.close()
    return info.value.reason


async def test_tls_is_required_and_checked(
    tls_sampler: SamplerProcess, plain_sampler: SamplerProcess, tmp_path: Path
) -> None:
    # The system CAs do not trust the simulator's own CA.
    why = await connect_fails(device(tls_sampler, ca=None))
    assert "cannot connect" in why and "UNAVAILABLE" in why, why
    # Another CA is refused the same way.
    other = await SamplerProcess(cert_dir=tmp_path / "other").start()
    try:
        assert other.ca is not None
        why = await connect_fails(device(tls_sampler, ca=str(other.ca)))
        assert "UNAVAILABLE" in why, why
    finally:
        await other.stop()
    # Plain text against a TLS server, and TLS against a plain-text server.
    assert "UNAVAILABLE" in await connect_fails(device(tls_sampler, ca=None, insecure=True))
    assert "UNAVAILABLE" in await connect_fails(device(plain_sampler, insecure=False))
    # A pinned server UUID that does not match.
    why = await connect_fails(
        device(tls_sampler, server_uuid="00000000-0000-4000-8000-000000000000")
    )
    assert "not the configured server_uuid" in why, why


async def test_unknown_feature_or_property_is_a_bad_reading_not_a_failure(
    plain_sampler: SamplerProcess,
) -> None:
    cfg = device(
        plain_sampler,
        tags=[
            {"name": "vcd", "property": f"{ANALYSER}/ViableCellDensity"},
            {"name": "v2", "property": ANALYSER.replace("/v1", "/v2") + "/ViableCellDensity"},
            {"name": "nope", "property": f"{ANALYSER}/Nope"},
        ],
    )
    d = Sila2Driver(cfg)
    got: list[Reading] = []

    async def emit(readings: list[Reading]) -> None:
        got.extend(readings)

    await d.connect()
    task = asyncio.create_task(d.run(emit))
    try:
        deadline = time.monotonic() + 10
        while not any(r.tag == "vcd" and r.q == "good" for r in got):
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await d.close()
    why = {r.tag: r.status for r in got if r.q == "bad"}
    assert "not implemented by the server" in str(why["v2"]) and "/v1" in str(why["v2"])
    assert "not in feature" in str(why["nope"])


def test_config_validation() -> None:
    ref = parse_property("org.x/examples/CellAnalyser/v1/Property/Glucose")
    assert ref.feature == "org.x/examples/CellAnalyser/v1" and ref.identifier == "Glucose"
    assert parse_property("org.x/examples/CellAnalyser/v1/Glucose") == ref
    for bad in ("Glucose", "org.x/CellAnalyser/v1/Glucose", "org.x/examples/cell/v1/Glucose"):
        with pytest.raises(ValueError):
            parse_property(bad)
    tag = [{"name": "g", "property": "org.x/examples/CellAnalyser/v1/Glucose"}]
    base = {"id": "s", "driver": "sila2", "tags": tag}
    Sila2Device.model_validate({**base, "host": "h", "port": 1})  # TLS with system CAs
    for wrong, msg in (
        ({}, "give host and port"),
        ({"host": "h", "port": 1, "insecure": True, "ca": "/x"}, "insecure = true cannot"),
        ({"host": "h", "port": 1, "client_cert": "/x"}, "go together"),
        ({"discovery": True}, "discovery needs"),
        ({"host": "h", "port": 1, "tags": [*tag, {**tag[0], "name": "g2"}]}, "same property"),
    ):
        with pytest.raises(ValueError, match=msg):
            Sila2Device.model_validate({**base, **wrong})


def test_value_conversion() -> None:
    utc, plus2 = dt.UTC, dt.timezone(dt.timedelta(hours=2))
    minus = dt.timezone(-dt.timedelta(hours=5, minutes=30))
    cases = [
        (SilaDateType(dt.date(2022, 8, 5), plus2), "2022-08-05+02:00"),
        (SilaDateType(dt.date(2022, 8, 5), utc), "2022-08-05Z"),
        (SilaDateType(dt.date(2022, 8, 5), minus), "2022-08-05-05:30"),
        (dt.time(12, 34, 56, 789000, tzinfo=plus2), "12:34:56.789000+02:00"),
        # Exact to the microsecond (a float timestamp() lands 1 µs short here).
        (dt.datetime(2004, 2, 20, 5, 37, 15, 1000, tzinfo=utc), 1_077_255_435_001_000_000),
        (dt.datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=plus2), -7_199_999_999_000),
        (b"\x01\xff", "01ff"),
        (True, True),
    ]
    for native, want in cases:
        assert to_value(native) == (want, None), native
    assert to_value([1, 2]) == (None, "unsupported value type list")
    assert conversion_error(NotImplementedError("no binary transfer")).startswith("unsupported:")


async def test_simulator_stops_cleanly_on_sigterm() -> None:
    sim = await SamplerProcess(*SIM_ARGS).start()
    await asyncio.sleep(0.5)
    code, seconds = await sim.stop()
    FIGURES["simulator SIGTERM -> exit (s)"] = seconds
    assert code == 0 and seconds < 5.0, (code, seconds)


def test_zz_print_figures() -> None:
    for k, v in FIGURES.items():
        print(f"FIGURE {k}: {v:.3f}")
