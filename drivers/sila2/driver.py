"""SiLA 2 client driver: observable properties subscribed, unobservable ones polled.

``connect()`` opens a gRPC channel (TLS unless ``insecure``), asks SiLAService
for the server UUID (checked against ``server_uuid`` when set) and the
implemented features, fetches the definition of every feature a tag names,
and resolves each tag to its property (units from the FDL's Unit constraint).
``run()`` then starts one reader thread per subscribed property, a poll task
for the polled ones and a liveness task, and forwards values as readings.

All blocking gRPC work happens off the event loop (see ``client.py``): unary
calls carry a deadline and run on the connection's executor; each
subscription stream is iterated by its own daemon thread, which hands values
to the loop through a bounded queue (when it is full the thread waits, and
gRPC flow control holds the server back: nothing is dropped).

A dead server is noticed three ways, each raising ``DriverError`` so the
supervisor records ``$offline``, reconnects with backoff and builds a new
driver that subscribes again: a subscription stream ending or failing with a
connection error (``sila2``'s callback subscriptions would just go silent),
the liveness call (SiLAService ``ServerUUID``) failing or getting no answer
within ``timeout``, and a poll call losing the connection.

A SiLA error (defined or undefined execution error, validation or framework
error) on one property is a ``q = "bad"`` reading whose ``status`` begins
with the error's identifier; a subscription that ends with one is opened
again after ``resubscribe_delay``. A repeated identical error is reported
once, until the property gives a value again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, Final

import grpc

from drivers.sila2.client import (
    Connection,
    PropertyHandle,
    SilaCallError,
    conversion_error,
    describe_rpc_error,
    subscribe_stream,
    to_value,
    unit_of,
)
from drivers.sila2.config import Sila2Device, Sila2Tag
from gateway.driver import Driver, Emit, Reading
from gateway.errors import DriverError
from gateway.record import BAD

_TICK: Final = 0.2  # seconds between failure checks while no value arrives
MAX_EMIT: Final = 5000
_MAX_RESUBSCRIBE: Final = 60.0  # longest wait before re-subscribing a property that ended


def _same(a: Reading, b: Reading) -> bool:
    return a.q == b.q and a.status == b.status and type(a.val) is type(b.val) and a.val == b.val


class _Stream(threading.Thread):
    """Iterates one property subscription and hands each value to the loop."""

    def __init__(self, driver: Sila2Driver, index: int, handle: PropertyHandle) -> None:
        name = f"sila2-sub-{driver.config.id}-{handle.prop._identifier}"
        super().__init__(name=name, daemon=True)
        self.driver = driver
        self.index = index
        self.handle = handle
        self.stop = threading.Event()
        self.call: Any = None
        self._lock = threading.Lock()
        self.values = 0

    def cancel(self) -> None:
        self.stop.set()
        with self._lock:
            call = self.call
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()

    def run(self) -> None:
        d = self.driver
        name = d.names[self.index]
        prop = self.handle.prop
        short = 0  # subscriptions in a row that ended normally after a single value
        last: Reading | None = None  # the last reading of the stream that ended normally
        while not self.stop.is_set():
            try:
                with self._lock:
                    if self.stop.is_set():
                        return
                    self.call = subscribe_stream(self.handle)
                n = 0
                latest: Reading | None = None
                for msg in self.call:
                    if self.stop.is_set():
                        return
                    n += 1
                    self.values += 1
                    latest = d.reading(self.index, msg, prop)
                    if n == 1 and last is not None and _same(latest, last):
                        continue  # the value we already have, again after a re-subscription
                    self._put(latest)
                if self.stop.is_set():
                    return
                if n == 0:
                    d.lost_from_thread(f"server ended the subscription to {prop._identifier}")
                    return
                # Ended normally after values: a server may close the subscription of a
                # property whose value is final (SiLA interoperability tests do). A
                # server that is shutting down ends its streams the same way, so ask
                # it whether it is still there before treating this as a property end.
                if not self._server_answers():
                    return
                last = latest
                short = short + 1 if n == 1 else 1
                self.stop.wait(min(_MAX_RESUBSCRIBE, d.config.resubscribe_delay * 2 ** (short - 1)))
            except grpc.RpcError as exc:
                if self.stop.is_set():
                    return
                err = describe_rpc_error(exc)
                if err.lost or err.timeout:
                    d.lost_from_thread(f"subscription to {prop._identifier}: {err.status}")
                    return
                self._put(Reading(name, None, BAD, err.status, None, self.handle.unit))
                last = None  # the next value is reported, whatever it is
                self.stop.wait(d.config.resubscribe_delay)
            except Exception as exc:  # a conversion bug must not kill the thread silently
                if self.stop.is_set():
                    return
                why = f"{type(exc).__name__}: {exc}"
                d.lost_from_thread(f"subscription to {prop._identifier}: {why}")
                return

    def _server_answers(self) -> bool:
        """False (and the device reported lost) unless SiLAService answers now."""
        d = self.driver
        try:
            if d.conn is not None:
                d.conn.server_uuid_blocking()
                return True
            why = "connection closed"
        except SilaCallError as exc:
            why = exc.status
        if not self.stop.is_set():
            prop = self.handle.prop._identifier
            d.lost_from_thread(f"server ended the subscription to {prop} ({why})")
        return False

    def _put(self, reading: Reading) -> None:
        loop = self.driver.loop
        queue = self.driver.queue
        if loop is None or queue is None:
            return
        try:
            fut = asyncio.run_coroutine_threadsafe(queue.put([reading]), loop)
        except RuntimeError:  # loop closed
            self.stop.set()
            return
        while not self.stop.is_set():
            try:
                fut.result(0.5)
                return
            except TimeoutError:
                continue  # the queue is full: wait (back-pressure to the server)
            except Exception:
                return
        fut.cancel()


class Sila2Driver(Driver[Sila2Device]):
    """One SiLA 2 server."""

    config_model = Sila2Device

    def __init__(self, config: Sila2Device) -> None:
        super().__init__(config)
        self.tags: list[Sila2Tag] = list(config.tags)
        self.names = [t.name for t in config.tags]
        self.handles: list[PropertyHandle | None] = [None] * len(self.tags)
        self.unavailable: dict[int, str] = {}
        self.conn: Connection | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[list[Reading]] | None = None
        self.streams: list[_Stream] = []
        self.server_uuid: str | None = None
        self.connect_seconds = 0.0
        self._failure: str | None = None
        self._last_bad: dict[int, str] = {}  # tag index -> status last reported bad
        self._index = {n: i for i, n in enumerate(self.names)}
        self._subscribed: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------

    async def connect(self) -> None:
        c = self.config
        started = time.monotonic()
        host, port = c.host, c.port
        if c.discovery:
            from drivers.sila2.discover import find_server

            try:
                host, port = await asyncio.to_thread(
                    find_server, c.timeout, server_uuid=c.server_uuid, server_name=c.server_name
                )
            except TimeoutError as exc:
                raise DriverError(c.id, f"discovery: {exc}") from exc
        assert host is not None and port is not None
        where = f"{host}:{port}"
        # One call thread per polled tag (they poll concurrently) plus the liveness call.
        conn = Connection(c, host, port, workers=min(16, 2 + len(self.tags)))
        self.conn = conn
        try:
            await conn.open()
        except OSError as exc:
            raise DriverError(c.id, f"cannot read TLS files: {exc}") from exc
        try:
            self.server_uuid = await conn.server_uuid()
            if c.server_uuid is not None and self.server_uuid.lower() != str(c.server_uuid):
                raise DriverError(
                    c.id,
                    f"server at {where} is {self.server_uuid}, not the configured server_uuid "
                    f"{c.server_uuid}",
                )
            implemented = set(await conn.implemented_features())
            features: dict[str, Any] = {}
            for fid in sorted({t.ref().feature for t in self.tags}):
                if fid in implemented:
                    features[fid] = await conn.feature(fid)
        except SilaCallError as exc:
            raise DriverError(c.id, f"cannot connect to {where}: {exc.status}") from exc
        self._resolve(features, implemented)
        self.connect_seconds = time.monotonic() - started
        self.log.info(
            "sila2 connected",
            server=where,
            uuid=self.server_uuid,
            tls=not c.insecure,
            unavailable=len(self.unavailable),
            seconds=round(self.connect_seconds, 3),
        )

    def _resolve(self, features: dict[str, Any], implemented: set[str]) -> None:
        assert self.conn is not None
        stubs: dict[str, Any] = {}
        for i, tag in enumerate(self.tags):
            ref = tag.ref()
            feature = features.get(ref.feature)
            if feature is None:
                base = ref.feature.rsplit("/", 1)[0]
                versions = sorted(f for f in implemented if f.rsplit("/", 1)[0] == base)
                why = f"feature {ref.feature} not implemented by the server"
                self.unavailable[i] = why + (f" (it has {', '.join(versions)})" if versions else "")
                continue
            observable = ref.identifier in feature._observable_properties
            prop = feature._observable_properties.get(
                ref.identifier
            ) or feature._unobservable_properties.get(ref.identifier)
            if prop is None:
                self.unavailable[i] = f"property {ref.identifier} not in feature {ref.feature}"
                continue
            stub = stubs.get(ref.feature)
            if stub is None:
                stub = stubs[ref.feature] = self.conn.stub(feature)
            prefix = "Subscribe_" if observable else "Get_"
            method = getattr(stub, prefix + ref.identifier)
            self.handles[i] = PropertyHandle(prop, method, observable, unit_of(prop))
        for i, why in self.unavailable.items():
            self.log.warning("sila2 tag unavailable", tag=self.names[i], reason=why)

    async def close(self) -> None:
        for s in self.streams:
            s.cancel()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    # --- acquisition -------------------------------------------------------------

    def discovered_units(self) -> dict[str, str]:
        """Tag -> UCUM code from the FDL's Unit constraint (tags without a configured unit)."""
        out = {}
        for name, tag, h in zip(self.names, self.tags, self.handles, strict=True):
            if h is not None and h.unit and not tag.unit:
                out[name] = h.unit
        return out

    def reading(self, index: int, msg: Any, prop: Any) -> Reading:
        """A reading from a response message (called from stream threads and the loop)."""
        handle = self.handles[index]
        unit = handle.unit if handle is not None else None
        try:
            native = prop.to_native_type(msg)
        except Exception as exc:  # sila2 validates constraints while converting
            return Reading(self.names[index], None, BAD, conversion_error(exc), None, unit)
        val, why = to_value(native)
        if why is not None:
            return Reading(self.names[index], None, BAD, why, None, unit)
        return Reading(self.names[index], val, unit=unit)

    def lost_from_thread(self, reason: str) -> None:
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._set_failure, reason)

    def _set_failure(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason

    def _check(self) -> None:
        if self._failure is not None:
            raise DriverError(self.config.id, self._failure)
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def run(self, emit: Emit) -> None:
        c = self.config
        self.loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Reading]] = asyncio.Queue(c.buffer_size)
        self.queue = queue
        initial = [Reading(self.names[i], None, BAD, why) for i, why in self.unavailable.items()]
        if initial:
            await emit(initial)
        polled: list[int] = []
        for i, h in enumerate(self.handles):
            if h is None:
                continue
            if h.observable and self.tags[i].mode != "poll":
                s = _Stream(self, i, h)
                self._subscribed.add(i)
                self.streams.append(s)
                s.start()
            else:
                polled.append(i)
        if polled:
            self._tasks.append(asyncio.create_task(self._poll_loop(polled, queue)))
        self._tasks.append(asyncio.create_task(self._liveness()))
        while True:
            batch: list[Reading] = []
            try:
                async with asyncio.timeout(_TICK):
                    batch.extend(await queue.get())
            except TimeoutError:
                pass
            while True:
                try:
                    batch.extend(queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            batch = self._dedupe(batch)
            for start in range(0, len(batch), MAX_EMIT):
                await emit(batch[start : start + MAX_EMIT])
            self._check()

    def _dedupe(self, batch: list[Reading]) -> list[Reading]:
        """Drop a subscribed tag's bad reading that repeats its last reported error.

        A subscription ending with a SiLA error is opened again every
        ``resubscribe_delay``, and the server answers each time with the same
        error; polled tags keep one reading per poll, good or bad.
        """
        out = []
        subscribed = self._subscribed
        for r in batch:
            i = self._index[r.tag]
            if i not in subscribed:
                out.append(r)
                continue
            if r.q == BAD and isinstance(r.status, str):
                if self._last_bad.get(i) == r.status:
                    continue
                self._last_bad[i] = r.status
            else:
                self._last_bad.pop(i, None)
            out.append(r)
        return out

    async def _poll_one(self, i: int) -> Reading:
        handle = self.handles[i]
        assert handle is not None and self.conn is not None
        name = self.names[i]
        try:
            native = await self.conn.get(handle)
        except SilaCallError as exc:
            if exc.lost:
                self._set_failure(f"poll {handle.prop._identifier}: {exc.status}")
            return Reading(name, None, BAD, exc.status, None, handle.unit)
        except Exception as exc:  # sila2 validates constraints while converting
            return Reading(name, None, BAD, conversion_error(exc), None, handle.unit)
        val, why = to_value(native)
        if why is not None:
            return Reading(name, None, BAD, why, None, handle.unit)
        return Reading(name, val, unit=handle.unit)

    async def _poll_loop(self, polled: list[int], queue: asyncio.Queue[list[Reading]]) -> None:
        interval = self.config.poll_interval
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            readings = await asyncio.gather(*(self._poll_one(i) for i in polled))
            await queue.put(list(readings))
            next_at += interval
            now = loop.time()
            if next_at < now:
                next_at += ((now - next_at) // interval + 1) * interval
            await asyncio.sleep(next_at - now)

    async def _liveness(self) -> None:
        conn = self.conn
        assert conn is not None
        while True:
            await asyncio.sleep(self.config.liveness_interval)
            try:
                uuid = await conn.server_uuid()
            except SilaCallError as exc:
                why = "no answer" if exc.timeout else exc.status
                self._set_failure(f"server does not answer SiLAService ({why})")
                return
            if self.server_uuid is not None and uuid != self.server_uuid:
                self._set_failure(f"another server answers now (UUID {uuid})")
                return
