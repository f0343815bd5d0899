"""One task per device: connect, acquire, and on failure record why and retry.

A failing device never stalls another device or the publisher: each runs in
its own task, and everything a driver awaits is bounded by its own timeouts.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import structlog

from gateway.config import DeviceConfig
from gateway.driver import Driver
from gateway.errors import DriverError
from gateway.record import BAD, EV_OFFLINE, EV_ONLINE, EV_START, EV_STOP
from gateway.stream import DeviceStream


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [base, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return rng.uniform(base, max(base, ceiling))


class DeviceSupervisor:
    """Runs one device's driver for the life of the gateway."""

    def __init__(
        self,
        device: DeviceConfig,
        driver_cls: type[Driver[Any]],
        stream: DeviceStream,
        *,
        connect_timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        clean_restart: bool = True,
        state_dir: Path | None = None,
    ) -> None:
        self.device = device
        self.driver_cls = driver_cls
        self.stream = stream
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.clean_restart = clean_restart
        self.state_dir = state_dir
        self.online = False
        self.failures = 0
        self.last_error: str | None = None
        self.stop_reason = "shutdown"  # the daemon sets "config reload" before cancelling
        self.log = structlog.get_logger("gateway.supervisor").bind(device=device.id)
        self._rng = random.Random()

    async def run(self) -> None:
        seq, _ = self.stream.outbox.chain.head(self.device.id)
        how = "clean" if self.clean_restart else "unclean (crash, kill or power loss)"
        await self.stream.event(
            EV_START,
            f"acquisition started; previous shutdown {how}" if seq else "acquisition started",
            info={"previous_seq": seq, "clean_shutdown": self.clean_restart},
        )
        attempt = 0
        try:
            while True:
                driver: Driver[Any] | None = None
                try:
                    driver = self.driver_cls(self.device)
                    driver.state_dir = self.state_dir
                    try:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for can
                        # swallow a cancellation that races its completion.
                        async with asyncio.timeout(self.connect_timeout):
                            await driver.connect()
                    except TimeoutError as exc:
                        raise DriverError(
                            self.device.id, f"no connection within {self.connect_timeout:g} s"
                        ) from exc
                    if not self.online:
                        self.online = True
                        self.log.info("device online")
                        await self.stream.event(EV_ONLINE, "device connected")
                    attempt = 0
                    await driver.run(self.stream.emit)
                    raise DriverError(self.device.id, "driver stopped without an error")
                except (DriverError, TimeoutError, OSError) as exc:
                    await self._failed(_reason(exc))
                except Exception as exc:  # a driver bug must not kill the gateway
                    self.log.exception("driver crashed")
                    await self._failed(f"driver error: {type(exc).__name__}: {exc}")
                finally:
                    if driver is not None:
                        await _close_quietly(driver)
                delay = backoff_delay(
                    attempt, base=self.backoff_base, cap=self.backoff_cap, rng=self._rng
                )
                attempt += 1
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            await self._stopped()
            raise

    async def _failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        if self.online or self.failures == 1:
            self.log.warning("device offline", reason=reason)
            await self.stream.event(EV_OFFLINE, reason, q=BAD)
        self.online = False
        await self.stream.all_bad(reason)

    async def _stopped(self) -> None:
        # Shielded: the stop event must reach the outbox even though we are cancelled.
        try:
            why = f"acquisition stopped ({self.stop_reason})"
            await asyncio.shield(self.stream.event(EV_STOP, why))
        except Exception:
            self.log.exception("could not record the stop event")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DriverError):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timed out while acquiring"
    return f"{type(exc).__name__}: {exc}"


async def _close_quietly(driver: Driver[Any]) -> None:
    try:
        async with asyncio.timeout(5.0):
            await driver.close()
    except Exception:
        structlog.get_logger("gateway.supervisor").exception(
            "driver close failed", device=driver.config.id
        )
