"""Configuration models of the Modbus driver: a device and its tags.

A device is one unit id, reached over Modbus TCP (``host``/``port``) or on an
RTU serial bus (``serial_port`` and the line settings). Keys of the other
transport are refused with an error naming the key, so a half-converted
config never loads.
"""

from __future__ import annotations

import codecs
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from drivers.modbus.decode import ByteOrder, DataType, register_count
from drivers.modbus.plan import Table
from gateway.config import DeviceConfig, TagConfig

_BIT_TABLES = ("coil", "discrete")
Transport = Literal["tcp", "rtu"]
Parity = Literal["N", "E", "O"]
# Keys that only mean something on a serial line / on a TCP connection.
RTU_KEYS = ("serial_port", "baudrate", "bytesize", "parity", "stopbits")
TCP_KEYS = ("host", "port")


def _conditional_schema(schema: dict[str, Any]) -> None:
    """JSON Schema: which keys are required or refused depends on ``transport``."""
    schema["allOf"] = [
        {
            "if": {"properties": {"transport": {"const": "rtu"}}, "required": ["transport"]},
            "then": {
                "required": ["serial_port"],
                "not": {"anyOf": [{"required": [k]} for k in TCP_KEYS]},
            },
            "else": {
                "required": ["host"],
                "not": {"anyOf": [{"required": [k]} for k in RTU_KEYS]},
            },
        }
    ]


class ModbusTag(TagConfig):
    """One value read from a Modbus table."""

    table: Table = Field("holding", description="holding | input | coil | discrete")
    address: int = Field(ge=0, le=65535, description="0-based address (not 40001-style)")
    data_type: DataType = Field(
        "uint16", description="int16..uint64, float32, float64, bit, string; bool for coils"
    )
    byte_order: ByteOrder = Field("ABCD", description="ABCD (big-endian), CDAB, BADC, DCBA")
    bit: int | None = Field(None, ge=0, le=15, description="Bit index for data_type 'bit'")
    length: int | None = Field(None, ge=1, le=125, description="Registers of a 'string'")
    encoding: str = Field("ascii", description="Text encoding of a 'string'")

    @model_validator(mode="before")
    @classmethod
    def _bool_default(cls, data: Any) -> Any:
        # Coils and discrete inputs hold bits: bool is the only sensible default.
        if isinstance(data, dict) and data.get("table") in _BIT_TABLES:
            data.setdefault("data_type", "bool")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModbusTag:
        if self.table in _BIT_TABLES and self.data_type != "bool":
            raise ValueError(f"table {self.table!r} holds bits: data_type must be 'bool'")
        if self.table not in _BIT_TABLES and self.data_type == "bool":
            raise ValueError(
                "data_type 'bool' is for coil/discrete tables; use 'bit' for a bit "
                "inside a register"
            )
        if self.data_type == "bit" and self.bit is None:
            raise ValueError("data_type 'bit' needs `bit` (0 = least significant)")
        if self.data_type != "bit" and self.bit is not None:
            raise ValueError("`bit` only applies to data_type 'bit'")
        if self.data_type == "string" and self.length is None:
            raise ValueError("data_type 'string' needs `length` (in registers)")
        if self.data_type != "string" and self.length is not None:
            raise ValueError("`length` only applies to data_type 'string'")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown text encoding {self.encoding!r}") from None
        if self.address + self.count > 65536:
            raise ValueError(f"address {self.address} + {self.count} register(s) passes 65535")
        return self

    @property
    def count(self) -> int:
        """Registers (or bits) the tag occupies."""
        if self.data_type == "bool":
            return 1
        return register_count(self.data_type, self.length)


