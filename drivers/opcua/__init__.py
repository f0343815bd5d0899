"""OPC UA client driver (asyncua): see docs/drivers/opcua.md."""

from drivers.opcua.driver import OpcUaDriver

__all__ = ["OpcUaDriver"]
