"""The running gateway: outbox, publisher and one supervisor per device.

SIGTERM/SIGINT: stop the drivers (each stream gets a ``$stop`` event), commit
everything, publish the backlog for at most ``shutdown_timeout`` seconds, mark
the outbox cleanly closed, exit 0. What is not yet published stays in the
outbox for the next start.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import structlog

from gateway.checkpoint import Checkpointer
from gateway.config import Config, DeviceConfig, config_from_bytes
from gateway.driver import Driver
from gateway.errors import ConfigError, GatewayError, OutboxError
from gateway.health import Operations
from gateway.outbox import Outbox
from gateway.publisher import Publisher
from gateway.record import BAD, EV_START, EV_STOP
from gateway.registry import driver_class
from gateway.reload import (
    EV_RELOAD,
    GATEWAY_STREAM,
    HupListener,
    Who,
    active_devices,
    audit_record,
    config_info,
    diff_configs,
    remove_pid_file,
    sighup_blocked,
    take_request,
    user_name,
    write_pid_file,
    write_result,
)
from gateway.secrets import preflight
from gateway.signing import load_private
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
        self._tasks: dict[str, asyncio.Task[None]] = {}  # device id -> its supervisor's task
        self._reload_lock = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[None]] = set()
        self.reloads = 0  # applied
        self.reloads_refused = 0
        self.publisher_task: asyncio.Task[None] | None = None
        self.ops: Operations | None = None  # health endpoint + systemd notify/watchdog
        self.health_port: int | None = None  # the port actually bound (config may say 0)
        self.checkpointer: Checkpointer | None = None  # [checkpoints] enabled
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cfg = self.cfg
        # Refuse to start on unreadable secrets or certificates rather than
        # acquire into an outbox that could never be published.
        preflight(cfg)
        self.checkpointer = await asyncio.to_thread(_checkpointer, cfg)
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
            commit_window=cfg.outbox.commit_window,
        )
        if self.checkpointer is not None:
            outbox.after_seal = self.checkpointer.after_seal
        clean = outbox.clean_shutdown
        log.info(
            "gateway starting",
            gateway=cfg.gateway.id,
            devices=len(drivers),
            outbox=str(cfg.outbox_path),
            backlog=outbox.messages,
            previous_shutdown="clean" if clean else "unclean",
        )
        publisher: Publisher
        if cfg.broker.output == "sparkplug":
            from gateway.sparkplug.publisher import SparkplugPublisher  # protobuf only if used

            self.publisher = publisher = SparkplugPublisher(cfg, outbox)
        else:
            self.publisher = publisher = Publisher(cfg.broker, cfg.gateway.id, outbox)
        if self.checkpointer is not None:
            publisher.key_status = self.checkpointer.status_payload()
            self._checkpoint_task = asyncio.create_task(
                self.checkpointer.run(outbox.chain.head, outbox.submit), name="checkpoints"
            )
        self.publisher_task = pub_task = asyncio.create_task(publisher.run(), name="publisher")
        # The audit trail starts with the config this process runs.
        head, _ = outbox.chain.head(GATEWAY_STREAM)
        await self._audit(
            EV_START,
            f"gateway started with config {cfg.source_sha256 or '(no file)'}",
            {
                **config_info(cfg),
                "previous_seq": head,
                "clean_shutdown": clean,
                "pid": os.getpid(),
                "user": user_name(os.getuid()),
            },
        )
        for dev in active_devices(cfg).values():
            self._start_device(dev, drivers[dev.id], clean=clean)
        # READY=1 only now: the outbox is open and every supervisor started.
        self.ops = Operations(self)
        await self.ops.start()
        self.health_port = self.ops.port
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

    # -- devices, reload and the audit trail ------------------------------------------------

    def _start_device(
        self, dev: DeviceConfig, driver_cls: type[Driver[Any]], *, clean: bool
    ) -> None:
        assert self.outbox is not None
        stream = DeviceStream(self.cfg.gateway.id, dev, self.outbox)
        sup = DeviceSupervisor(
            dev, driver_cls, stream, clean_restart=clean, state_dir=self.cfg.gateway.state_dir
        )
        self.streams[dev.id] = stream
        self.supervisors[dev.id] = sup
        self._tasks[dev.id] = asyncio.create_task(sup.run(), name=f"device:{dev.id}")

    async def _stop_device(self, dev_id: str, reason: str) -> None:
        """Stop one device's supervisor (its stream gets ``$stop`` with ``reason``)."""
        sup = self.supervisors.pop(dev_id)
        self.streams.pop(dev_id, None)
        sup.stop_reason = reason
        await _cancel_bounded({self._tasks.pop(dev_id)})

    async def _audit(self, tag: str, val: str, info: dict[str, Any], *, bad: bool = False) -> None:
        """A chained event on the gateway stream; a failure to record it is logged, not raised."""
        assert self.outbox is not None
        rec = audit_record(self.cfg.gateway.id, tag, val, info, q=BAD if bad else "good")
        try:
            await self.outbox.submit(GATEWAY_STREAM, [rec])
        except GatewayError as exc:
            log.error("could not record the audit event", event=tag, error=str(exc))

    def on_sighup(self, uid: int | None, pid: int | None) -> None:
        """SIGHUP from (uid, pid): reload, with ``gateway reload``'s request if it left one."""
        task = asyncio.create_task(self._reload_for_signal(uid, pid), name="reload")
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def _reload_for_signal(self, uid: int | None, pid: int | None) -> None:
        state_dir = self.cfg.gateway.state_dir
        request = None if pid is None else await asyncio.to_thread(take_request, state_dir, pid)
        ok, message = await self.reload(Who(uid, pid, request))
        if request is not None and pid is not None:
            try:
                await asyncio.to_thread(write_result, state_dir, pid, ok, message)
            except OSError as exc:
                log.warning("could not answer gateway reload", pid=pid, error=str(exc))

    async def reload(self, who: Who | None = None) -> tuple[bool, str]:
        """Re-read and fully validate the config file, then restart only what changed.

        Returns (applied, message). A refused reload changes nothing; both
        outcomes are chained ``$reload`` events on the gateway stream.
        """
        who = who or Who()
        await self.ready.wait()
        async with self._reload_lock:
            if self._stop.is_set():
                return False, "the gateway is stopping"
            source = self.cfg.source
            if source is None:
                return False, "the running config was not read from a file"
            try:
                _, new = await asyncio.to_thread(_read_and_validate, source)
            except _Refused as exc:
                return await self._refuse(exc.sha, exc.message, who)
            diff = diff_configs(self.cfg, new)
            if diff.restart_needed:
                return await self._refuse(
                    new.source_sha256 or "",
                    f"{source}: {', '.join(diff.restart_needed)} changed: these settings need a "
                    "restart (systemctl restart gateway); nothing was applied",
                    who,
                )
            old = self.cfg
            a, b = active_devices(old), active_devices(new)
            await asyncio.gather(
                *(self._stop_device(i, "config reload") for i in (*diff.removed, *diff.changed))
            )
            self.cfg = new
            for i in (*diff.changed, *diff.added):
                self._start_device(b[i], driver_class(b[i].driver), clean=True)
            self.reloads += 1
            message = f"config reloaded: {diff.describe()}"
            log.info(
                "config reloaded",
                config=str(source),
                sha256=new.source_sha256,
                added=diff.added,
                removed=diff.removed,
                changed=diff.changed,
                settings=diff.sections,
                by=who.describe(),
            )
            await self._audit(
                EV_RELOAD,
                f"{message} (by {who.describe()})",
                {
                    **config_info(new),
                    "previous_sha256": old.source_sha256 or "",
                    "added": diff.added,
                    "removed": diff.removed,
                    "changed": diff.changed,
                    "settings": diff.sections,
                    "unchanged": sorted(a.keys() & b.keys() - set(diff.changed)),
                    **who.info(),
                },
            )
            return True, message

    async def _refuse(self, sha: str, message: str, who: Who) -> tuple[bool, str]:
        self.reloads_refused += 1
        log.error(
            "config reload refused; the running config stays", error=message, by=who.describe()
        )
        await self._audit(
            EV_RELOAD,
            f"config reload refused (by {who.describe()}): {message}",
            {
                "config_file": str(self.cfg.source or ""),
                "config_sha256": sha,
                "running_sha256": self.cfg.source_sha256 or "",
                "error": message,
                **who.info(),
            },
            bad=True,
        )
        return False, f"config reload refused: {message}"

    async def _shutdown(self, pub_task: asyncio.Task[None]) -> None:
        assert self.outbox is not None and self.publisher is not None
        log.info("gateway stopping")
        if self.ops is not None:
            self.ops.stopping()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()  # the $stop records still get their checkpoints
        # A reload under way finishes first (bounded by its own stops); later
        # ones see the stop flag and do nothing.
        async with self._reload_lock:
            for t in self._reload_tasks:
                t.cancel()
            await _cancel_bounded(set(self._tasks.values()))
        await self._audit(EV_STOP, "gateway stopped (shutdown)", config_info(self.cfg))
        drained = await self.publisher.drain(self.cfg.gateway.shutdown_timeout)
        await self.publisher.stop()
        pub_task.cancel()
        await asyncio.gather(pub_task, return_exceptions=True)
        left = self.outbox.messages
        await self.outbox.close(clean=True)
        if self.ops is not None:
            await self.ops.stop()
        log.info("gateway stopped", backlog_published=drained, messages_kept=left)