class ModbusDevice(DeviceConfig):
    """One Modbus unit: over TCP (one connection), or on an RTU serial bus.

    Several RTU devices with the same ``serial_port`` are units on one bus and
    share one open port (``drivers/modbus/bus.py``).
    """

    model_config = ConfigDict(json_schema_extra=_conditional_schema)

    driver: Literal["modbus"]
    transport: Transport = Field(
        "tcp", description="tcp: Modbus TCP (host, port); rtu: RTU on a serial line (serial_port)"
    )
    host: str | None = Field(
        None,
        min_length=1,
        validate_default=True,
        description="Device host name or IP address (transport tcp; required there)",
    )
    port: int = Field(502, ge=1, le=65535, description="TCP port (transport tcp)")
    serial_port: str | None = Field(
        None,
        min_length=1,
        validate_default=True,
        description="Serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/... "
        "(transport rtu; required there). Devices naming the same port share one bus",
    )
    baudrate: int = Field(19200, ge=300, le=4_000_000, description="Bits per second (rtu)")
    bytesize: int = Field(8, ge=8, le=8, description="Data bits (rtu): always 8 in RTU mode")
    parity: Parity = Field("E", description="N, E or O (rtu); E is the Modbus default")
    stopbits: int = Field(
        1,
        ge=1,
        le=2,
        description="Stop bits (rtu); the spec wants 2 with parity N (11-bit characters)",
    )
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (slave) id; 1-247 on an RTU bus")
    timeout: float = Field(1.0, gt=0, le=60, description="Seconds to wait for each answer")
    fail_after: int = Field(
        3, ge=1, description="Consecutive unanswered requests before reconnecting"
    )
    max_registers: int = Field(125, ge=1, le=125, description="Registers per read request")
    max_gap: int = Field(
        0, ge=0, le=100, description="Unused registers a read may span to join two tags"
    )
    tags: list[ModbusTag] = Field(min_length=1)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None, info: ValidationInfo) -> str | None:
        transport = info.data.get("transport")
        if transport == "tcp" and value is None:
            raise PydanticCustomError("missing", "Field required")
        if transport == "rtu" and value is not None:
            raise ValueError(
                "does not apply to transport 'rtu': the units are reached through "
                "`serial_port`; remove `host`"
            )
        return value

    @field_validator("port")
    @classmethod
    def _port(cls, value: int, info: ValidationInfo) -> int:
        # Runs only when `port` is given (no validate_default).
        if info.data.get("transport") == "rtu":
            raise ValueError(
                "does not apply to transport 'rtu' (a TCP port); name the serial "
                "device with `serial_port` instead"
            )
        return value

    @field_validator("serial_port")
    @classmethod
    def _serial_port(cls, value: str | None, info: ValidationInfo) -> str | None:
        transport = info.data.get("transport")
        if transport == "rtu" and value is None:
            raise ValueError(
                "required key is missing: transport 'rtu' needs the serial device, "
                "e.g. /dev/ttyUSB0 or /dev/serial/by-id/..."
            )
        if transport == "tcp" and value is not None:
            raise ValueError("only applies to transport 'rtu'; add transport = \"rtu\"")
        return value

    @field_validator("baudrate", "bytesize", "parity", "stopbits")
    @classmethod
    def _serial_setting(cls, value: Any, info: ValidationInfo) -> Any:
        # Runs only when the key is given (no validate_default).
        if info.data.get("transport") == "tcp":
            raise ValueError("only applies to transport 'rtu'; add transport = \"rtu\"")
        return value

    @field_validator("unit_id")
    @classmethod
    def _unit_id(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("transport") == "rtu" and not 1 <= value <= 247:
            raise ValueError(
                "must be 1-247 on an RTU bus (0 is broadcast, which no unit answers; "
                "248-255 are reserved)"
            )
        return value

    @model_validator(mode="after")
    def _fits_one_read(self) -> ModbusDevice:
        for i, t in enumerate(self.tags):
            if t.table not in _BIT_TABLES and t.count > self.max_registers:
                raise ValueError(
                    f"tags[{i}] ({t.name}) spans {t.count} registers, more than "
                    f"max_registers = {self.max_registers} (one read)"
                )
        return self
