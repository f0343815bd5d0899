"""Serial driver (RS-232/RS-485/USB serial line protocols): see docs/drivers/serial.md."""

from drivers.serial.driver import SerialDriver

__all__ = ["SerialDriver"]
