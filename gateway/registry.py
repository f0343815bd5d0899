"""Driver registry: built-ins by name, third-party drivers by entry point.

Drivers are imported only when a configured device uses them, so a gateway
with only Modbus devices never loads the OPC UA or SiLA 2 stacks.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from gateway.driver import Driver
from gateway.errors import ConfigError

ENTRY_POINT_GROUP = "gateway.drivers"

BUILTIN: dict[str, str] = {
    "modbus": "drivers.modbus:ModbusDriver",
    "serial": "drivers.serial:SerialDriver",
    "opcua": "drivers.opcua:OpcUaDriver",
    "sila2": "drivers.sila2:Sila2Driver",
}

_loaded: dict[str, type[Driver[Any]]] = {}


def known_names() -> list[str]:
    names = set(BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def driver_class(name: str) -> type[Driver[Any]]:
    """The driver class registered as ``name``; ConfigError if there is none."""
    if name in _loaded:
        return _loaded[name]
    target = BUILTIN.get(name)
    if target is not None:
        ep = EntryPoint(name, target, ENTRY_POINT_GROUP)
    else:
        eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not eps:
            raise ConfigError(f"unknown driver {name!r}; known drivers: {', '.join(known_names())}")
        ep = eps[0]
    target = ep.value
    try:
        cls = ep.load()
    except Exception as exc:  # a plugin may fail on import in any way
        raise ConfigError(
            f"driver {name!r} ({target}) cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise ConfigError(f"driver {name!r} ({target}) is not a gateway.driver.Driver subclass")
    _loaded[name] = cls
    return cls


def register(name: str, cls: type[Driver[Any]]) -> None:
    """Register a driver class in-process (tests, embedding)."""
    _loaded[name] = cls


def all_driver_classes() -> list[type[Driver[Any]]]:
    return [driver_class(n) for n in known_names()]
