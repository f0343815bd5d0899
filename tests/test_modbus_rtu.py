"""Modbus RTU: units sharing one serial bus, through the real gateway and broker.

The bus is :class:`simulators.modbus_rtu.RtuBusSimulator`: pymodbus' real RTU
serial server on one end of a pseudo-terminal "null-modem cable", the gateway
on the other end through a symlink that mimics /dev/serial/by-id. Line
settings are 8N2: some kernels refuse parity on a pseudo-terminal, and 8N2 is
the spec's 11-bit framing without parity.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ModbusIOException

from drivers.modbus import bus as rtu
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from gateway.config import Config, load_config
from gateway.errors import ConfigError, DriverError
from simulators.modbus_rtu import RtuBusSimulator
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import OFFGAS_TAGS, SMALL_TAGS, running

BY_ID = "serial/by-id/usb-OGA_RTU_bus_SIM0001-if00-port0"
FIXED = {"cal_constant": -123456789, "fixed_int64": -1234567890123, "fixed_uint32": 4000000000}
SCALED = {"gas_temp", "air_flow", "totalizer", "air_flow_sp"}
# Three reads per poll (input 0-3, 8-9 and 30-37): a poll of several requests.
THREE_READS = (
    SMALL_TAGS
    + """
[[devices.tags]]
name = "gas_temp"
table = "input"
address = 8
data_type = "int16"
scale = 0.01
[[devices.tags]]
name = "serial"
table = "input"
address = 30
data_type = "string"
length = 8
"""
)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[RtuBusSimulator]:
    s = RtuBusSimulator((1, 2, 3), link=tmp_path / BY_ID, time_scale=3600, update_interval=0.05)
    await s.start()
    yield s
    await s.stop()


def rtu_device(
    dev: str,
    port: str,
    unit: int,
    *,
    poll: float = 0.1,
    timeout: float = 0.1,
    fail_after: int = 3,
    tags: str = SMALL_TAGS,
) -> str:
    return (
        f'[[devices]]\nid = "{dev}"\ndriver = "modbus"\ntransport = "rtu"\n'
        f'serial_port = "{port}"\nunit_id = {unit}\nparity = "N"\nstopbits = 2\n'
        f"poll_interval = {poll}\ntimeout = {timeout}\nfail_after = {fail_after}\n{tags}\n"
    )


def gateway_config(tmp_path: Path, broker_port: int, *devices: str) -> Config:
    path = tmp_path / "gw-rtu.toml"
    path.write_text(
        f'[gateway]\nid = "gw-rtu"\nstate_dir = "{tmp_path / "state"}"\nshutdown_timeout = 5.0\n'
        f"[broker]\nport = {broker_port}\nreconnect_min = 0.1\nreconnect_max = 0.5\n"
        + "".join(devices)
    )
    return load_config(path)


def data(col: Collector, dev: str) -> list[Any]:
    return [r for r in col.of(dev) if not r["tag"].startswith("$")]


def rate(col: Collector, dev: str, t0: float, t1: float) -> float:
    """Polls per second of ``dev`` between wall times t0 and t1 (by its O2 readings)."""
    n = sum(1 for r in col.of(dev, "O2") if t0 <= r["ts"] / 1e9 < t1 and r["q"] == "good")
    return n / (t1 - t0)


async def test_two_units_share_one_port_and_deliver_verified_values(
    sim: RtuBusSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    # One device names the by-id symlink, the other the pty itself: same bus.
    cfg = gateway_config(
        tmp_path,
        broker.port,
        rtu_device("rtu-1", sim.gateway_port, 1, tags=OFFGAS_TAGS),
        rtu_device("rtu-2", sim.pty_path, 2, tags=OFFGAS_TAGS),
    )
    async with Collector(broker.port) as col:
        async with running(cfg):
            await col.wait_for(
                lambda: len(col.of("rtu-1", "O2")) >= 10 and len(col.of("rtu-2", "O2")) >= 10,
                what="10 polls of each unit",
            )
            open_buses = rtu.buses()
            assert list(open_buses) == [sim.pty_path], open_buses
            shared = open_buses[sim.pty_path]
            assert shared.users == {"rtu-1", "rtu-2"}
        await col.wait_for(lambda: col.of("rtu-2", "$stop"), what="stop event")
    assert rtu.buses() == {}, "the last device to let go closes the port"

    report = col.verifier.report()
    assert report.ok, report.summary()
    for dev, unit in (("rtu-1", 1), ("rtu-2", 2)):
        served = [values for _, values in sim.history_of(unit)]
        readings = data(col, dev)
        assert {r["tag"] for r in readings} >= {*FIXED, "serial", "O2", "uptime", "OUR"}
        for r in readings:
            assert r["q"] == "good", r
            tag, val = r["tag"], r["val"]
            if tag in FIXED:
                assert val == FIXED[tag], (dev, tag, val)
            elif tag == "serial":
                assert val == f"OGA-2000-SN{unit:04d}", val
            elif tag in SCALED:
                near = (math.isclose(val, float(v[tag]), abs_tol=1e-6) for v in served)
                assert any(near), (tag, val)
            else:
                assert any(val == v[tag] for v in served), (dev, tag, val)
    # The silence before each request, measured on the wire: at least t3.5.
    gaps = sim.turnarounds
    assert len(gaps) > 100
    assert min(gaps) >= rtu.frame_gap(19200), f"{min(gaps) * 1000:.3f} ms < t3.5"


async def test_dead_unit_costs_the_others_only_its_timeout(
    sim: RtuBusSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    # "dead" gives up after 3 timeouts (supervisor backoff); "stuck" never
    # does and keeps a request with a 0.1 s timeout queued all the time.
    cfg = gateway_config(
        tmp_path,
        broker.port,
        rtu_device("good", sim.gateway_port, 1, poll=0.2, tags=THREE_READS),
        rtu_device("dead", sim.gateway_port, 2, poll=0.2),
        rtu_device("stuck", sim.gateway_port, 3, poll=0.2, fail_after=1000, tags=THREE_READS),
    )
    async with Collector(broker.port) as col, running(cfg):
        await col.wait_for(lambda: len(col.of("dead", "O2")) >= 3, what="first polls")
        t0 = time.time()
        await asyncio.sleep(1.0)
        normal = rate(col, "good", t0, time.time())
        sim.set_fault("dead", unit_id=2)
        sim.set_fault("dead", unit_id=3)
        t0 = time.time()
        await asyncio.sleep(3.0)
        t1 = time.time()
        faulty = rate(col, "good", t0 + 0.3, t1)
        polls = sorted(r["ts"] / 1e9 for r in col.of("good", "O2") if t0 + 0.3 <= r["ts"] / 1e9)
        longest = max(b - a for a, b in itertools.pairwise(polls))
        sim.set_fault(None)
        t_back = time.time()
        await col.wait_for(
            lambda: all(
                any(r["q"] == "good" and r["ts"] / 1e9 > t_back for r in col.of(d, "O2"))
                for d in ("dead", "stuck")
            ),
            timeout=20,
            what="both units answering again",
        )
    print(f"\ngood unit: {normal:.2f} polls/s normal, {faulty:.2f} polls/s with 2 dead units")
    print(f"longest interval between two polls of the good unit: {longest * 1000:.0f} ms")
    assert 4.5 <= normal <= 5.5, normal
    # Budget: one dead request on the wire (0.1 s) per poll of the good unit,
    # whose poll (3 requests) then goes ahead of the dead units' queue.
    assert faulty >= 4.5, f"good unit polled at {faulty:.2f}/s while two units were dead"
    assert longest < 0.2 + 0.1 + 0.1, longest

    good = data(col, "good")
    assert all(r["q"] == "good" for r in good), "the good unit never failed"
    for dev in ("dead", "stuck"):
        bad = [r for r in data(col, dev) if r["q"] == "bad"]
        assert bad and all(r["val"] is None for r in bad)
        assert "timeout" in {r["status"] for r in bad}
    offline = col.of("dead", "$offline")
    assert any(r["val"].startswith("no answer to 3 requests in a row") for r in offline)
    assert len(col.of("dead", "$online")) == 2, "online, offline, back online: no flapping"
    assert not col.of("stuck", "$offline"), "fail_after=1000 keeps it connected"
    assert not col.of("good", "$offline")
    report = col.verifier.report()
    assert report.ok, report.summary()


async def test_unit_dead_from_the_start_is_never_online(
    sim: RtuBusSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    sim.set_fault("dead", unit_id=2)
    cfg = gateway_config(
        tmp_path,
        broker.port,
        rtu_device("good", sim.gateway_port, 1),
        rtu_device("dead", sim.gateway_port, 2),
    )
    async with Collector(broker.port) as col, running(cfg):
        await col.wait_for(lambda: len(col.of("dead", "O2")) >= 2, what="two failed attempts")
        await col.wait_for(lambda: len(col.of("good", "O2")) >= 10, what="good polls")
    assert not col.of("dead", "$online"), "a unit that never answered was never online"
    (offline,) = col.of("dead", "$offline")
    assert offline["val"] == (
        f"unit 2 on {sim.gateway_port} ({sim.pty_path}) does not answer (timeout 0.1 s)"
    )
    assert {r["q"] for r in data(col, "dead")} == {"bad"}
    assert {r["q"] for r in data(col, "good")} == {"good"}


async def test_exception_from_one_unit_is_its_status_code(
    sim: RtuBusSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = gateway_config(
        tmp_path,
        broker.port,
        rtu_device("rtu-1", sim.gateway_port, 1),
        rtu_device("rtu-2", sim.gateway_port, 2),
    )
    async with Collector(broker.port) as col, running(cfg):
        await col.wait_for(lambda: len(col.of("rtu-2", "O2")) >= 3, what="first polls")
        sim.set_fault("exception", 6, unit_id=2)  # SLAVE DEVICE BUSY
        await col.wait_for(
            lambda: any(r.get("status") == 6 for r in col.of("rtu-2", "O2")), what="exception 6"
        )
        sim.set_fault(None)
        t_back = time.time()
        await col.wait_for(
            lambda: any(r["q"] == "good" and r["ts"] / 1e9 > t_back for r in col.of("rtu-2", "O2")),
            what="recovery",
        )
    bad = [r for r in data(col, "rtu-2") if r["q"] == "bad"]
    assert bad and {r["status"] for r in bad} == {6}
    assert all(r["val"] is None for r in bad)
    assert not col.of("rtu-2", "$offline"), "an exception is an answer: the unit stays online"
    assert {r["q"] for r in data(col, "rtu-1")} == {"good"}
    report = col.verifier.report()
    assert report.ok, report.summary()


async def test_unplug_then_replug_takes_every_unit_offline_and_back(
    sim: RtuBusSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    devices = ("rtu-1", "rtu-2")
    cfg = gateway_config(
        tmp_path,
        broker.port,
        rtu_device(devices[0], sim.gateway_port, 1),
        rtu_device(devices[1], sim.gateway_port, 2, poll=0.5),
    )
    async with Collector(broker.port) as col, running(cfg):
        await col.wait_for(lambda: all(col.of(d, "$online") for d in devices), what="online")
        await col.wait_for(lambda: len(col.of("rtu-2", "O2")) >= 2, what="first polls")
        await sim.unplug()
        await col.wait_for(
            lambda: all(col.of(d, "$offline") for d in devices), timeout=5, what="$offline"
        )
        assert rtu.buses() == {}, "a vanished port is forgotten at once"
        await asyncio.sleep(1.0)
        await sim.replug()
        t_back = time.time()
        await col.wait_for(
            lambda: all(len(col.of(d, "$online")) == 2 for d in devices),
            timeout=15,
            what="$online again",
        )
        await col.wait_for(
            lambda: all(
                any(r["q"] == "good" and r["ts"] / 1e9 > t_back for r in col.of(d, "O2"))
                for d in devices
            ),
            what="records resuming",
        )
        (shared,) = rtu.buses().values()
        assert shared.users == set(devices), "both units share the reopened bus"
    for dev in devices:
        (offline,) = col.of(dev, "$offline")
        assert "closed (device unplugged?)" in offline["val"], offline["val"]
        statuses = {r["status"] for r in data(col, dev) if r["q"] == "bad"}
        assert any("not found (unplugged?)" in str(s) for s in statuses), statuses
    report = col.verifier.report()
    assert report.ok, report.summary()


# --------------------------------------------------------------------- driver
def device(port: str, unit: int = 1, **extra: Any) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {
            "id": f"unit-{unit}",
            "driver": "modbus",
            "transport": "rtu",
            "serial_port": port,
            "unit_id": unit,
            "parity": "N",
            "stopbits": 2,
            "timeout": 0.2,
            "tags": [{"name": "O2", "table": "input", "address": 0, "data_type": "float32"}],
            **extra,
        }
    )


async def test_bus_is_reference_counted_and_settings_must_agree(sim: RtuBusSimulator) -> None:
    one = ModbusDriver(device(sim.gateway_port, 1))
    two = ModbusDriver(device(sim.pty_path, 2))
    await one.connect()
    await two.connect()
    (shared,) = rtu.buses().values()
    assert shared.users == {"unit-1", "unit-2"}
    assert shared.gap == pytest.approx(3.5 * 11 / 19200)

    other = ModbusDriver(device(sim.gateway_port, 3, baudrate=9600))
    with pytest.raises(DriverError, match="all units on one bus must use the same line settings"):
        await other.connect()
    await other.close()

    await one.close()
    assert rtu.buses() == {sim.pty_path: shared}, "still open for unit 2"
    (reading,) = await two.poll()
    assert reading.q == "good" and isinstance(reading.val, float)
    await two.close()
    assert rtu.buses() == {}

    missing = ModbusDriver(device(str(Path(sim.gateway_port).with_name("nothing-here"))))
    with pytest.raises(DriverError, match=r"nothing-here not found \(unplugged\?\)"):
        await missing.connect()
    await missing.close()

    not_a_tty = Path(sim.gateway_port).with_name("regular-file")
    not_a_tty.write_text("")
    wrong = ModbusDriver(device(str(not_a_tty)))
    with pytest.raises(DriverError, match=r"cannot open serial port .*regular-file at 19200 8N2"):
        await wrong.connect()
    await wrong.close()
    assert rtu.buses() == {}


async def test_unplug_ends_the_request_on_the_wire_at_once(sim: RtuBusSimulator) -> None:
    alive = ModbusDriver(device(sim.gateway_port, 1))
    dead = ModbusDriver(device(sim.gateway_port, 2, timeout=5.0))
    await alive.connect()
    await dead.connect()
    sim.set_fault("dead", unit_id=2)
    poll = asyncio.create_task(dead.poll())
    await asyncio.sleep(0.2)  # its request is on the wire, answer due in 5 s
    t0 = time.monotonic()
    await sim.unplug()
    with pytest.raises(DriverError, match=r"closed \(device unplugged\?\)"):
        await poll
    assert time.monotonic() - t0 < 0.5, "an unplugged port is not a 5 s timeout"
    with pytest.raises(DriverError, match=r"closed \(device unplugged\?\)"):
        await alive.poll()
    await dead.close()
    await alive.close()
    assert rtu.buses() == {}


async def test_turns_put_answering_units_first_but_never_starve_a_silent_one() -> None:
    loop = asyncio.get_running_loop()
    turns = rtu._Turns(loop, gap=0.001)
    order: list[str] = []

    async def request(name: str, suspect: bool) -> None:
        await turns.acquire(suspect)
        order.append(name)
        await asyncio.sleep(0)
        turns.release()

    await turns.acquire(False)  # a transaction on the wire; everyone else queues
    tasks = [asyncio.create_task(request("dead-1", True))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(request(f"good-{i}", False)) for i in range(rtu.MAX_BYPASS + 2)]
    await asyncio.sleep(0)
    turns.release()
    await asyncio.gather(*tasks)
    assert order.index("dead-1") == rtu.MAX_BYPASS, order
    assert [n for n in order if n != "dead-1"] == [f"good-{i}" for i in range(rtu.MAX_BYPASS + 2)]


# --------------------------------------------------------------------- config
BASE = """\
[gateway]
id = "gw"

