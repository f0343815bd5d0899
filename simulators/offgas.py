"""Modbus TCP simulator: bioreactor off-gas analyser with an air mass-flow controller.

A real pymodbus TCP server (``pymodbus.simulator.SimDevice`` datastore) serving a
fed-batch culture from :mod:`simulators.process_model`, one independent
analyser per unit id. Values are encoded here with :mod:`struct` and nothing
from ``drivers/``, so the simulator cross-checks the gateway's decoder instead
of sharing its bugs.

Register map (0-based addresses, identical for every unit id)
==============================================================

Byte orders for a value whose big-endian bytes are ``A B C D (E F G H)``:
``ABCD`` big-endian; ``CDAB`` registers reversed, bytes big-endian in each;
``BADC`` registers in order, bytes swapped in each; ``DCBA`` little-endian.
"eng = raw x scale" turns the decoded integer into engineering units.

=========  =======  ===============  ========  ======  ===========================
table      address  tag              type      order   meaning
=========  =======  ===============  ========  ======  ===========================
input      0-1      O2               float32   ABCD    off-gas O2, %
input      2-3      CO2              float32   CDAB    off-gas CO2, %
input      4-5      O2_badc          float32   BADC    off-gas O2 again, %
input      6-7      CO2_dcba         float32   DCBA    off-gas CO2 again, %
input      8        gas_temp         int16     ABCD    gas temperature, °C x 100
input      9        air_flow         uint16    ABCD    actual air flow, sccm x 10
input      10-11    totalizer        uint32    CDAB    air delivered, L x 10 (floor)
input      12-15    uptime           uint64    ABCD    simulated seconds since start
input      16-19    OUR              float64   ABCD    O2 uptake rate, mmol/L/h
input      20-21    cal_constant     int32     DCBA    fixed -123456789
input      22       status           uint16    ABCD    status word, bits below
input      22.0     ready            bit       ABCD    analyser ready (pump on, cal
                                                       valve closed)
input      22.1     flow_alarm       bit       ABCD    flow outside +-10 % of setpoint
input      22.15    status_bit15     bit       ABCD    always 1
input      30-37    serial           string    ABCD    "OGA-2000-SN0001" (SN = unit
                                                       id), high byte first, NUL pad
input      40-43    fixed_int64      int64     BADC    fixed -1234567890123
input      44-45    fixed_uint32     uint32    ABCD    fixed 4000000000
holding    0        air_flow_sp      uint16    ABCD    air flow setpoint, sccm x 10,
                                                       writable 0..10000, default 5000
holding    1-2      o2_low_limit     float32   ABCD    O2 alarm low limit, %, writable
                                                       0..25, default 18.0
coil       0        sample_pump      bool              sample pump on, default True
coil       1        cal_valve        bool              calibration valve, default False
discrete   0        o2_low_alarm     bool              O2 < o2_low_limit
discrete   1        analyser_fault   bool              True while fault "exception" set
=========  =======  ===============  ========  ======  ===========================

Any other address answers exception 2 (ILLEGAL ADDRESS), including input
23-29 and 38-39, so a read that spans a gap fails as on a real device. A write
of a value outside the writable range above answers 3 (ILLEGAL VALUE) and
changes nothing. A unit id that is not simulated answers 0x0B (GATEWAY TARGET
FAILED TO RESPOND).

Coils and discrete inputs use pymodbus's non-shared blocks with bit
addressing, so coil/discrete address N is bit N. The datastore stores bits in
16-bit words, so a read starting at bit 0 may run up to bit 15 and sees
``False`` padding; a read or write starting at bit >= 2 (or a write running
past bit 1) is refused with ILLEGAL ADDRESS.

:data:`REGISTER_MAP` carries the same table for code (e.g. to write a config).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators import console
from simulators.console import run_until_signal
from simulators.process_model import CultureModel

__all__ = [
    "REGISTER_MAP",
    "FaultKind",
    "OffGasSimulator",
    "TagSpec",
    "encode_value",
    "main",
]

log = logging.getLogger(__name__)

FaultKind = Literal["silent", "exception", "drop"]
ByteOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Table = Literal["input", "holding", "coil", "discrete"]
EngValue = int | float | bool | str

HISTORY_LEN = 2000
CAL_CONSTANT = -123456789
FIXED_INT64 = -1234567890123
FIXED_UINT32 = 4_000_000_000
SERIAL_REGISTERS = 8
SETPOINT_MAX_RAW = 10000  # 1000.0 sccm, the MFC's full scale
O2_LIMIT_RANGE = (0.0, 25.0)
DEFAULT_SETPOINT_RAW = 5000
DEFAULT_O2_LOW_LIMIT = 18.0
INPUT_REGISTER_COUNT = 46  # addresses 0..45, gaps included


@dataclass(frozen=True)
class TagSpec:
    """One row of the register map, in the gateway's vocabulary."""

    name: str
    table: Table
    address: int
    data_type: str  # int16 uint16 int32 uint32 int64 uint64 float32 float64 string bit bool
    byte_order: ByteOrder = "ABCD"
    length: int = 1  # registers (coils/discretes: 1)
    bit: int | None = None  # for data_type "bit"
    scale: float = 1.0  # engineering value = decoded raw x scale
    unit: str = ""
    writable: bool = False


