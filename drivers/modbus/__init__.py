"""Modbus driver, TCP and RTU: see docs/drivers/modbus.md."""

from drivers.modbus.driver import ModbusDriver

__all__ = ["ModbusDriver"]
