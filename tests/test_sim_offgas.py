"""End-to-end tests of the off-gas Modbus TCP simulator with a real pymodbus client.

Decoding here is written independently of both the simulator's encoder and
the gateway's decoder (byte permutations + struct), so the three cross-check.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException

from simulators.offgas import OffGasSimulator

REPO = Path(__file__).resolve().parents[1]
WEEK = 7 * 86400.0


def decode(registers: Sequence[int], fmt: str, order: str) -> Any:
    """Decode registers by reordering bytes into big-endian, then ``struct``."""
    data = b"".join(r.to_bytes(2, "big") for r in registers)
    if order == "CDAB":  # registers reversed
        data = b"".join(data[i : i + 2] for i in reversed(range(0, len(data), 2)))
    elif order == "BADC":  # bytes swapped inside each register
        data = bytes(data[i ^ 1] for i in range(len(data)))
    elif order == "DCBA":  # fully little-endian
        data = data[::-1]
    else:
        assert order == "ABCD"
    return struct.unpack(">" + fmt, data)[0]


@asynccontextmanager
async def simulator(**kwargs: Any) -> AsyncIterator[OffGasSimulator]:
    sim = OffGasSimulator(port=0, **kwargs)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@asynccontextmanager
async def client(
    sim: OffGasSimulator, timeout: float = 1.0, **kwargs: Any
) -> AsyncIterator[AsyncModbusTcpClient]:
    c = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=timeout, retries=0, **kwargs)
    assert await c.connect()
    try:
        yield c
    finally:
        c.close()


async def read_inputs(c: AsyncModbusTcpClient, device_id: int = 1) -> list[int]:
    """Input registers 0..45 with the two gaps filled by -1 (three reads)."""
    regs = [-1] * 46
    for start, count in ((0, 23), (30, 8), (40, 6)):
        r = await c.read_input_registers(start, count=count, device_id=device_id)
        assert not r.isError(), r
        regs[start : start + count] = r.registers
    return regs


async def eventually(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_values_plausible_and_moving() -> None:
    async with simulator(time_scale=3600, update_interval=0.05) as sim, client(sim) as c:
        first = await read_inputs(c)
        o2 = decode(first[0:2], "f", "ABCD")
        co2 = decode(first[2:4], "f", "CDAB")
        assert 20.5 < o2 <= 20.95
        assert 0.04 <= co2 < 0.5
        assert 36.5 < decode(first[8:9], "h", "ABCD") / 100 < 37.5
        assert decode(first[9:10], "H", "ABCD") / 10 == pytest.approx(500.0, rel=0.01)
        await asyncio.sleep(0.5)  # ~half a simulated hour
        second = await read_inputs(c)
        uptime = decode(first[12:16], "Q", "ABCD"), decode(second[12:16], "Q", "ABCD")
        assert 900 < uptime[1] - uptime[0] < 10800  # generous for a loaded machine
        total = decode(first[10:12], "I", "CDAB"), decode(second[10:12], "I", "CDAB")
        assert total[1] > total[0]  # ~15 L per simulated half hour
        assert second[0:8] != first[0:8]  # gas readings move
        assert decode(second[16:20], "d", "ABCD") > decode(first[16:20], "d", "ABCD")  # OUR grows


async def test_culture_trend_over_two_weeks() -> None:
    # update_interval is huge so only the explicit tick() moves the model.
    async with simulator(time_scale=WEEK, update_interval=3600) as sim, client(sim) as c:
        start = sim.values()
        sim.tick(2.0)  # 14 simulated days
        end = sim.values()
        assert float(start["O2"]) > 20.8 and float(end["O2"]) < 17.6
        assert float(start["CO2"]) < 0.15 and float(end["CO2"]) > 3.4
        # O2 below the 18 % default limit raises discrete input 0.
        r = await c.read_discrete_inputs(0, count=2)
        assert r.bits[:2] == [True, False]
        assert end["o2_low_alarm"] is True
        assert end["uptime"] == 14 * 86400


async def test_every_register_decodes_to_values() -> None:
    async with simulator(time_scale=WEEK, update_interval=3600) as sim, client(sim) as c:
        sim.tick(1.0)  # one simulated week: mid-culture, every field non-trivial
        v = sim.values()
        raw = await read_inputs(c)
        holding = (await c.read_holding_registers(0, count=3)).registers
        coils = (await c.read_coils(0, count=2)).bits[:2]
        discretes = (await c.read_discrete_inputs(0, count=2)).bits[:2]

        assert decode(raw[0:2], "f", "ABCD") == v["O2"]
        assert decode(raw[2:4], "f", "CDAB") == v["CO2"]
        assert decode(raw[4:6], "f", "BADC") == v["O2_badc"] == v["O2"]
        assert decode(raw[6:8], "f", "DCBA") == v["CO2_dcba"] == v["CO2"]
        assert decode(raw[8:9], "h", "ABCD") / 100 == v["gas_temp"]
        assert decode(raw[9:10], "H", "ABCD") / 10 == v["air_flow"]
        assert decode(raw[10:12], "I", "CDAB") / 10 == v["totalizer"]
        assert decode(raw[12:16], "Q", "ABCD") == v["uptime"] == 7 * 86400
        assert decode(raw[16:20], "d", "ABCD") == v["OUR"]
        assert decode(raw[20:22], "i", "DCBA") == v["cal_constant"] == -123456789
        status = decode(raw[22:23], "H", "ABCD")
        assert status == v["status"]
        assert bool(status & 1) is v["ready"] is True
        assert bool(status & 2) is v["flow_alarm"] is False
        assert bool(status & 0x8000) is v["status_bit15"] is True
        serial = b"".join(r.to_bytes(2, "big") for r in raw[30:38])
        assert serial == b"OGA-2000-SN0001\0"
        assert v["serial"] == "OGA-2000-SN0001"
        assert decode(raw[40:44], "q", "BADC") == v["fixed_int64"] == -1234567890123
        assert decode(raw[44:46], "I", "ABCD") == v["fixed_uint32"] == 4000000000
        assert holding[0] / 10 == v["air_flow_sp"] == 500.0
        assert decode(holding[1:3], "f", "ABCD") == v["o2_low_limit"] == 18.0
        assert coils == [v["sample_pump"], v["cal_valve"]] == [True, False]
        assert discretes == [v["o2_low_alarm"], v["analyser_fault"]]
        # Plausible mid-culture values (a week in: O2 ~18.6 %, CO2 ~2.4 %).
        assert 17.5 < float(v["O2"]) < 20.0 and 1.0 < float(v["CO2"]) < 3.5

        served = sim.registers()
        assert served["O2"] == raw[0:2] and served["CO2_dcba"] == raw[6:8]
        assert served["OUR"] == raw[16:20] and served["serial"] == raw[30:38]
        assert served["fixed_uint32"] == raw[44:46] and served["air_flow_sp"] == holding[:1]
        assert served["sample_pump"] == [1] and served["analyser_fault"] == [0]


async def test_history_has_what_was_read() -> None:
    async with simulator(time_scale=3600, update_interval=0.02) as sim, client(sim) as c:
        seen = []
        for _ in range(5):
            r = await c.read_input_registers(0, count=2)
            seen.append(decode(r.registers, "f", "ABCD"))
            await asyncio.sleep(0.05)
        served = {snap["O2"] for _, snap in sim.history}
        assert set(seen) <= served
        stamps = [t for t, _ in sim.history]
        assert stamps == sorted(stamps) and stamps[-1] <= time.time()
        assert sim.history.maxlen == 2000


async def test_unmapped_addresses_answer_illegal_address() -> None:
    async with simulator() as sim, client(sim) as c:
        checks = [
            c.read_input_registers(23, count=1),
            c.read_input_registers(20, count=10),  # spans the 23..29 gap
            c.read_input_registers(38, count=2),
            c.read_input_registers(44, count=3),  # runs past the end
            c.read_input_registers(46, count=1),
            c.read_holding_registers(3, count=1),
            c.read_holding_registers(0, count=4),
            c.write_register(3, 1),
            c.read_coils(2, count=1),
            c.read_coils(16, count=1),
            c.write_coils(1, [True, True]),
            c.read_discrete_inputs(2, count=1),
        ]
        for request in checks:
            response = await request
            assert response.isError() and response.exception_code == 2, response


async def test_unknown_unit_id() -> None:
    async with simulator(unit_ids=(1,)) as sim, client(sim) as c:
        r = await c.read_input_registers(0, count=2, device_id=9)
        assert r.isError() and r.exception_code == 0x0B


async def test_fault_silent_times_out_without_blocking_others() -> None:
    async with (
        simulator(unit_ids=(1, 2), time_scale=3600, update_interval=0.02) as sim,
        client(sim, timeout=0.3) as c,
    ):
        sim.set_fault("silent", unit_id=2)
        uptime_before = sim.values(2)["uptime"]
        t0 = time.monotonic()
        with pytest.raises(ModbusIOException):
            await c.read_input_registers(0, count=2, device_id=2)
        assert time.monotonic() - t0 >= 0.25
        assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
        assert int(sim.values(2)["uptime"]) > int(uptime_before)  # model kept running
        # A write during the fault is not applied either.
        with pytest.raises(ModbusIOException):
            await c.write_register(0, 7000, device_id=2)
        sim.set_fault(None)
        r = await c.read_holding_registers(0, count=1, device_id=2)
        assert r.registers == [5000]
        # All units silent; then service is back and no stale reply shows up.
        sim.set_fault("silent")
        with pytest.raises(ModbusIOException):
            await c.read_input_registers(0, count=2, device_id=1)
        sim.set_fault(None)
        r = await c.read_input_registers(30, count=8, device_id=1)
        assert not r.isError() and r.registers[0] == int.from_bytes(b"OG", "big")


async def test_fault_exception() -> None:
    async with simulator() as sim, client(sim) as c:
        sim.set_fault("exception")
        assert sim.values()["analyser_fault"] is True
        for request in (
            c.read_input_registers(0, count=2),
            c.read_holding_registers(0, count=1),
            c.read_coils(0, count=1),
            c.read_discrete_inputs(0, count=2),
            c.write_register(0, 6000),
        ):
            r = await request
            assert r.isError() and r.exception_code == 4, r
        sim.set_fault("exception", exception_code=6)
        r = await c.read_input_registers(0, count=2)
        assert r.isError() and r.exception_code == 6
        with pytest.raises(ValueError):
            sim.set_fault("exception", exception_code=99)
        sim.set_fault(None)
        assert sim.values()["analyser_fault"] is False
        assert (await c.read_holding_registers(0, count=1)).registers == [5000]  # write refused
        assert (await c.read_discrete_inputs(0, count=2)).bits[1] is False


async def test_fault_drop() -> None:
    async with simulator() as sim, client(sim, reconnect_delay=0) as c:
        assert not (await c.read_input_registers(0, count=2)).isError()
        sim.set_fault("drop")
        await eventually(lambda: not c.connected)
        with pytest.raises(ConnectionException):
            await c.read_input_registers(0, count=2)
        # New connections are accepted, then closed at once.
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        assert await asyncio.wait_for(reader.read(100), timeout=2) == b""
        writer.close()
        sim.set_fault(None)
        async with client(sim) as again:
            assert not (await again.read_input_registers(0, count=2)).isError()
        with pytest.raises(ValueError):
            sim.set_fault("drop", unit_id=1)


async def test_stop_then_start_rebinds_same_port() -> None:
    async with simulator(time_scale=3600, update_interval=0.02) as sim:
        port = sim.port
        assert port > 0
        async with client(sim) as c:
            assert not (await c.read_input_registers(0, count=2)).isError()
            await sim.stop()
            await eventually(lambda: not c.connected)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        uptime = int(sim.values()["uptime"])
        await sim.start()
        assert sim.port == port
        async with client(sim) as c:
            r = await c.read_input_registers(12, count=4)
            assert decode(r.registers, "Q", "ABCD") >= uptime
        with pytest.raises(RuntimeError):
            await sim.start()


async def test_setpoint_write_moves_actual_flow() -> None:
    async with simulator(time_scale=1.0, update_interval=0.05) as sim, client(sim) as c:
        assert not (await c.write_register(0, 8000)).isError()
        assert (await c.read_holding_registers(0, count=1)).registers == [8000]
        assert sim.values()["air_flow_sp"] == 800.0
        flows: list[float] = []
        alarms: list[bool] = []
        deadline = time.monotonic() + 5.0  # MFC time constant is 0.5 s
        while time.monotonic() < deadline:
            r = await c.read_input_registers(9, count=1)
            flows.append(r.registers[0] / 10)
            status = (await c.read_input_registers(22, count=1)).registers[0]
            alarms.append(bool(status & 2))
            if abs(flows[-1] - 800.0) < 8.0 and not alarms[-1]:
                break
            await asyncio.sleep(0.02)
        assert flows[0] < 600.0  # first-order lag: not there at once
        assert any(550.0 < f < 780.0 for f in flows)  # seen on the way
        assert abs(flows[-1] - 800.0) < 8.0
        assert alarms[0] and not alarms[-1]  # >10 % off setpoint, then settled
        # Out-of-range setpoint and O2 limit are refused with ILLEGAL VALUE.
        r = await c.write_register(0, 10001)
        assert r.isError() and r.exception_code == 3
        bad = list(struct.unpack(">HH", struct.pack(">f", 30.0)))
        r = await c.write_registers(1, bad)
        assert r.isError() and r.exception_code == 3
        good = list(struct.unpack(">HH", struct.pack(">f", 19.5)))
        assert not (await c.write_registers(1, good)).isError()
        assert sim.values()["o2_low_limit"] == 19.5


async def test_coils_drive_ready_bit() -> None:
    async with simulator() as sim, client(sim) as c:
        assert not (await c.write_coil(0, False)).isError()
        assert (await c.read_coils(0, count=2)).bits[:2] == [False, False]
        status = (await c.read_input_registers(22, count=1)).registers[0]
        assert status & 1 == 0 and status & 0x8000
        assert sim.values()["sample_pump"] is False and sim.values()["ready"] is False
        assert not (await c.write_coils(0, [True, True])).isError()
        assert (await c.read_coils(0, count=2)).bits[:2] == [True, True]
        assert sim.values()["ready"] is False  # calibration valve open
        assert not (await c.write_coil(1, False)).isError()
        assert sim.values()["ready"] is True


async def test_two_units_answer_independently() -> None:
    async with (
        simulator(unit_ids=(1, 2), time_scale=3600, update_interval=0.05) as sim,
        client(sim) as c,
    ):
        one, two = await read_inputs(c, 1), await read_inputs(c, 2)
        assert one[30:38] != two[30:38]
        assert b"".join(r.to_bytes(2, "big") for r in two[30:38]) == b"OGA-2000-SN0002\0"
        assert sim.values(1)["O2"] != sim.values(2)["O2"]  # own inoculum and noise
        assert not (await c.write_register(0, 3000, device_id=2)).isError()
        assert (await c.read_holding_registers(0, count=1, device_id=1)).registers == [5000]
        assert (await c.read_holding_registers(0, count=1, device_id=2)).registers == [3000]
        sim.set_fault("exception", unit_id=1)
        r1 = await c.read_input_registers(0, count=2, device_id=1)
        r2 = await c.read_input_registers(0, count=2, device_id=2)
        assert r1.isError() and not r2.isError()
        assert sim.values(2)["analyser_fault"] is False
        assert len(sim.history_of(2)) > 0 and sim.history is sim.history_of(1)


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        OffGasSimulator(unit_ids=(1, 1))
    with pytest.raises(ValueError):
        OffGasSimulator(unit_ids=())
    with pytest.raises(ValueError):
        OffGasSimulator(update_interval=0)
    with pytest.raises(ValueError):
        OffGasSimulator().set_fault("melt")  # type: ignore[arg-type]


async def _readline(stream: asyncio.StreamReader, timeout: float = 10.0) -> str:
    return (await asyncio.wait_for(stream.readline(), timeout)).decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_main_runs_until_signal(sig: signal.Signals) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.offgas",
        "--port",
        "0",
        "--time-scale",
        "3600",
        "--unit-id",
        "1",
        "--unit-id",
        "3",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = await _readline(proc.stdout)
        assert first.startswith("offgas simulator listening on 127.0.0.1:"), first
        assert first.rstrip().endswith("units=[1, 3]")
        port = int(first.split("127.0.0.1:")[1].split()[0])
        c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        assert await c.connect()
        try:
            r = await c.read_input_registers(30, count=8, device_id=3)
            assert b"".join(x.to_bytes(2, "big") for x in r.registers) == b"OGA-2000-SN0003\0"
            proc.stdin.write(b"fault exception 6\n")
            assert (await _readline(proc.stdout)).startswith("ok: fault exception 6")
            r = await c.read_input_registers(0, count=2, device_id=1)
            assert r.isError() and r.exception_code == 6
            proc.stdin.write(b"fault off\nvalues\n")
            assert (await _readline(proc.stdout)).startswith("ok: fault off")
            snapshot = json.loads(await _readline(proc.stdout))
            assert snapshot["unit"] == 1 and snapshot["serial"] == "OGA-2000-SN0001"
            assert json.loads(await _readline(proc.stdout))["unit"] == 3
            assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
        finally:
            c.close()
        proc.send_signal(sig)
        assert await asyncio.wait_for(proc.wait(), timeout=5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
