"""The running gateway: outbox, publisher and one supervisor per device.

SIGTERM/SIGINT: stop the drivers (each stream gets a ``$stop`` event), commit
everything, publish the backlog for at most ``shutdown_timeout`` seconds, mark
the outbox cleanly closed, exit 0. What is not yet published stays in the
outbox for the next start.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import structlog

from gateway.config import Config
from gateway.driver import Driver
from gateway.errors import OutboxError
from gateway.mqtt import tls_context
from gateway.outbox import Outbox
from gateway.publisher import Publisher
from gateway.registry import driver_class
from gateway.stream import DeviceStream
from gateway.supervisor import DeviceSupervisor

log = structlog.get_logger("gateway")


class Gateway:
    """Everything one config runs; ``await Gateway(cfg).run()`` until a signal."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.outbox: Outbox | None = None
        self.publisher: Publisher | None = None
        self.supervisors: dict[str, DeviceSupervisor] = {}
        self.streams: dict[str, DeviceStream] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cfg = self.cfg
        # Refuse to start on unreadable secrets or certificates rather than
        # acquire into an outbox that could never be published.
        cfg.broker.secret_password()
        tls_context(cfg.broker)
        drivers: dict[str, type[Driver[Any]]] = {
            d.id: driver_class(d.driver) for d in cfg.devices if d.enabled
        }
        self.outbox = outbox = await Outbox.open(
            cfg.outbox_path,
            gateway_id=cfg.gateway.id,
            max_bytes=int(cfg.outbox.max_bytes),
            policy=cfg.outbox.policy,
            durability=cfg.outbox.durability,
            max_pending=cfg.outbox.max_pending,
        )
        clean = outbox.clean_shutdown
        log.info(
            "gateway starting",
            gateway=cfg.gateway.id,
            devices=len(drivers),
            outbox=str(cfg.outbox_path),
            backlog=outbox.messages,
            previous_shutdown="clean" if clean else "unclean",
        )
        self.publisher = publisher = Publisher(cfg.broker, cfg.gateway.id, outbox)
        pub_task = asyncio.create_task(publisher.run(), name="publisher")
        for dev in cfg.devices:
            if not dev.enabled:
                continue
            stream = DeviceStream(cfg.gateway.id, dev, outbox)
            sup = DeviceSupervisor(
                dev, drivers[dev.id], stream, clean_restart=clean, state_dir=cfg.gateway.state_dir
            )
            self.streams[dev.id] = stream
            self.supervisors[dev.id] = sup
            self._tasks.append(asyncio.create_task(sup.run(), name=f"device:{dev.id}"))
        self.ready.set()
        stop = asyncio.ensure_future(self._stop.wait())
        failed = asyncio.ensure_future(outbox.failed.wait())
        try:
            await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failed.cancel()
            await self._shutdown(pub_task)
        if outbox.failure is not None:
            # Acquisition cannot go on without a place to commit records: exit
            # non-zero so systemd restarts us (the chains continue from disk).
            raise OutboxError(f"{cfg.outbox_path}: write failed: {outbox.failure}")

    async def _shutdown(self, pub_task: asyncio.Task[None]) -> None:
        assert self.outbox is not None and self.publisher is not None
        log.info("gateway stopping")
        # Cancel until they end (a library may swallow one cancellation), but
        # bounded: a driver stuck in a blocking call must not hold the shutdown.
        stuck = set(self._tasks)
        deadline = asyncio.get_running_loop().time() + 10
        while stuck and asyncio.get_running_loop().time() < deadline:
            for t in stuck:
                t.cancel()
            _, stuck = await asyncio.wait(stuck, timeout=0.5)
        for t in stuck:
            log.error("device task did not stop within 10 s", task=t.get_name())
        drained = await self.publisher.drain(self.cfg.gateway.shutdown_timeout)
        await self.publisher.stop()
        pub_task.cancel()
        await asyncio.gather(pub_task, return_exceptions=True)
        left = self.outbox.messages
        await self.outbox.close(clean=True)
        log.info("gateway stopped", backlog_published=drained, messages_kept=left)


async def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    gw = Gateway(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gw.request_stop)
    try:
        await gw.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