[[devices]]
id = "bus-unit"
driver = "modbus"
{keys}

[[devices.tags]]
name = "O2"
table = "input"
address = 0
"""


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            'transport = "rtu"',
            "devices[0].serial_port: required key is missing: transport 'rtu' needs the serial "
            "device",
        ),
        (
            'transport = "rtu"\nserial_port = "/dev/ttyUSB0"\nhost = "10.0.0.5"',
            "devices[0].host: does not apply to transport 'rtu'",
        ),
        (
            'transport = "rtu"\nserial_port = "/dev/ttyUSB0"\nport = 502',
            "devices[0].port: does not apply to transport 'rtu'",
        ),
        (
            'transport = "rtu"\nserial_port = "/dev/ttyUSB0"\nparity = "even"',
            "devices[0].parity: Input should be 'N', 'E' or 'O' (got 'even')",
        ),
        (
            'transport = "rtu"\nserial_port = "/dev/ttyUSB0"\nstopbits = 3',
            "devices[0].stopbits: Input should be less than or equal to 2 (got 3)",
        ),
        (
            'transport = "rtu"\nserial_port = "/dev/ttyUSB0"\nunit_id = 0',
            "devices[0].unit_id: must be 1-247 on an RTU bus",
        ),
        ('host = "10.0.0.5"\nbaudrate = 9600', "devices[0].baudrate: only applies to transport"),
        ('host = "10.0.0.5"\nserial_port = "/dev/ttyUSB0"', "devices[0].serial_port: only applies"),
        ("", "devices[0].host: required key is missing"),
        ('transport = "ascii"', "devices[0].transport: Input should be 'tcp' or 'rtu'"),
    ],
)
def test_config_errors_name_the_field(keys: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BASE.format(keys=keys))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert expected in str(err.value), str(err.value)
    assert str(path) in str(err.value)


def test_config_rtu_defaults_and_tcp_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        BASE.format(keys='transport = "rtu"\nserial_port = "/dev/serial/by-id/usb-x-if00"')
    )
    (dev,) = load_config(path, env={}).devices
    assert isinstance(dev, ModbusDevice)
    assert (dev.transport, dev.serial_port, dev.host) == (
        "rtu",
        "/dev/serial/by-id/usb-x-if00",
        None,
    )
    assert (dev.baudrate, dev.bytesize, dev.parity, dev.stopbits) == (19200, 8, "E", 1)

    path.write_text(BASE.format(keys='host = "10.0.0.5"'))
    (dev,) = load_config(path, env={}).devices
    assert isinstance(dev, ModbusDevice)
    assert (dev.transport, dev.host, dev.port, dev.serial_port) == ("tcp", "10.0.0.5", 502, None)


def test_example_config_is_two_units_on_one_bus() -> None:
    cfg = load_config(Path(__file__).parent.parent / "config" / "modbus-rtu.toml", env={})
    ports = {d.serial_port for d in cfg.devices if isinstance(d, ModbusDevice)}
    assert ports == {"/dev/ttyUSB0"} and len(cfg.devices) == 2
    cfg = load_config(
        Path(__file__).parent.parent / "config" / "modbus-rtu.toml", env={"RTU_PORT": "/dev/x"}
    )
    assert {d.serial_port for d in cfg.devices if isinstance(d, ModbusDevice)} == {"/dev/x"}


def test_schema_says_which_keys_each_transport_requires() -> None:
    schema = ModbusDevice.model_json_schema()
    assert "host" not in schema["required"], "host is required for tcp only"
    assert schema["properties"]["transport"]["enum"] == ["tcp", "rtu"]
    (rule,) = schema["allOf"]
    assert rule["if"] == {"properties": {"transport": {"const": "rtu"}}, "required": ["transport"]}
    assert rule["then"]["required"] == ["serial_port"]
    assert {"required": ["host"]} in rule["then"]["not"]["anyOf"]
    assert rule["else"]["required"] == ["host"]
    assert {"required": ["baudrate"]} in rule["else"]["not"]["anyOf"]


async def test_simulator_standalone_prints_the_port_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    link = tmp_path / BY_ID
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.modbus_rtu",
        "--unit-id",
        "1",
        "--unit-id",
        "7",
        "--link",
        str(link),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert first.decode().strip() == str(link)
        client = AsyncModbusSerialClient(
            str(link), parity="N", stopbits=2, timeout=0.5, retries=0, reconnect_delay=0
        )
        assert await client.connect()
        try:
            rr = await client.read_input_registers(30, count=8, device_id=7)
            text = b"".join(r.to_bytes(2, "big") for r in rr.registers).rstrip(b"\0")
            assert text == b"OGA-2000-SN0007"
            proc.stdin.write(b"fault dead 7\n")
            assert (
                await asyncio.wait_for(proc.stdout.readline(), 5)
            ).strip() == b"ok: fault dead 7"
            with pytest.raises(ModbusIOException):
                await client.read_input_registers(0, count=2, device_id=7)
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert not link.exists(), "the symlink goes with the simulator"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