REGISTER_MAP: tuple[TagSpec, ...] = (
    TagSpec("O2", "input", 0, "float32", "ABCD", 2, unit="%"),
    TagSpec("CO2", "input", 2, "float32", "CDAB", 2, unit="%"),
    TagSpec("O2_badc", "input", 4, "float32", "BADC", 2, unit="%"),
    TagSpec("CO2_dcba", "input", 6, "float32", "DCBA", 2, unit="%"),
    TagSpec("gas_temp", "input", 8, "int16", scale=0.01, unit="°C"),
    TagSpec("air_flow", "input", 9, "uint16", scale=0.1, unit="sccm"),
    TagSpec("totalizer", "input", 10, "uint32", "CDAB", 2, scale=0.1, unit="L"),
    TagSpec("uptime", "input", 12, "uint64", "ABCD", 4, unit="s"),
    TagSpec("OUR", "input", 16, "float64", "ABCD", 4, unit="mmol/L/h"),
    TagSpec("cal_constant", "input", 20, "int32", "DCBA", 2),
    TagSpec("status", "input", 22, "uint16"),
    TagSpec("ready", "input", 22, "bit", bit=0),
    TagSpec("flow_alarm", "input", 22, "bit", bit=1),
    TagSpec("status_bit15", "input", 22, "bit", bit=15),
    TagSpec("serial", "input", 30, "string", "ABCD", SERIAL_REGISTERS),
    TagSpec("fixed_int64", "input", 40, "int64", "BADC", 4),
    TagSpec("fixed_uint32", "input", 44, "uint32", "ABCD", 2),
    TagSpec("air_flow_sp", "holding", 0, "uint16", scale=0.1, unit="sccm", writable=True),
    TagSpec("o2_low_limit", "holding", 1, "float32", "ABCD", 2, unit="%", writable=True),
    TagSpec("sample_pump", "coil", 0, "bool", writable=True),
    TagSpec("cal_valve", "coil", 1, "bool", writable=True),
    TagSpec("o2_low_alarm", "discrete", 0, "bool"),
    TagSpec("analyser_fault", "discrete", 1, "bool"),
)

_STRUCT_CODES = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
# Function code -> datastore table, as pymodbus's SimRuntime maps them.
_FC_TABLE: dict[int, Table] = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input"}
_FC_TABLE.update(dict.fromkeys((3, 6, 16, 22, 23), "holding"))


def encode_value(data_type: str, value: int | float, byte_order: ByteOrder = "ABCD") -> list[int]:
    """Encode a number into registers in ``byte_order`` (16-bit types swap bytes for BADC/DCBA)."""
    packed = struct.pack(">" + _STRUCT_CODES[data_type], value)
    words = [packed[i : i + 2] for i in range(0, len(packed), 2)]
    if byte_order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    if byte_order in ("CDAB", "DCBA"):
        words.reverse()
    return [int.from_bytes(w, "big") for w in words]


def _encode_string(text: str, registers: int) -> list[int]:
    """ASCII, two characters per register, high byte first, NUL padded."""
    data = text.encode("ascii").ljust(2 * registers, b"\0")
    if len(data) > 2 * registers:
        raise ValueError(f"{text!r} does not fit in {registers} registers")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _float32(value: float) -> float:
    """The value a float32 register pair really carries."""
    return cast(float, struct.unpack(">f", struct.pack(">f", value))[0])


