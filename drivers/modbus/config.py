"""Configuration models of the Modbus driver: a device and its tags."""

from __future__ import annotations

import codecs
from typing import Any, Literal

from pydantic import Field, model_validator

from drivers.modbus.decode import ByteOrder, DataType, register_count
from drivers.modbus.plan import Table
from gateway.config import DeviceConfig, TagConfig

_BIT_TABLES = ("coil", "discrete")


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
    """A Modbus TCP device (one unit id on one connection)."""

    driver: Literal["modbus"]
    host: str = Field(description="Device host name or IP address")
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (slave) id")
    timeout: float = Field(1.0, gt=0, le=60, description="Seconds to wait for each answer")
    fail_after: int = Field(
        3, ge=1, description="Consecutive unanswered requests before reconnecting"
    )
    max_registers: int = Field(125, ge=1, le=125, description="Registers per read request")
    max_gap: int = Field(
        0, ge=0, le=100, description="Unused registers a read may span to join two tags"
    )
    tags: list[ModbusTag] = Field(min_length=1)

    @model_validator(mode="after")
    def _fits_one_read(self) -> ModbusDevice:
        for i, t in enumerate(self.tags):
            if t.table not in _BIT_TABLES and t.count > self.max_registers:
                raise ValueError(
                    f"tags[{i}] ({t.name}) spans {t.count} registers, more than "
                    f"max_registers = {self.max_registers} (one read)"
                )
        return self