def _checkpointer(cfg: Config) -> Checkpointer | None:
    """The signer of ``[checkpoints]``, or None when disabled; ConfigError without a key."""
    c = cfg.checkpoints
    if not c.enabled:
        return None
    path = cfg.key_path
    if not path.exists():
        raise ConfigError(
            f"checkpoints.key_file: {path} does not exist; create it with "
            f"`gateway keygen -c {cfg.source or 'CONFIG'}`"
        )
    signer = load_private(path)
    log.info(
        "checkpoints enabled",
        key=f"{signer.name}+{signer.key_id.hex()}",
        fingerprint=signer.verifier.fingerprint,
        every_records=c.every_records,
        every_seconds=c.every_seconds,
    )
    return Checkpointer(
        cfg.gateway.id, signer, every_records=c.every_records, every_seconds=c.every_seconds
    )


async def _cancel_bounded(tasks: set[asyncio.Task[None]]) -> None:
    # Cancel until they end (a library may swallow one cancellation), but
    # bounded: a driver stuck in a blocking call must not hold the shutdown.
    stuck = tasks
    deadline = asyncio.get_running_loop().time() + 10
    while stuck and asyncio.get_running_loop().time() < deadline:
        for t in stuck:
            t.cancel()
        _, stuck = await asyncio.wait(stuck, timeout=0.5)
    for t in stuck:
        log.error("device task did not stop within 10 s", task=t.get_name())


