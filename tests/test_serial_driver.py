"""Serial driver against the pty instrument simulators, end to end and alone.

The gateway runs in-process against the session's Mosquitto; the instruments
are simulators/serial_instruments.py on real pseudo-terminals, opened by the
driver with pyserial through their stable link (as /dev/serial/by-id/...), so
"unplug" is a real tty hang-up and a vanished path. Every test checks that the
chain still verifies, and that a fault never yields a wrong value: values are
pinned, and a reading is either that value or bad with a status.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from drivers.serial import SerialDriver
from drivers.serial.config import SerialDevice
from gateway import registry
from gateway.config import Config, load_config, parse_config
from gateway.errors import ConfigError, DriverError
from gateway.record import Record
from simulators.serial_instruments import MtSicsBalance, StreamingMeter, main
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import running

registry.register("serial", SerialDriver)

REPO = Path(__file__).resolve().parent.parent
DEV = "balance-1"
METER = "meter-1"
PH = {"pH": 7.02, "T": 25.1, "DO": 41.2}

BALANCE_TAGS = """
[[devices.tags]]
name = "weight"

[[devices.tags]]
name = "weight_g"
field = "weight"
unit = "g"

[[devices.tags]]
name = "weight_mg"
field = "weight"
unit = "mg"
scale = 1000.0
device_unit = "g"
"""

METER_TAGS = """
[[devices.tags]]
name = "pH"

[[devices.tags]]
name = "temperature"
field = "T"

[[devices.tags]]
name = "DO"
"""


@pytest.fixture
async def balance(tmp_path: Path) -> AsyncIterator[MtSicsBalance]:
    b = MtSicsBalance(link_dir=tmp_path / "by-id", cycle=1.0, sir_interval=0.05)
    await b.start()
    b.set_weight(12.345, stable=True)
    yield b
    await b.stop()


@pytest.fixture
async def meter(tmp_path: Path) -> AsyncIterator[StreamingMeter]:
    m = StreamingMeter(link_dir=tmp_path / "by-id", interval=0.05)
    await m.start()
    m.set_values(PH)
    yield m
    await m.stop()


def gateway_config(state: Path, broker: int, device: str) -> Config:
    text = f"""
[gateway]
id = "gw-serial"
state_dir = "{state}"

[broker]
port = {broker}
reconnect_min = 0.1
reconnect_max = 0.5

