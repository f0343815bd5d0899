"""Equipment connectivity gateway: devices -> hash-chained records -> MQTT."""

__version__ = "0.1.0"