def _read_and_validate(path: Path) -> tuple[str, Config]:
    """(SHA-256 of the bytes, the validated config) or ConfigError; blocking."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _Refused("", f"{path}: cannot read: {exc.strerror or exc}") from None
    sha = hashlib.sha256(raw).hexdigest()
    try:
        cfg = config_from_bytes(raw, path, os.environ)
        preflight(cfg)
    except ConfigError as exc:
        raise _Refused(sha, str(exc)) from None
    return sha, cfg


class _Refused(Exception):
    def __init__(self, sha: str, message: str) -> None:
        super().__init__(message)
        self.sha = sha
        self.message = message


async def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT, reload on SIGHUP; returns the process exit code."""
    gw = Gateway(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gw.request_stop)
    # SIGHUP blocked since before any thread (cli.run): one thread takes it
    # with sigtimedwait and learns the sender. Otherwise a plain handler,
    # and the audit event cannot say who sent it.
    hup: HupListener | None = None
    if sighup_blocked():
        hup = HupListener(loop, gw.on_sighup)
        hup.start()
    else:
        loop.add_signal_handler(signal.SIGHUP, gw.on_sighup, None, None)
    state_dir = cfg.gateway.state_dir
    try:
        write_pid_file(state_dir)  # where `gateway reload` finds us
    except OSError as exc:
        log.warning("no pid file: `gateway reload` cannot find this process", error=str(exc))
    try:
        await gw.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if hup is not None:
            await asyncio.to_thread(hup.stop)
        else:
            loop.remove_signal_handler(signal.SIGHUP)
        remove_pid_file(state_dir)
    return 0
