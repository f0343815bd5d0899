"""SiLA 2 driver (``driver = "sila2"``): feature properties as tags; see docs/drivers/sila2.md."""

from drivers.sila2.driver import Sila2Driver

__all__ = ["Sila2Driver"]
