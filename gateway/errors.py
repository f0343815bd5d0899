"""Exception types. Each says what failed and where (file, field, device, tag)."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the file and the field."""


class OutboxError(GatewayError):
    """The durable outbox cannot be opened or written."""


class DriverError(GatewayError):
    """A device cannot be reached or answered badly; the supervisor retries."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"device {device}: {message}")
        self.device = device
        self.reason = message
