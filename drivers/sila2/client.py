"""The blocking boundary: gRPC channel, deadline-bounded calls, feature definitions, SiLA errors.

``sila2``'s own ``SilaClient`` makes every call without a deadline (its
constructor too, and it opens an extra TLS connection without a timeout to
read the server UUID), so a stalled server blocks it forever. This module
keeps ``sila2`` for what it does well (parsing feature definitions, building
the protobuf messages and converting values) and makes the gRPC calls itself:
every unary call carries a gRPC deadline and runs on a small executor owned by
the connection; the asyncio side awaits it under ``asyncio.timeout`` as well.
Nothing here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from base64 import standard_b64decode
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, Final, TypeVar

import grpc
from sila2.features.silaservice import SiLAServiceFeature
from sila2.framework import Feature
from sila2.framework.abc.sila_error import SilaError
from sila2.framework.constraints.unit import Unit
from sila2.framework.data_types.constrained import Constrained
from sila2.framework.errors.validation_error import ValidationError

from drivers.sila2.config import Sila2Connection
from gateway.driver import Value

T = TypeVar("T")

# A SiLA unit label -> UCUM code, for labels that are not UCUM already.
_UCUM: Final = {
    "°C": "Cel",
    "degC": "Cel",
    "deg C": "Cel",
    "°F": "[degF]",
    "rpm": "/min",
    "1/min": "/min",
    "g/l": "g/L",
    "mg/l": "mg/L",
    "ml": "mL",
    "l": "L",
    "sec": "s",
    "min": "min",
    "h": "h",
    "1e6 cells/mL": "10*6/mL",
    "1e6/mL": "10*6/mL",
    "10^6/mL": "10*6/mL",
    "10^6 cells/mL": "10*6/mL",
}
# gRPC status codes that mean the server or the connection is gone.
CONNECTION_LOST: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
_FRAMEWORK_ERRORS: Final = {
    0: "CommandExecutionNotAccepted",
    1: "InvalidCommandExecutionUUID",
    2: "CommandExecutionNotFinished",
    3: "InvalidMetadata",
    4: "NoMetadataAllowed",
}
_SILA_ERROR: Any = SilaError._pb2_module.SiLAError  # type: ignore[attr-defined]
_features: dict[str, Feature] = {}  # FDL sha256 -> parsed feature (protoc runs once per process)
_features_lock = threading.Lock()


class SilaCallError(Exception):
    """A call failed. ``status`` is what a bad reading carries; ``lost`` means reconnect."""

    def __init__(self, status: str, *, lost: bool = False, timeout: bool = False) -> None:
        super().__init__(status)
        self.status = status
        self.lost = lost
        self.timeout = timeout


def describe_rpc_error(exc: BaseException) -> SilaCallError:
    """A SiLA error (by its identifier) or a connection error, from what gRPC raised."""
    if not isinstance(exc, grpc.RpcError):
        return SilaCallError(f"{type(exc).__name__}: {exc}")
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else ""
    if code == grpc.StatusCode.ABORTED:
        try:
            err = _SILA_ERROR.FromString(standard_b64decode(details or ""))
        except Exception:
            err = None
        if err is not None:
            if err.HasField("definedExecutionError"):
                d = err.definedExecutionError
                return SilaCallError(f"{d.errorIdentifier}: {d.message}")
            if err.HasField("validationError"):
                v = err.validationError
                return SilaCallError(f"ValidationError {v.parameter}: {v.message}")
            if err.HasField("undefinedExecutionError"):
                u = err.undefinedExecutionError
                return SilaCallError(f"UndefinedExecutionError: {u.message}")
            if err.HasField("frameworkError"):
                f = err.frameworkError
                kind = _FRAMEWORK_ERRORS.get(f.errorType, str(f.errorType))
                return SilaCallError(f"FrameworkError {kind}: {f.message}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return SilaCallError("timeout", timeout=True)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return SilaCallError(f"UndefinedExecutionError: not implemented by the server: {details}")
    name = code.name if code is not None else "UNKNOWN"
    return SilaCallError(f"connection error {name}: {details}", lost=code in CONNECTION_LOST)


def feature_from_fdl(fdl: str) -> Feature:
    """The parsed feature definition; cached, so a reconnect does not run protoc again."""
    key = hashlib.sha256(fdl.encode()).hexdigest()
    with _features_lock:
        feature = _features.get(key)
        if feature is None:
            feature = Feature(fdl)
            _features[key] = feature
        return feature


def unit_of(prop: Any) -> str | None:
    """The UCUM code of a property's SiLA Unit constraint, if it has one."""
    dtype = getattr(prop, "data_type", None)
    if not isinstance(dtype, Constrained):
        return None
    for c in getattr(dtype, "constraints", ()):
        if isinstance(c, Unit):
            label = c.label.strip()
            return _UCUM.get(label, label) or None
    return None


