"""Modbus TCP driver: see docs/drivers/modbus.md."""

from drivers.modbus.driver import ModbusDriver

__all__ = ["ModbusDriver"]