[[devices]]
{device}
"""
    return parse_config(text, Path("serial.toml"), {})


def balance_device(port: Path | str, extra: str = "", timeout: float = 0.2) -> str:
    return (
        f'id = "{DEV}"\ndriver = "serial"\nport = "{port}"\nprofile = "mt_sics"\n'
        f"poll_interval = 0.05\ntimeout = {timeout}\n{extra}\n{BALANCE_TAGS}"
    )


def meter_device(port: Path | str, extra: str = "", checksum: bool = True) -> str:
    return (
        f'id = "{METER}"\ndriver = "serial"\nport = "{port}"\nprofile = "kv_meter"\n'
        f"timeout = 0.3\nrequire_checksum = {str(checksum).lower()}\n{extra}\n{METER_TAGS}"
    )


def readings(col: Collector, dev: str, tag: str | None = None) -> list[Record]:
    return [r for r in col.of(dev, tag) if not str(r["tag"]).startswith("$")]


def has(col: Collector, dev: str, pred: Callable[[Record], bool]) -> Callable[[], bool]:
    return lambda: any(pred(r) for r in readings(col, dev))


def has_status(col: Collector, dev: str, status: str) -> Callable[[], bool]:
    return lambda: any(r.get("status") == status for r in readings(col, dev))


def good_after(col: Collector, dev: str, index: int) -> Callable[[], bool]:
    return lambda: any(r["q"] == "good" for r in readings(col, dev)[index:])


def check_chain(col: Collector) -> None:
    report = col.verifier.report()
    assert report.ok, report.summary()


def never_wrong(col: Collector, dev: str, good: dict[str, set[Any]]) -> None:
    """Each reading is one of the values the instrument really had, or bad without a value."""
    for r in readings(col, dev):
        if r["q"] == "bad":
            assert r["val"] is None and r["status"], r
        else:
            assert r["val"] in good[r["tag"]], r


# --- the balance, request mode ----------------------------------------------------------


async def test_balance_stable_and_dynamic_weights_with_the_unit_from_the_line(
    balance: MtSicsBalance, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = gateway_config(tmp_path / "state", broker.port, balance_device(balance.link))
    async with Collector(broker.port) as col:
        async with running(cfg):
            await col.wait_for(has(col, DEV, lambda r: r["q"] == "good"), what="a stable weight")
            balance.set_weight(12.301, stable=False)
            await col.wait_for(has(col, DEV, lambda r: r["q"] == "uncertain"), what="dynamic")
            balance.set_weight(12.3, stable=True)
            await col.wait_for(has(col, DEV, lambda r: r["val"] == 12.3), what="stable again")
        await col.wait_for(lambda: col.of(DEV, "$stop"), what="stop event")

    assert balance.commands and set(balance.commands) == {"SI"}
    first = {r["tag"]: r for r in readings(col, DEV)[:3]}
    assert first["weight"]["val"] == 12.345 and first["weight"]["unit"] == "g"  # from the line
    assert first["weight_g"]["val"] == 12.345 and first["weight_g"]["unit"] == "g"
    assert first["weight_mg"]["val"] == 12345.0 and first["weight_mg"]["unit"] == "mg"
    assert all(r["q"] == "good" and "status" not in r for r in first.values())
    dynamic = [r for r in readings(col, DEV, "weight") if r["q"] == "uncertain"]
    assert dynamic and all(r["val"] == 12.301 and r["status"] == "dynamic" for r in dynamic)
    grams = {12.345, 12.301, 12.3}
    never_wrong(
        col, DEV, {"weight": grams, "weight_g": grams, "weight_mg": {12345.0, 12301.0, 12300.0}}
    )
    assert not col.of(DEV, "$offline")
    check_chain(col)


async def test_balance_error_replies_are_bad_readings_with_their_status(
    balance: MtSicsBalance, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = gateway_config(tmp_path / "state", broker.port, balance_device(balance.link))
    statuses = {
        "I": "busy (S I)",
        "+": "overload (S +)",
        "-": "underload (S -)",
        "ES": "syntax error (ES)",
        "ET": "transmission error (ET)",
        "EL": "logical error (EL)",
    }
    async with Collector(broker.port) as col:
        async with running(cfg):
            await col.wait_for(has(col, DEV, lambda r: r["q"] == "good"), what="a first weight")
            for code, status in statuses.items():
                balance.set_fault("error", code)
                await col.wait_for(has_status(col, DEV, status), what=status)
            balance.set_fault(None)
            await col.wait_for(good_after(col, DEV, len(readings(col, DEV))), what="good again")
        await col.wait_for(lambda: col.of(DEV, "$stop"), what="stop event")

    bad = {r["status"] for r in readings(col, DEV) if r["q"] == "bad"}
    assert bad == set(statuses.values())
    never_wrong(col, DEV, {"weight": {12.345}, "weight_g": {12.345}, "weight_mg": {12345.0}})
    assert not col.of(DEV, "$offline"), "an error reply is not a lost device"
    check_chain(col)


async def test_balance_garbage_partial_reply_and_silence(
    balance: MtSicsBalance, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = gateway_config(tmp_path / "state", broker.port, balance_device(balance.link))
    async with Collector(broker.port) as col:
        async with running(cfg) as gw:
            await col.wait_for(has(col, DEV, lambda r: r["q"] == "good"), what="a first weight")
            balance.set_fault("garbage")
            await col.wait_for(
                has(col, DEV, lambda r: str(r.get("status")).startswith("parse error")),
                what="a parse error",
            )
            balance.set_fault("partial")
            await col.wait_for(
                has(col, DEV, lambda r: str(r.get("status")).startswith("timeout: incomplete")),
                what="an incomplete reply",
            )
            assert not col.of(DEV, "$offline"), "a talking device is not offline"
            balance.set_fault("silence")
            await col.wait_for(
                has(col, DEV, lambda r: r.get("status") == "timeout"), what="a timeout"
            )
            await col.wait_for(lambda: col.of(DEV, "$offline"), what="$offline")
            balance.set_fault(None)
            await col.wait_for(lambda: len(col.of(DEV, "$online")) == 2, what="$online again")
            await col.wait_for(good_after(col, DEV, len(readings(col, DEV))), what="good again")
            assert gw.supervisors[DEV].online
        await col.wait_for(lambda: col.of(DEV, "$stop"), what="stop event")

    offline = col.of(DEV, "$offline")
    assert [r["val"] for r in offline] == ["no answer to 3 requests in a row (timeout 0.2 s each)"]
    never_wrong(col, DEV, {"weight": {12.345}, "weight_g": {12.345}, "weight_mg": {12345.0}})
    check_chain(col)


async def test_balance_switched_to_kg_is_a_unit_mismatch_not_a_wrong_value(
    balance: MtSicsBalance, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = gateway_config(tmp_path / "state", broker.port, balance_device(balance.link))
    async with Collector(broker.port) as col:
        async with running(cfg):
            await col.wait_for(has(col, DEV, lambda r: r["q"] == "good"), what="a first weight")
            balance.unit, balance.decimals = "kg", 6
            balance.set_weight(0.012345)
            await col.wait_for(has(col, DEV, lambda r: r["unit"] == "kg"), what="kg")
        await col.wait_for(lambda: col.of(DEV, "$stop"), what="stop event")

    kg = [r for r in readings(col, DEV, "weight") if r["unit"] == "kg"]
    assert kg and all(r["val"] == 0.012345 and r["q"] == "good" for r in kg)
    for tag in ("weight_g", "weight_mg"):  # unit = "g"; and device_unit = "g" (scaled to mg)
        after = [r for r in readings(col, DEV, tag) if r["seq"] >= kg[0]["seq"]]
        assert after and all(r["q"] == "bad" and r["val"] is None for r in after)
        assert after[0]["status"] == "unit mismatch: line has 'kg', expected 'g'"
    check_chain(col)


# --- streaming ---------------------------------------------------------------------------


async def test_balance_streaming_with_sir(
    balance: MtSicsBalance, broker: Mosquitto, tmp_path: Path
) -> None:
    device = balance_device(balance.link, 'mode = "stream"\non_connect = ["SIR"]', timeout=0.5)
    cfg = gateway_config(tmp_path / "state", broker.port, device)
    async with Collector(broker.port) as col:
        async with running(cfg):
            await col.wait_for(lambda: len(readings(col, DEV, "weight")) >= 10, what="a stream")
            balance.set_fault("error", "+")
            await col.wait_for(
                has(col, DEV, lambda r: r.get("status") == "overload (S +)"), what="overload"
            )
            balance.set_fault("dynamic")
            await col.wait_for(has(col, DEV, lambda r: r["q"] == "uncertain"), what="dynamic")
            balance.set_fault(None)
        await col.wait_for(lambda: col.of(DEV, "$stop"), what="stop event")

    assert balance.commands[0] == "SIR" and set(balance.commands) == {"SIR"}
    never_wrong(col, DEV, {"weight": {12.345}, "weight_g": {12.345}, "weight_mg": {12345.0}})
    check_chain(col)


async def test_meter_stream_checksum_garbage_partial_overlong_and_silence(
    meter: StreamingMeter, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = gateway_config(tmp_path / "state", broker.port, meter_device(meter.link))

    def status(prefix: str, after: int = 0) -> Callable[[], bool]:
        return lambda: any(
            str(r.get("status")).startswith(prefix) for r in readings(col, METER)[after:]
        )

    async with Collector(broker.port) as col:
        async with running(cfg):
            await col.wait_for(has(col, METER, lambda r: r["q"] == "good"), what="a first line")
            for fault, prefix in (
                ("checksum", "checksum mismatch: line has "),
                ("garbage", "parse error"),
                ("overlong", "line too long (over 1024 bytes)"),
                # half a line, then the next whole one: run together, the checksum fails
                ("partial", "checksum mismatch"),
            ):
                before = len(readings(col, METER))
                meter.set_fault(fault, count=1)
                await col.wait_for(status(prefix, before), what=fault)
                # good again: three readings (one line) after the fault's line at the least
                await col.wait_for(good_after(col, METER, before + 3), what=f"good after {fault}")
            meter.set_fault("silence")
            await col.wait_for(status("timeout", len(readings(col, METER))), what="a timeout")
            await col.wait_for(lambda: col.of(METER, "$offline"), what="$offline")
            meter.set_fault(None)
            await col.wait_for(lambda: len(col.of(METER, "$online")) == 2, what="$online again")
        await col.wait_for(lambda: col.of(METER, "$stop"), what="stop event")

    first = {r["tag"]: r for r in readings(col, METER)[:3]}
    assert {t: (r["val"], r["unit"]) for t, r in first.items()} == {
        "pH": (7.02, "[pH]"),
        "temperature": (25.1, "Cel"),
        "DO": (41.2, "%"),
    }
    assert [r["val"] for r in col.of(METER, "$offline")] == [
        "no data for 0.9 s (3 timeouts of 0.3 s)"
    ]
    never_wrong(col, METER, {"pH": {7.02}, "temperature": {25.1}, "DO": {41.2}})
    check_chain(col)


async def test_meter_request_mode(broker: Mosquitto, tmp_path: Path) -> None:
    meter = StreamingMeter(link_dir=tmp_path / "by-id", interval=None, checksum=False)
    await meter.start()
    meter.set_values(PH)
    device = meter_device(meter.link, 'mode = "request"\npoll_interval = 0.05', checksum=False)
    cfg = gateway_config(tmp_path / "state", broker.port, device)
    try:
        async with Collector(broker.port) as col:
            async with running(cfg):
                await col.wait_for(lambda: len(readings(col, METER, "DO")) >= 5, what="5 polls")
            await col.wait_for(lambda: col.of(METER, "$stop"), what="stop event")
    finally:
        await meter.stop()
    assert set(meter.commands) == {"READ"}
    never_wrong(col, METER, {"pH": {7.02}, "temperature": {25.1}, "DO": {41.2}})
    assert all(r["q"] == "good" for r in readings(col, METER))
    check_chain(col)


# --- unplug / replug ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["balance-request", "meter-stream"])
async def test_unplug_is_offline_and_replug_resumes(
    which: str, broker: Mosquitto, tmp_path: Path
) -> None:
    inst: MtSicsBalance | StreamingMeter
    device: Callable[[Path], str]
    if which == "balance-request":
        inst = MtSicsBalance(link_dir=tmp_path / "by-id")
        inst.set_weight(12.345)
        dev, device, good = (
            DEV,
            balance_device,
            {"weight": {12.345}, "weight_g": {12.345}, "weight_mg": {12345.0}},
        )
    else:
        inst = StreamingMeter(link_dir=tmp_path / "by-id", interval=0.05)
        inst.set_values(PH)
        dev, device, good = METER, meter_device, {"pH": {7.02}, "temperature": {25.1}, "DO": {41.2}}
    await inst.start()
    spare: tuple[int, ...] = ()
    cfg = gateway_config(tmp_path / "state", broker.port, device(inst.link))
    try:
        async with Collector(broker.port) as col:
            async with running(cfg) as gw:
                await col.wait_for(has(col, dev, lambda r: r["q"] == "good"), what="values")
                old_tty = inst.port
                inst.unplug()
                assert not inst.link.exists()
                await col.wait_for(lambda: col.of(dev, "$offline"), what="$offline")
                await asyncio.sleep(1.0)  # reconnects fail: the link is gone
                assert not gw.supervisors[dev].online
                # Another adapter takes the freed tty number meanwhile, so the
                # instrument comes back under a new one: only the link finds it.
                spare = os.openpty()
                inst.replug()
                assert inst.port != old_tty
                await col.wait_for(
                    lambda: len(col.of(dev, "$online")) == 2, what="$online", timeout=15
                )
                back = col.of(dev, "$online")[1]["seq"]
                await col.wait_for(
                    has(col, dev, lambda r: r["seq"] > back and r["q"] == "good"),
                    what="values after replug",
                )
            await col.wait_for(lambda: col.of(dev, "$stop"), what="stop event")
    finally:
        await inst.stop()
        for fd in spare:
            os.close(fd)

    offline = col.of(dev, "$offline")
    assert [r["val"] for r in offline] == ["port vanished (device disconnected)"]
    online = col.of(dev, "$online")
    assert online[0]["seq"] < offline[0]["seq"] < online[1]["seq"]
    between = [r for r in readings(col, dev) if offline[0]["seq"] < r["seq"] < online[1]["seq"]]
    assert between and all(r["q"] == "bad" and r["val"] is None for r in between)
    assert any(
        f"cannot open {inst.link}: No such file or directory" == r["status"] for r in between
    )
    never_wrong(col, dev, good)
    check_chain(col)


# --- the driver alone ---------------------------------------------------------------------


def device_model(port: Path | str, **kw: Any) -> SerialDevice:
    data: dict[str, Any] = {
        "id": DEV,
        "driver": "serial",
        "port": str(port),
        "profile": "mt_sics",
        "timeout": 0.2,
        "tags": [{"name": "weight", "unit": "g"}],
    }
    data.update(kw)
    return SerialDevice.model_validate(data)


async def test_counters_rate_limited_logs_and_a_free_event_loop(balance: MtSicsBalance) -> None:
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    with capture_logs() as logs:
        driver = SerialDriver(device_model(balance.link, fail_after=100))
        await driver.connect()
        try:
            balance.set_fault("garbage")
            for _ in range(5):
                assert (await driver.poll())[0].status.startswith("parse error")  # type: ignore[union-attr]
            balance.set_fault("silence")
            for _ in range(3):
                assert (await driver.poll())[0].status == "timeout"
            balance.set_fault("overlong", "3000", count=1)
            assert (await driver.poll())[0].status == "line too long (over 1024 bytes)"
            balance.set_fault(None)
            await asyncio.sleep(0.05)  # the rest of the long line, dropped up to its end
            r = (await driver.poll())[0]
            assert (r.val, r.q, r.unit) == (12.345, "good", "g")
        finally:
            await driver.close()
            await driver.close()  # idempotent, never raises
    tick.cancel()

    c = driver.counters
    assert c["parse_error"] == 5 and c["timeout"] == 3 and c["line_too_long"] == 1
    assert c["replies"] >= 6
    (opened,) = [e for e in logs if e["event"] == "serial port open"]
    assert opened["device"] == DEV and opened["tty"] == balance.port
    parse_logs = [e for e in logs if e["event"] == "serial parse error"]
    assert len(parse_logs) == 1, "rate-limited: one line per kind per 10 s"
    assert parse_logs[0]["device"] == DEV and parse_logs[0]["log_level"] == "warning"
    assert len([e for e in logs if e["event"] == "serial timeout"]) == 1
    assert max(gaps) < 0.15, f"the event loop stalled for {max(gaps):.3f} s"


async def test_connect_errors_say_why(balance: MtSicsBalance, tmp_path: Path) -> None:
    missing = SerialDriver(device_model(tmp_path / "nope"))
    with pytest.raises(DriverError) as err:
        await missing.connect()
    assert err.value.reason == f"cannot open {tmp_path / 'nope'}: No such file or directory"
    await missing.close()

    first = SerialDriver(device_model(balance.link))
    await first.connect()
    try:
        second = SerialDriver(device_model(balance.link))
        with pytest.raises(DriverError, match="in use by another program"):
            await second.connect()
        await second.close()
    finally:
        await first.close()

    not_a_tty = tmp_path / "plain-file"
    not_a_tty.write_text("")
    with pytest.raises(DriverError, match="cannot open"):
        await SerialDriver(device_model(not_a_tty)).connect()


async def test_stale_input_is_never_taken_for_the_reply(balance: MtSicsBalance) -> None:
    driver = SerialDriver(device_model(balance.link))
    await driver.connect()
    try:
        # A late line from before (e.g. a reply that came after its timeout).
        balance.write_raw(b"S S      99.999 g\r\n")
        await asyncio.sleep(0.05)
        r = (await driver.poll())[0]
        assert (r.val, r.q) == (12.345, "good")
        assert driver.counters["stale"] == 1
    finally:
        await driver.close()


# --- configuration ----------------------------------------------------------------------


CONFIG_ERRORS = [
    (
        'profile = "mt-sics"',
        "",
        "devices[0]: unknown profile 'mt-sics'; built-in profiles: kv_meter, mt_sics "
        "(or give the path of a .toml file)",
    ),
    (
        'profile = "mt_sics"',
        "",
        "devices[0]: tags[0] (w): no reply of the profile carries a value 'w' "
        "(they have: weight); set `field`",
    ),
    (
        'profile = "mt_sics"\nmode = "stream"',
        "",
        "devices[0]: tags[0] (w): no line of the profile carries a value 'w' "
        "(it has: weight); set `field`",
    ),
    (
        'profile = "mt_sics"',
        'field = "weight"\ncommand = "tare"',
        "devices[0]: tags[0] (w): unknown command 'tare'; "
        "the profile has ['weight', 'stable_weight']",
    ),
    (
        'profile = "kv_meter"',
        'command = "read"',
        "devices[0]: tags[0] (w): `command` only applies in request mode",
    ),
    (
        "",
        "",
        "devices[0]: give one of `profile` (a name or a file) and `inline_profile`",
    ),
    (
        'profile = "mt_sics"\nrequire_checksum = true',
        'field = "weight"',
        "devices[0]: require_checksum: the profile defines no [checksum]",
    ),
    (
        'profile = "mt_sics"\nbaudrat = 9600',
        'field = "weight"',
        "devices[0].baudrat: unknown key (check the spelling; see `gateway schema`)",
    ),
    (
        'profile = "mt_sics"\nparity = "N"',
        'field = "weight"',
        "devices[0].parity: Input should be 'none', 'even', 'odd', 'mark' or 'space' (got 'N')",
    ),
    (
        'profile = "mt_sics"\nstopbits = 3',
        'field = "weight"',
        "devices[0].stopbits: stopbits must be 1, 1.5 or 2 (got 3)",
    ),
    (
        'profile = "kv_meter"\nmode = "request"',
        'command = "nope"',
        "devices[0]: tags[0] (w): unknown command 'nope'; the profile has ['read']",
    ),
    (
        'profile = "kv_meter"',
        'field = "T"\noffset = 273.15',
        "devices[0]: tags[0] (w): scale/offset change the value, so the unit of the line no "
        "longer applies: set `unit` (the unit after scaling)",
    ),
    (
        'profile = "mt_sics"',
        'field = "weight"\nunit = "mg"\nscale = 1000',
        "devices[0]: tags[0] (w): the line reports its unit and scale/offset convert from it: "
        'set `device_unit` to the unit the line must report (e.g. "g"), or "" for no check',
    ),
]


@pytest.mark.parametrize(("device_keys", "tag_keys", "expected"), CONFIG_ERRORS)
def test_config_errors_name_the_device_field_and_problem(
    device_keys: str, tag_keys: str, expected: str
) -> None:
    device = (
        f'id = "b"\ndriver = "serial"\nport = "/dev/ttyUSB0"\n{device_keys}\n'
        f'[[devices.tags]]\nname = "w"\n{tag_keys}\n'
    )
    with pytest.raises(ConfigError) as err:
        gateway_config(Path("/tmp/unused"), 1883, device)
    assert expected in str(err.value), str(err.value)


def test_an_inline_profile_and_port_overrides(tmp_path: Path) -> None:
    device = """