def to_value(native: Any) -> tuple[Value | None, str | None]:
    """A SiLA value as a record value, or (None, why) when it has no record form."""
    if isinstance(native, bool | int | float | str):
        return native, None
    if isinstance(native, datetime):
        # Exact integer arithmetic: timestamp() is a float and can land 1 µs short.
        if native.tzinfo is None:
            native = native.replace(tzinfo=UTC)
        return (native - _EPOCH) // _MICROSECOND * 1000, None
    if isinstance(native, date | time):
        return native.isoformat(), None
    if isinstance(native, bytes | bytearray):
        return bytes(native).hex(), None
    if (
        isinstance(native, tuple)
        and len(native) == 2
        and isinstance(native[0], date | time)
        and isinstance(native[1], tzinfo)
    ):
        # sila2's SilaDateType (date, timezone): the XML Schema form, 2024-05-17+02:00
        return native[0].isoformat() + _offset(native[1]), None
    return None, f"unsupported value type {type(native).__name__}"


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def _offset(tz: tzinfo) -> str:
    """``+HH:MM`` (``Z`` for UTC) of a fixed-offset timezone."""
    delta = tz.utcoffset(None) or timedelta(0)
    if not delta:
        return "Z"
    sign = "-" if delta < timedelta(0) else "+"
    minutes = abs(int(delta.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def conversion_error(exc: Exception) -> str:
    """The ``status`` of a value ``sila2`` could not convert: a constraint it breaks
    (``ValidationError``) or a form it cannot read (binary transfer, ...)."""
    if isinstance(exc, ValidationError):
        return f"ValidationError: {exc}"
    if isinstance(exc, NotImplementedError):
        return f"unsupported: {exc}"
    return f"conversion error {type(exc).__name__}: {exc}"


def _read_file(path: Any) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def make_channel(conn: Sila2Connection, host: str, port: int) -> grpc.Channel:
    """A gRPC channel as ``conn`` says (blocking: reads the certificate files)."""
    target = f"{host}:{port}"
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        # Fail fast and retry soon after a restart: gRPC's own reconnect
        # backoff would otherwise grow to minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # No HTTP/2 keep-alive pings: a gRPC server's default policy answers
        # pings more often than every 5 min on a quiet connection with GOAWAY
        # (too_many_pings). The driver's liveness call does that job.
    ]
    if conn.insecure:
        return grpc.insecure_channel(target, options=options)
    root = _read_file(conn.ca) if conn.ca is not None else None
    key = _read_file(conn.client_key) if conn.client_key is not None else None
    chain = _read_file(conn.client_cert) if conn.client_cert is not None else None
    creds = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )
    if conn.tls_server_name:
        options.append(("grpc.ssl_target_name_override", conn.tls_server_name))
    return grpc.secure_channel(target, creds, options=options)


@dataclass(frozen=True, slots=True)
class PropertyHandle:
    """How to read one property: its stub method and its value conversion."""

    prop: Any  # sila2 Property
    method: Any  # bound gRPC stub method (Get_X or Subscribe_X)
    observable: bool
    unit: str | None