def _pack_bits(bits: Sequence[bool]) -> int:
    """Bits -> one datastore word, bit 0 = least significant (pymodbus's layout)."""
    return sum(1 << i for i, b in enumerate(bits) if b)


class _Unit:
    """One simulated analyser: process model, served registers, fault state."""

    def __init__(self, unit_id: int, model: CultureModel) -> None:
        self.unit_id = unit_id
        self.model = model
        self.serial = f"OGA-2000-SN{unit_id:04d}"
        self.holding = [DEFAULT_SETPOINT_RAW, *encode_value("float32", DEFAULT_O2_LOW_LIMIT)]
        self.coils = [True, False]
        self.discretes = [False, False]
        self.inputs = [0] * INPUT_REGISTER_COUNT
        self.fault: Literal["silent", "exception"] | None = None
        self.exception_code = ExcCodes.DEVICE_FAILURE
        self.history: deque[tuple[float, dict[str, EngValue]]] = deque(maxlen=HISTORY_LEN)
        self.values: dict[str, EngValue] = {}
        self.model.air_flow_setpoint = DEFAULT_SETPOINT_RAW / 10
        self.publish()

    def sim_device(self) -> SimDevice:
        """A fresh pymodbus device definition (non-shared blocks, bit addressing)."""
        return SimDevice(
            id=self.unit_id,
            simdata=(
                [SimData(0, values=list(self.coils), datatype=DataType.BITS)],
                [SimData(0, values=list(self.discretes), datatype=DataType.BITS)],
                [SimData(0, count=len(self.holding), datatype=DataType.REGISTERS)],
                [
                    SimData(0, count=23, datatype=DataType.REGISTERS),
                    SimData(30, count=SERIAL_REGISTERS, datatype=DataType.REGISTERS),
                    SimData(40, count=6, datatype=DataType.REGISTERS),
                ],
            ),
            action=self.action,
        )

    def publish(self) -> None:
        """Encode the model's latest state into the served tables and record it."""
        s = self.model.state
        o2, co2 = _float32(s.offgas_o2_pct), _float32(s.offgas_co2_pct)
        temp_raw = max(-32768, min(32767, round(s.gas_temp_c * 100)))
        flow_raw = max(0, min(65535, round(s.air_flow_sccm * 10)))
        total_raw = int(s.totalizer_l * 10) % 2**32  # wraps like a real counter
        uptime = int(s.elapsed_s)
        sp_raw = self.holding[0]
        ready = self.coils[0] and not self.coils[1]
        flow_alarm = abs(flow_raw - sp_raw) * 10 > sp_raw
        status = int(ready) | int(flow_alarm) << 1 | 1 << 15
        (limit,) = struct.unpack(">f", struct.pack(">HH", *self.holding[1:3]))
        self.discretes = [o2 < limit, self.fault == "exception"]

        regs = self.inputs
        regs[0:2] = encode_value("float32", o2, "ABCD")
        regs[2:4] = encode_value("float32", co2, "CDAB")
        regs[4:6] = encode_value("float32", o2, "BADC")
        regs[6:8] = encode_value("float32", co2, "DCBA")
        regs[8:9] = encode_value("int16", temp_raw)
        regs[9:10] = encode_value("uint16", flow_raw)
        regs[10:12] = encode_value("uint32", total_raw, "CDAB")
        regs[12:16] = encode_value("uint64", uptime, "ABCD")
        regs[16:20] = encode_value("float64", s.our, "ABCD")
        regs[20:22] = encode_value("int32", CAL_CONSTANT, "DCBA")
        regs[22:23] = encode_value("uint16", status)
        regs[30:38] = _encode_string(self.serial, SERIAL_REGISTERS)
        regs[40:44] = encode_value("int64", FIXED_INT64, "BADC")
        regs[44:46] = encode_value("uint32", FIXED_UINT32, "ABCD")

        self.values = {
            "O2": o2,
            "CO2": co2,
            "O2_badc": o2,
            "CO2_dcba": co2,
            "gas_temp": temp_raw / 100,
            "air_flow": flow_raw / 10,
            "totalizer": total_raw / 10,
            "uptime": uptime,
            "OUR": s.our,
            "cal_constant": CAL_CONSTANT,
            "status": status,
            "ready": ready,
            "flow_alarm": flow_alarm,
            "status_bit15": True,
            "serial": self.serial,
            "fixed_int64": FIXED_INT64,
            "fixed_uint32": FIXED_UINT32,
            "air_flow_sp": sp_raw / 10,
            "o2_low_limit": limit,
            "sample_pump": self.coils[0],
            "cal_valve": self.coils[1],
            "o2_low_alarm": self.discretes[0],
            "analyser_fault": self.discretes[1],
        }
        self.history.append((time.time(), dict(self.values)))

    def registers(self) -> dict[str, list[int]]:
        """Raw words served per tag (bool tags: ``[0]``/``[1]``)."""
        out: dict[str, list[int]] = {}
        for tag in REGISTER_MAP:
            if tag.table == "input":
                out[tag.name] = self.inputs[tag.address : tag.address + tag.length]
            elif tag.table == "holding":
                out[tag.name] = self.holding[tag.address : tag.address + tag.length]
            elif tag.table == "coil":
                out[tag.name] = [int(self.coils[tag.address])]
            else:
                out[tag.name] = [int(self.discretes[tag.address])]
        return out

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Called by pymodbus on every access: serve current values, apply writes, inject faults.

        ``registers`` is the live datastore block for this table (starting at
        ``start_address``, always 0 here); it is refreshed from our own copy
        on every access so the update task never has to reach into pymodbus.
        For coils/discretes pymodbus passes the *word* count, not the bit
        count, so only the start bit can be checked on reads.
        """
        del count  # bit reads pass a word count; register bounds pymodbus checks itself
        if self.fault == "silent":
            # Refuse so a write is not applied; the reply itself is dropped in
            # OffGasSimulator._trace_packet so the client just times out.
            return ExcCodes.DEVICE_FAILURE
        if self.fault == "exception":
            return self.exception_code
        table = _FC_TABLE.get(function_code)
        if table in ("coil", "discrete"):
            # Bit blocks: ``address`` is the bit number, ``start_address`` a word.
            offset = address - 16 * start_address
            bits = self.coils if table == "coil" else self.discretes
            width = len(set_values) if set_values is not None else 1
            if offset + width > len(bits):
                return ExcCodes.ILLEGAL_ADDRESS
            if set_values is not None:
                bits[offset : offset + width] = [bool(v) for v in set_values]
                self.publish()  # ready bit follows the pump/valve at once
            registers[0] = _pack_bits(bits)
        elif table == "holding":
            offset = address - start_address
            if set_values is not None:
                new = list(self.holding)
                new[offset : offset + len(set_values)] = [int(v) for v in set_values]
                if (err := self._check_holding(new)) is not None:
                    return err
                self.holding = new
                self.model.air_flow_setpoint = new[0] / 10
                self.publish()
            registers[: len(self.holding)] = self.holding
        elif table == "input":
            registers[: len(self.inputs)] = self.inputs
        return None

    @staticmethod
    def _check_holding(holding: list[int]) -> ExcCodes | None:
        """Validate a would-be holding table; a real MFC rejects out-of-range writes."""
        (limit,) = struct.unpack(">f", struct.pack(">HH", *holding[1:3]))
        lo, hi = O2_LIMIT_RANGE
        if holding[0] > SETPOINT_MAX_RAW or not (math.isfinite(limit) and lo <= limit <= hi):
            return ExcCodes.ILLEGAL_VALUE
        return None


async def _no_such_unit(
    _fc: int,
    _start: int,
    _address: int,
    _count: int,
    _registers: list[int],
    _values: list[int] | list[bool] | None,
) -> ExcCodes:
    """Answer for unit ids nobody simulates, as a Modbus TCP gateway would."""
    return ExcCodes.GATEWAY_NO_RESPONSE


def _catch_all_device() -> SimDevice:
    # Without a device 0 pymodbus raises KeyError for unknown unit ids and logs
    # a traceback per request; id 0 is its "every other unit" fallback.
    return SimDevice(
        id=0,
        simdata=[SimData(0, count=65536, datatype=DataType.REGISTERS)],
        action=_no_such_unit,
    )


class OffGasSimulator:
    """Off-gas analyser + MFC served over Modbus TCP, one analyser per unit id."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        unit_ids: Sequence[int] = (1,),
        time_scale: float = 1.0,
        seed: int = 1,
        update_interval: float = 0.1,
    ) -> None:
        """Configure; nothing is bound until :meth:`start`."""
        ids = list(unit_ids)
        if not ids or len(set(ids)) != len(ids) or not all(0 <= u <= 255 for u in ids):
            raise ValueError(f"unit_ids must be distinct values in 0..255, got {ids}")
        if time_scale < 0 or update_interval <= 0:
            raise ValueError("time_scale must be >= 0 and update_interval > 0")
        self.host = host
        self.time_scale = time_scale
        self.update_interval = update_interval
        self._requested_port = port
        self._port: int | None = None
        # Each unit gets its own seed so analysers differ in inoculum and noise.
        self._units = {u: _Unit(u, CultureModel(seed=seed * 1000 + u)) for u in ids}
        self._first = ids[0]
        #: (time.time(), values()) snapshots of the first unit; see history_of().
        self.history = self._units[self._first].history
        self._drop = False
        self._server: ModbusTcpServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_tick: float | None = None

    # ----------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Bind (the same port again after :meth:`stop`) and start the model task.

        The culture does not pause while stopped: the first update after a
        restart catches up on the wall time that passed, like a real process
        whose analyser only dropped off the network.
        """
        if self._server is not None:
            raise RuntimeError("simulator already started")
        devices = [unit.sim_device() for unit in self._units.values()]
        if 0 not in self._units:
            devices.append(_catch_all_device())
        port = self._port if self._port is not None else self._requested_port
        server = ModbusTcpServer(
            devices,
            address=(self.host, port),
            trace_packet=self._trace_packet,
            trace_connect=self._trace_connect,
        )
        await server.serve_forever(background=True)
        listener = cast(asyncio.Server, server.transport)
        # With port 0 and a host resolving to several addresses each socket
        # gets its own port; the first one is the one we report and reuse.
        self._port = int(listener.sockets[0].getsockname()[1])
        self._server = server
        if self._last_tick is None:
            self._last_tick = time.monotonic()
        self._task = asyncio.create_task(self._run_updates(), name="offgas-model")

    async def stop(self) -> None:
        """Close the listener and every client connection, stop the model task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            # shutdown() closes the listening socket and each active connection
            # (asyncio's Server.close() alone would leave connections open).
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    @property
    def port(self) -> int:
        """Port actually bound (the requested one before the first start)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def unit_ids(self) -> list[int]:
        """Simulated unit ids, in configuration order."""
        return list(self._units)

    # -------------------------------------------------------------- faults
    def set_fault(
        self,
        fault: FaultKind | None,
        exception_code: int = 4,
        *,
        unit_id: int | None = None,
    ) -> None:
        """Inject a fault (``None`` clears), for every unit or just ``unit_id``.

        ``"silent"``: requests are processed but never answered (writes are not
        applied). ``"exception"``: every request gets ``exception_code``.
        ``"drop"``: every connection is closed now, and new ones right after
        they are accepted; it is device-wide, so ``unit_id`` is not allowed.
        Setting a fault for all units replaces any previous fault.
        """
        if fault not in (None, "silent", "exception", "drop"):
            raise ValueError(f"unknown fault {fault!r}")
        code = ExcCodes(exception_code)
        if unit_id is not None and unit_id not in self._units:
            raise ValueError(f"unit {unit_id} is not simulated")
        if fault == "drop" and unit_id is not None:
            raise ValueError("'drop' closes the TCP connection, which all units share")
        units = [self._units[unit_id]] if unit_id is not None else list(self._units.values())
        if unit_id is None:
            self._drop = fault == "drop"
        unit_fault: Literal["silent", "exception"] | None = (
            fault if fault == "silent" or fault == "exception" else None
        )
        for unit in units:
            unit.fault = unit_fault
            unit.exception_code = code
            unit.publish()  # analyser_fault follows the fault at once
        if self._drop:
            self._close_connections()

    def _close_connections(self) -> None:
        if self._server is None:
            return
        for connection in list(self._server.active_connections.values()):
            connection.close()

    def _trace_connect(self, connected: bool) -> None:
        # Called from each new connection's connection_made, after it is
        # registered, so closing everything here is "accept, then close".
        if connected and self._drop:
            self._close_connections()

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        # "silent" is done here rather than by an action that never returns:
        # pymodbus keeps one pending request per connection and would answer
        # the stale request later (wrong transaction id) once the fault clears.
        # MBAP header byte 6 is the unit id.
        if sending and len(data) > 6:
            unit = self._units.get(data[6])
            if unit is not None and unit.fault == "silent":
                return b""  # transport.write(b"") sends nothing
        return data

    # ---------------------------------------------------------------- data
    def _unit(self, unit_id: int | None) -> _Unit:
        try:
            return self._units[self._first if unit_id is None else unit_id]
        except KeyError:
            raise ValueError(f"unit {unit_id} is not simulated") from None

    def values(self, unit_id: int | None = None) -> dict[str, EngValue]:
        """Engineering values currently served (first unit by default)."""
        return dict(self._unit(unit_id).values)

    def registers(self, unit_id: int | None = None) -> dict[str, list[int]]:
        """Raw registers currently served, per tag name."""
        return self._unit(unit_id).registers()

    def history_of(self, unit_id: int) -> deque[tuple[float, dict[str, EngValue]]]:
        """Snapshot history of one unit (``history`` is the first unit's)."""
        return self._unit(unit_id).history

    def tick(self, wall_seconds: float | None = None) -> None:
        """Advance every unit's model now (by ``wall_seconds`` x time_scale if given)."""
        now = time.monotonic()
        if wall_seconds is None:
            last = self._last_tick if self._last_tick is not None else now
            wall_seconds = now - last
        self._last_tick = now
        for unit in self._units.values():
            unit.model.step(max(0.0, wall_seconds) * self.time_scale)
            unit.publish()

    async def _run_updates(self) -> None:
        while True:
            await asyncio.sleep(self.update_interval)
            try:
                self.tick()
            except Exception:  # keep serving even if one update misbehaves
                log.exception("off-gas model update failed")


# ---------------------------------------------------------------- CLI runner
_HELP = "commands: fault silent | fault exception [code] | fault drop | fault off | values | help"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def unit_id(text: str) -> int:
        value = int(text)
        if not 0 <= value <= 255:
            raise argparse.ArgumentTypeError("unit id must be 0..255")
        return value

    parser = argparse.ArgumentParser(
        prog="gateway simulate offgas",
        description="Modbus TCP off-gas analyser + MFC simulator. " + _HELP + " (on stdin)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5020, help="0 picks a free port")
    parser.add_argument(
        "--unit-id", type=unit_id, action="append", dest="unit_ids", help="repeatable; default 1"
    )
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="simulated seconds per wall second"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--update-interval", type=float, default=0.1, help="wall seconds")
    return parser.parse_args(argv)


def _handle_command(sim: OffGasSimulator, line: str) -> None:
    """Run one stdin command, answering on stdout."""
    words = line.split()
    if not words:
        return
    try:
        if words[0] == "values" and len(words) == 1:
            for unit in sim.unit_ids:
                print(json.dumps({"unit": unit, **sim.values(unit)}), flush=True)
        elif words[0] == "fault" and len(words) >= 2:
            kind = words[1]
            if kind == "off" and len(words) == 2:
                sim.set_fault(None)
            elif kind == "exception" and len(words) <= 3:
                sim.set_fault("exception", int(words[2]) if len(words) == 3 else 4)
            elif kind in ("silent", "drop") and len(words) == 2:
                sim.set_fault(cast(FaultKind, kind))
            else:
                raise ValueError(f"bad fault command {line.strip()!r}")
            print(f"ok: {line.strip()}", flush=True)
        else:
            print(_HELP, flush=True)
    except ValueError as exc:
        print(f"error: {exc}; {_HELP}", flush=True)


async def _serve(args: argparse.Namespace) -> int:
    sim = OffGasSimulator(
        host=args.host,
        port=args.port,
        unit_ids=args.unit_ids or [1],
        time_scale=args.time_scale,
        seed=args.seed,
        update_interval=args.update_interval,
    )
    try:
        await sim.start()
    except (OSError, RuntimeError) as exc:
        print(f"offgas simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"offgas simulator listening on {sim.host}:{sim.port} units={sim.unit_ids}", flush=True)

    return await run_until_signal(lambda line: _handle_command(sim, line), sim.stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the process exit code."""
    return console.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