id = "pump-1"
driver = "serial"
port = "/dev/ttyS0"
baudrate = 19200
parity = "even"
bytesize = 7
flow_control = "xonxoff"
terminator = "\\r"
[devices.inline_profile]
mode = "request"
[[devices.inline_profile.commands]]
name = "rate"
send = "RAT"
[[devices.inline_profile.messages]]
name = "rate"
pattern = '(?P<rate>\\d+\\.\\d+)(?P<unit>ML|MM)'
[devices.inline_profile.units]
ML = "mL/h"
MM = "mL/min"
[devices.inline_profile.fields.rate]
unit_group = "unit"
[[devices.tags]]
name = "rate"
"""
    cfg = gateway_config(tmp_path, 1883, device)
    dev = cfg.devices[0]
    assert isinstance(dev, SerialDevice)
    s = dev.port_settings()
    assert (s.baudrate, s.parity, s.bytesize, s.stopbits, s.flow_control) == (
        19200,
        "even",
        7,
        1,
        "xonxoff",
    )
    assert dev.effective_terminator == "\r" and dev.effective_mode == "request"
    assert dev.tag_plans[0].command == "rate"


def test_the_example_config_loads() -> None:
    cfg = load_config(REPO / "config" / "serial-balance.toml", env={})
    dev = cfg.devices[0]
    assert isinstance(dev, SerialDevice)
    assert dev.port == "/dev/serial/by-id/usb-Mettler_Toledo-if00"
    other = load_config(REPO / "config" / "serial-balance.toml", env={"BALANCE_PORT": "/dev/x"})
    assert other.devices[0].port == "/dev/x"  # type: ignore[attr-defined]


# --- the simulator's command line -----------------------------------------------------------


def test_simulator_main_prints_its_port_and_exits_0_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.serial_instruments", "--instrument", "balance"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        words = proc.stdout.readline().split()
        assert words[:2] == ["balance", "on"] and words[3] == "link", words
        link = Path(words[4])
        assert link.is_symlink() and os.readlink(link) == words[2]
        proc.stdin.write("fault error +\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("ok: fault error +")
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not link.parent.exists(), "the link and its temporary directory go with it"
    assert callable(main)