class Connection:
    """One gRPC channel and the executor its blocking unary calls run on."""

    def __init__(self, conn: Sila2Connection, host: str, port: int, *, workers: int = 4) -> None:
        self.conn = conn
        self.host = host
        self.port = port
        self.timeout = conn.timeout
        self.channel: grpc.Channel | None = None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sila2-call")
        self._service_stub: Any = None
        self._closed = False

    async def open(self) -> None:
        self.channel = await asyncio.to_thread(make_channel, self.conn, self.host, self.port)
        self._service_stub = SiLAServiceFeature._grpc_module.SiLAServiceStub(self.channel)

    async def call(self, func: Callable[[], T], what: str) -> T:
        """Run a blocking call (which must carry its own gRPC deadline) off the loop."""
        if self._closed:
            raise SilaCallError("connection closed", lost=True)
        loop = asyncio.get_running_loop()
        try:
            # The gRPC deadline ends the thread; this bound only guards the loop
            # against a call that ignores it.
            async with asyncio.timeout(self.timeout + 2.0):
                return await loop.run_in_executor(self._executor, func)
        except TimeoutError:
            raise SilaCallError(f"timeout: {what}", timeout=True) from None
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc) from None

    def _service_get(self, prop_id: str) -> Any:
        prop = SiLAServiceFeature._unobservable_properties[prop_id]
        method = getattr(self._service_stub, f"Get_{prop_id}")
        msg = method(prop.get_parameters_message(), timeout=self.timeout)
        return prop.to_native_type(msg)

    def server_uuid_blocking(self) -> str:
        """ServerUUID from a thread (a stream's), bounded by the call deadline."""
        if self._service_stub is None or self._closed:
            raise SilaCallError("connection closed", lost=True)
        try:
            value: str = self._service_get("ServerUUID")
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc) from None
        return value

    async def server_uuid(self) -> str:
        value: str = await self.call(lambda: self._service_get("ServerUUID"), "ServerUUID")
        return value

    async def server_name(self) -> str:
        value: str = await self.call(lambda: self._service_get("ServerName"), "ServerName")
        return value

    async def implemented_features(self) -> list[str]:
        value: list[str] = await self.call(
            lambda: self._service_get("ImplementedFeatures"), "ImplementedFeatures"
        )
        return value

    async def feature(self, qualified_id: str) -> Feature:
        cmd = SiLAServiceFeature._unobservable_commands["GetFeatureDefinition"]

        def get() -> str:
            msg = cmd.parameters.to_message(qualified_id)
            resp = self._service_stub.GetFeatureDefinition(msg, timeout=self.timeout)
            fdl: str = cmd.responses.to_native_type(resp).FeatureDefinition
            return fdl

        fdl = await self.call(get, f"GetFeatureDefinition {qualified_id}")
        return await asyncio.to_thread(feature_from_fdl, fdl)

    def stub(self, feature: Feature) -> Any:
        return getattr(feature._grpc_module, f"{feature._identifier}Stub")(self.channel)

    async def get(self, handle: PropertyHandle) -> Any:
        """The current value of a property (unobservable: Get; observable: first item)."""
        prop = handle.prop
        timeout = self.timeout
        if handle.observable:

            def first() -> Any:
                stream = handle.method(prop.get_parameters_message(), timeout=timeout)
                try:
                    return prop.to_native_type(next(stream))
                finally:
                    stream.cancel()

            return await self.call(first, prop._identifier)

        def get() -> Any:
            msg = handle.method(prop.get_parameters_message(), timeout=timeout)
            return prop.to_native_type(msg)

        return await self.call(get, prop._identifier)

    def close(self) -> None:
        """Cancel every call on the channel and release it; never raises, never blocks long."""
        self._closed = True
        channel, self.channel = self.channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def subscribe_stream(handle: PropertyHandle) -> Any:
    """Open a property subscription (a gRPC response stream; no deadline: it lives long)."""
    return handle.method(handle.prop.get_parameters_message())
