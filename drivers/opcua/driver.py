"""OPC UA client driver (asyncua): subscriptions or polled Reads, one session per device.

``connect()`` opens a fresh session (security, user token, trusted server
certificate), resolves every tag's NodeId (namespace URIs and browse paths
against this server's current namespace table) and reads the EngineeringUnits
of tags without a configured unit. ``run()`` then either creates one
subscription with a monitored item per tag (in batches of
``max_items_per_call``) and forwards notifications, or Reads all tags every
``poll_interval``. Nothing survives a reconnect: the supervisor builds a new
driver, so a restarted server gets a new session, subscription and items, and
no value from before the restart is ever re-reported.

Dead sessions are detected three ways: the socket closing, asyncua's periodic
read of the server state (``health_check_interval``), and a publish watchdog
(no notification and no keep-alive for ``watchdog_intervals`` publishing
intervals). Each raises ``DriverError`` so the supervisor reconnects.

Notifications go through a bounded queue (``buffer_size``). When the pipeline
falls behind and the queue is full, further notifications are coalesced: the
latest per tag is kept, and it is reported with ``q = "uncertain"`` (``bad``
stays bad) and ``status = "coalesced: N notifications dropped"``, so the loss
is in the records, never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.crypto import security_policies
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from drivers.opcua.config import NodeRef, OpcUaConnection, OpcUaDevice, OpcUaTag, parse_node_id
from drivers.opcua.security import (
    ServerTrust,
    UntrustedCertificate,
    ensure_client_identity,
    first_certificate,
)
from drivers.opcua.status import quality, status_name
from drivers.opcua.units import ucum_from_eu
from gateway.driver import Emit, PolledDriver, Reading, Value
from gateway.errors import ConfigError, DriverError
from gateway.record import BAD, GOOD, UNCERTAIN
from gateway.secrets import check_private_file

STATE_DIR_ENV: Final = "GATEWAY_STATE_DIR"
MAX_EMIT: Final = 5000  # readings per emit (one MQTT payload)
_TICK: Final = 0.2  # seconds between liveness checks while no data arrives
_UTC = UTC
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_NULL_BEFORE = datetime(1970, 1, 1, 0, 0, 5, tzinfo=_UTC)  # OPC UA "no time" (1601) and 0
_ONE_US = timedelta(microseconds=1)
_POLICY_CLASSES: Final[dict[str, Any]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256Sha256RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_POLICY_NONE_URI: Final = security_policies.SecurityPolicyNone.URI
_TIMESTAMPS: Final = {
    "source": ua.TimestampsToReturn.Source,
    "server": ua.TimestampsToReturn.Server,
    "gateway": ua.TimestampsToReturn.Neither,
}
_TRIGGERS: Final = {
    "status": ua.DataChangeTrigger.Status,
    "status_value": ua.DataChangeTrigger.StatusValue,
    "status_value_timestamp": ua.DataChangeTrigger.StatusValueTimestamp,
}
_DEADBANDS: Final = {"none": 0, "absolute": 1, "percent": 2}
# Service results that mean the session or connection is gone (reconnect),
# as opposed to a request the server refused (reported per tag).
_SESSION_LOST: Final = frozenset(
    getattr(StatusCodes, name)
    for name in (
        "BadSessionIdInvalid",
        "BadSessionClosed",
        "BadSessionNotActivated",
        "BadSecureChannelIdInvalid",
        "BadSecureChannelClosed",
        "BadConnectionClosed",
        "BadServerHalted",
        "BadShutdown",
        "BadCommunicationError",
        "BadNotConnected",
        "BadTcpInternalError",
        "BadNoCommunication",
    )
)

T = TypeVar("T")


class SessionRefused(Exception):
    """The driver will not open this session (a missing endpoint, an unprotected password)."""


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def datetime_ns(dt: datetime | None) -> int | None:
    """An OPC UA DateTime as ns since the Unix epoch; None for a null or absent time."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_UTC)
    if dt < _NULL_BEFORE:
        return None
    return ((dt - _EPOCH) // _ONE_US) * 1000


def convert_value(value: Any) -> tuple[Value | None, str | None]:
    """An OPC UA scalar as a record value, or (None, why) when it has no record form."""
    if value is None:
        return None, "no value"
    if isinstance(value, bool | str):
        return value, None
    if isinstance(value, int):  # includes IntEnum (enumerations)
        return int(value), None
    if isinstance(value, float):
        return float(value), None
    if isinstance(value, datetime):
        ns = datetime_ns(value)
        return (ns, None) if ns is not None else (None, "null DateTime")
    if isinstance(value, ua.LocalizedText):
        return value.Text or "", None
    if isinstance(value, ua.QualifiedName):
        return f"{value.NamespaceIndex}:{value.Name}", None
    if isinstance(value, ua.NodeId):
        return value.to_string(), None
    if isinstance(value, ua.StatusCode):
        return int(value.value), None
    if isinstance(value, uuid.UUID):
        return str(value), None
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex(), None
    if isinstance(value, list | tuple):
        return None, f"unsupported value: array of {len(value)}"
    return None, f"unsupported value type {type(value).__name__}"


def to_ua_node_id(ref: NodeRef, namespaces: Sequence[str]) -> ua.NodeId | None:
    """A parsed NodeId against this server's namespace table; None if its URI is unknown."""
    if isinstance(ref.namespace, str):
        try:
            index = namespaces.index(ref.namespace)
        except ValueError:
            return None
    else:
        index = ref.namespace
    kinds = {
        "i": ua.NodeIdType.Numeric,
        "s": ua.NodeIdType.String,
        "g": ua.NodeIdType.Guid,
        "b": ua.NodeIdType.ByteString,
    }
    return make_node_id(ref.identifier, index, kinds[ref.kind])


def make_node_id(identifier: Any, namespace: Any, kind: Any) -> ua.NodeId:
    # asyncua annotates NodeId's fields with its own int/str subclasses.
    return ua.NodeId(identifier, namespace, kind)


def path_element(reference: int, name: str, namespace: int) -> ua.RelativePathElement:
    """A forward step along ``reference`` (and its subtypes) to browse name ``name``."""
    fields: dict[str, Any] = {
        "ReferenceTypeId": make_node_id(reference, 0, None),
        "IsInverse": False,
        "IncludeSubtypes": True,
        "TargetName": ua.QualifiedName(name, namespace),
    }
    return ua.RelativePathElement(**fields)


def plain_node_id(node: ua.NodeId) -> ua.NodeId:
    """An (Expanded)NodeId as a local NodeId."""
    return make_node_id(node.Identifier, node.NamespaceIndex, node.NodeIdType)


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed OPC UA operation."""
    if isinstance(exc, UaStatusCodeError):
        return f"{status_name(exc.code)}: {exc}"
    if isinstance(exc, TimeoutError):
        return "no answer (timeout)"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, UntrustedCertificate | SessionRefused):
        return text
    return f"{type(exc).__name__}: {text}"


def cert_dir_for(conn: OpcUaConnection, state_dir: Path | None) -> Path | None:
    """``client_cert_dir``, else ``<state_dir>/opcua`` (state_dir from the daemon or env)."""
    if conn.client_cert_dir is not None:
        return conn.client_cert_dir
    if state_dir is None and os.environ.get(STATE_DIR_ENV):
        state_dir = Path(os.environ[STATE_DIR_ENV])
    return None if state_dir is None else state_dir / "opcua"


def _load_user_token(conn: OpcUaConnection) -> tuple[x509.Certificate, Any]:
    assert conn.user_cert is not None and conn.user_key is not None
    cert_data = conn.user_cert.read_bytes()
    check_private_file(conn.user_key, "user_key")
    key_data = conn.user_key.read_bytes()
    if b"-----BEGIN" in cert_data:
        cert = x509.load_pem_x509_certificate(cert_data)
    else:
        cert = x509.load_der_x509_certificate(cert_data)
    if b"-----BEGIN" in key_data:
        key = serialization.load_pem_private_key(key_data, password=None)
    else:
        key = serialization.load_der_private_key(key_data, password=None)
    return cert, key


def _pick_endpoint(
    endpoints: Sequence[ua.EndpointDescription], mode: str, policy: str
) -> ua.EndpointDescription:
    want_mode = ua.MessageSecurityMode.None_ if mode == "None" else ua.MessageSecurityMode[mode]
    want_uri = _POLICY_NONE_URI if policy == "None" else _POLICY_CLASSES[policy].URI
    for ep in endpoints:
        if ep.SecurityMode == want_mode and ep.SecurityPolicyUri == want_uri:
            return ep
    offered = sorted(
        {
            f"{(ep.SecurityPolicyUri or '').rpartition('#')[2]}/{ep.SecurityMode.name.rstrip('_')}"
            for ep in endpoints
        }
    )
    raise SessionRefused(
        f"server offers no endpoint {policy}/{mode}; it offers {', '.join(offered) or 'none'}"
    )


def _check_password_protected(ep: ua.EndpointDescription, mode: str) -> None:
    for token in ep.UserIdentityTokens or []:
        if token.TokenType == ua.UserTokenType.UserName:
            uri = token.SecurityPolicyUri or ep.SecurityPolicyUri
            if mode != "SignAndEncrypt" and (not uri or uri == _POLICY_NONE_URI):
                raise SessionRefused(
                    "refusing to send the password in clear text: the server's UserName "
                    "token is not encrypted on this endpoint (use security_mode "
                    "SignAndEncrypt)"
                )
            return
    raise SessionRefused("the server accepts no UserName token on this endpoint")


async def open_session(
    conn: OpcUaConnection,
    *,
    cert_dir: Path | None,
    health_check_interval: float = 5.0,
    on_client: Any = None,
) -> Client:
    """Connect and activate a session as ``conn`` says; the caller closes it (close_client).

    Raises UntrustedCertificate, ConfigError, TimeoutError, OSError or asyncua
    errors. ``on_client(client)`` is called as soon as the client exists, so
    a caller that is cancelled can still close it.
    """
    mode = conn.effective_mode
    timeout = conn.timeout
    client = Client(conn.endpoint, timeout=timeout, watchdog_intervall=health_check_interval)
    if on_client is not None:
        on_client(client)
    client.session_timeout = int(conn.session_timeout * 1000)
    client.name = client.description = "equipment-gateway"
    client.product_uri = "urn:equipment-gateway"
    needs_dir = mode != "None" or conn.trust_on_first_use
    if needs_dir and cert_dir is None:
        raise ConfigError(
            "client_cert_dir is not set and the gateway's state_dir is unknown: set "
            "client_cert_dir (the client certificate and trust pins live there)"
        )
    trust = ServerTrust(
        conn.endpoint,
        server_cert=conn.server_cert,
        server_cert_sha256=conn.server_cert_sha256,
        trust_on_first_use=conn.trust_on_first_use,
        pin_dir=cert_dir,
    )
    server_der: bytes | None = None
    if mode != "None" or conn.username is not None:
        endpoints = await asyncio.wait_for(client.connect_and_get_server_endpoints(), timeout * 2)
        ep = _pick_endpoint(endpoints, mode, conn.security_policy)
        server_der = first_certificate(ep.ServerCertificate or b"")
        if not server_der:
            raise UntrustedCertificate("the server presented no certificate")
        await asyncio.to_thread(trust.check, server_der)
        if conn.username is not None:
            _check_password_protected(ep, mode)
    if mode != "None":
        assert cert_dir is not None
        identity = await asyncio.to_thread(ensure_client_identity, cert_dir)
        client.application_uri = identity.application_uri
        await client.set_security(
            _POLICY_CLASSES[conn.security_policy],
            identity.cert_path,
            identity.key_path,
            server_certificate=server_der,
            mode=ua.MessageSecurityMode[mode],
        )
    elif trust.configured:
        # No secure channel: still check who answers (the session is signed
        # with the server's key, so the certificate cannot simply be copied).
        async def validate(cert: x509.Certificate, _app: Any) -> None:
            der = cert.public_bytes(serialization.Encoding.DER)
            if server_der is not None and first_certificate(der) == server_der:
                return
            await asyncio.to_thread(trust.check, der)

        client.certificate_validator = validate
    if conn.username is not None:
        client.set_user(conn.username)
        password: str | None = await asyncio.to_thread(conn.secret_password)
        client.set_password(password or "")
    elif conn.user_cert is not None:
        try:
            cert, key = await asyncio.to_thread(_load_user_token, conn)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"user_cert/user_key: {exc}") from exc
        client.user_certificate = cert
        client.user_private_key = key
    await asyncio.wait_for(client.connect(), timeout * 3)
    return client


def _on_connection_lost(driver: OpcUaDriver) -> Any:
    async def lost(exc: Exception) -> None:
        # Called by asyncua's connection supervisor before it tells the
        # subscriptions (BadShutdown): keep the real cause.
        if driver._failure is None:
            driver._failure = f"connection lost: {describe(exc)}"

    return lost


async def close_client(client: Client, timeout: float) -> None:
    """Close the session (deleting its subscriptions) and every asyncua task; never raises."""
    try:
        if client.uaclient.state is UaClientState.CONNECTED:
            await asyncio.wait_for(client.disconnect(), timeout)
    except Exception:
        pass
    finally:
        client.uaclient.request_disconnect()
        tasks = [
            getattr(client, "_supervisor_task", None),
            getattr(client, "_stale_watchdog_task", None),
            getattr(client, "_renew_channel_task", None),
            getattr(client.uaclient.session, "_publish_task", None),
        ]
        for task in tasks:
            if isinstance(task, asyncio.Task) and not task.done():
                task.cancel()
        await asyncio.gather(
            *(t for t in tasks if isinstance(t, asyncio.Task)), return_exceptions=True
        )
        with contextlib.suppress(Exception):
            client.disconnect_socket()


class OpcUaDriver(PolledDriver[OpcUaDevice]):
    """One OPC UA server: subscribe (monitored items) or poll (Read)."""

    config_model = OpcUaDevice

    # The gateway's state directory; the client certificate defaults to
    # <state_dir>/opcua. Set by the daemon; falls back to $GATEWAY_STATE_DIR.
    state_dir: Path | None = None

    def __init__(self, config: OpcUaDevice) -> None:
        super().__init__(config)
        self._tags: list[OpcUaTag] = list(config.tags)
        self._names = [t.name for t in config.tags]
        self._client: Client | None = None
        self._nodes: list[ua.NodeId | None] = [None] * len(self._names)
        self._unavailable: dict[int, int | str] = {}  # tag index -> why it has no node/item
        self._ttr = _TIMESTAMPS[config.timestamp]
        self._source_ts = config.timestamp == "source"
        self._server_ts = config.timestamp == "server"
        self.units: dict[str, str] = {}  # tag -> UCUM code discovered from EngineeringUnits
        self._unit_of: list[str | None] = [None] * len(self._names)  # by tag index
        # subscribe mode
        self._queue: asyncio.Queue[Reading] = asyncio.Queue(config.buffer_size)
        self._overflow: dict[str, Reading] = {}
        self._dropped: dict[str, int] = {}
        self._failure: str | None = None
        self._last_publish = 0.0
        self._last_seq: int | None = None
        self._watchdog_s = 0.0
        self.subscription_id: int | None = None
        self.revised_publishing_interval: float | None = None
        self.notifications = 0  # data change notifications received
        self.coalesced = 0  # notifications dropped by coalescing
        self.lost_messages = 0  # notification messages missing from the sequence
        self._coalesce_logged = 0.0
        self.items_created = 0
        self.connect_seconds = 0.0
        self.subscribe_seconds = 0.0

    # --- lifecycle -----------------------------------------------------------

    def discovered_units(self) -> dict[str, str]:
        """Tag -> UCUM code read from the server for tags whose config gives no unit."""
        return dict(self.units)

    async def connect(self) -> None:
        c = self.config
        started = time.monotonic()

        def keep(client: Client) -> None:
            self._client = client
            client.connection_lost_callback = _on_connection_lost(self)

        try:
            await open_session(
                c,
                cert_dir=cert_dir_for(c, self.state_dir),
                health_check_interval=c.health_check_interval,
                on_client=keep,
            )
            await self._resolve()
        except DriverError:
            raise
        except ConfigError as exc:
            raise DriverError(c.id, f"configuration: {exc}") from exc
        except (
            TimeoutError,
            OSError,
            UaError,
            UntrustedCertificate,
            SessionRefused,
            ValueError,
        ) as exc:
            raise DriverError(c.id, f"cannot connect to {c.endpoint}: {describe(exc)}") from exc
        await self._discover_units()
        self.connect_seconds = time.monotonic() - started

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await close_client(client, min(self.config.timeout, 2.0))

    async def run(self, emit: Emit) -> None:
        if self.config.mode == "poll":
            await super().run(emit)
        else:
            await self._run_subscription(emit)

    # --- address resolution and units ----------------------------------------

    def _connected(self) -> Client:
        client = self._client
        if client is None or client.uaclient.state is not UaClientState.CONNECTED:
            raise DriverError(self.config.id, self._failure or "connection lost")
        return client

    async def _resolve(self) -> None:
        """NodeIds for every tag against this server's namespace table."""
        client = self._connected()
        c = self.config
        namespaces: list[str] = await client.get_namespace_array()
        paths: list[tuple[int, ua.BrowsePath]] = []
        start_ref = parse_node_id(c.browse_start)
        start = to_ua_node_id(start_ref, namespaces)
        for i, tag in enumerate(self._tags):
            if tag.node_id is not None:
                ref = parse_node_id(tag.node_id)
                node = to_ua_node_id(ref, namespaces)
                if node is None:
                    self._unavailable[i] = f"namespace {ref.namespace} is not on the server"
                self._nodes[i] = node
                continue
            if start is None:
                self._unavailable[i] = f"browse_start namespace {start_ref.namespace} unknown"
                continue
            elements = []
            for seg in tag.segments(c.namespaces):
                if isinstance(seg.namespace, str):
                    if seg.namespace not in namespaces:
                        self._unavailable[i] = f"namespace {seg.namespace} is not on the server"
                        break
                    index = namespaces.index(seg.namespace)
                else:
                    index = seg.namespace
                elements.append(path_element(ObjectIds.HierarchicalReferences, seg.name, index))
            else:
                paths.append(
                    (i, ua.BrowsePath(StartingNode=start, RelativePath=ua.RelativePath(elements)))
                )
        for batch in chunks(paths, c.max_nodes_per_read):
            results = await client.uaclient.translate_browsepaths_to_nodeids([p for _, p in batch])
            for (i, _), res in zip(batch, results, strict=True):
                code = res.StatusCode.value
                if code != 0 or not res.Targets:
                    self._unavailable[i] = code or "browse path not found"
                    continue
                target = res.Targets[0]
                if target.RemainingPathIndex != 0xFFFFFFFF or getattr(
                    target.TargetId, "ServerIndex", 0
                ):
                    self._unavailable[i] = "browse path leads to another server"
                    continue
                self._nodes[i] = plain_node_id(target.TargetId)
        for i, why in self._unavailable.items():
            self.log.warning("opcua tag unavailable", tag=self._names[i], reason=_why(why))

    async def _discover_units(self) -> None:
        """EngineeringUnits of tags without a configured unit (failures only logged)."""
        client = self._client
        wanted = [i for i, t in enumerate(self._tags) if not t.unit and self._nodes[i] is not None]
        if client is None or not wanted:
            return
        c = self.config
        prop = ua.RelativePath([path_element(ObjectIds.HasProperty, "EngineeringUnits", 0)])
        try:
            found: list[tuple[int, ua.NodeId]] = []
            for batch in chunks(wanted, c.max_nodes_per_read):
                paths = [
                    ua.BrowsePath(StartingNode=self._nodes[i], RelativePath=prop) for i in batch
                ]
                results = await client.uaclient.translate_browsepaths_to_nodeids(paths)
                for i, res in zip(batch, results, strict=True):
                    if res.StatusCode.value == 0 and res.Targets:
                        found.append((i, plain_node_id(res.Targets[0].TargetId)))
            unmapped: dict[str, str] = {}
            for pairs in chunks(found, c.max_nodes_per_read):
                values = await client.uaclient.read_attributes(
                    [n for _, n in pairs], AttributeIds.Value
                )
                for (i, _), dv in zip(pairs, values, strict=True):
                    eu = dv.Value.Value if dv.Value is not None else None
                    if not isinstance(eu, ua.EUInformation):
                        continue
                    display = eu.DisplayName.Text if eu.DisplayName else None
                    desc = eu.Description.Text if eu.Description else None
                    code = ucum_from_eu(eu.UnitId, display, desc, eu.NamespaceUri)
                    if code:
                        self.units[self._names[i]] = code
                        self._unit_of[i] = code
                    else:
                        unmapped[self._names[i]] = display or desc or str(eu.UnitId)
            if unmapped:
                self.log.info("opcua units without a UCUM mapping (set `unit`)", units=unmapped)
        except (TimeoutError, OSError, UaError) as exc:
            self.log.warning("opcua engineering units not read", reason=describe(exc))

    # --- readings ------------------------------------------------------------

    def _reading(self, index: int, dv: ua.DataValue) -> Reading:
        name = self._names[index]
        sc = dv.StatusCode
        code = sc.value if sc is not None else 0
        if self._source_ts:
            src = datetime_ns(dv.SourceTimestamp)
        elif self._server_ts:
            src = datetime_ns(dv.ServerTimestamp)
        else:
            src = None
        if code == 0:
            q, status = GOOD, None
        else:
            q, status = quality(code), code
            if q == BAD:
                return Reading(name, None, BAD, code, src, self._unit_of[index])
        variant = dv.Value
        value: Any = variant.Value if variant is not None else None
        kind = type(value)
        unit = self._unit_of[index]
        if kind is float or kind is int or kind is bool or kind is str:
            return Reading(name, value, q, status, src, unit)
        val, why = convert_value(value)
        if why is not None:
            return Reading(name, None, BAD, why if status is None else status, src, unit)
        return Reading(name, val, q, status, src, unit)

    def _unavailable_readings(self) -> list[Reading]:
        return [Reading(self._names[i], None, BAD, why) for i, why in self._unavailable.items()]

    # --- poll mode -------------------------------------------------------------

    async def poll(self) -> list[Reading]:
        client = self._connected()
        c = self.config
        out: list[Reading | None] = [None] * len(self._names)
        for i, why in self._unavailable.items():
            out[i] = Reading(self._names[i], None, BAD, why)
        wanted = [
            i for i, n in enumerate(self._nodes) if n is not None and i not in self._unavailable
        ]
        for batch in chunks(wanted, c.max_nodes_per_read):
            params = ua.ReadParameters(
                MaxAge=0,  # a fresh value from the device, not the server's cache
                TimestampsToReturn=self._ttr,
                NodesToRead=[
                    ua.ReadValueId(NodeId=self._nodes[i], AttributeId=AttributeIds.Value)
                    for i in batch
                ],
            )
            try:
                values = await client.uaclient.read(params)
            except TimeoutError as exc:
                raise DriverError(c.id, f"Read got no answer within {c.timeout:g} s") from exc
            except (ConnectionError, OSError) as exc:
                raise DriverError(c.id, f"connection lost: {describe(exc)}") from exc
            except UaStatusCodeError as exc:
                if exc.code in _SESSION_LOST:
                    raise DriverError(c.id, f"session lost: {describe(exc)}") from exc
                for i in batch:
                    out[i] = Reading(self._names[i], None, BAD, exc.code)
                continue
            for i, dv in zip(batch, values, strict=True):
                out[i] = self._reading(i, dv)
        return [r for r in out if r is not None]

    # --- subscribe mode --------------------------------------------------------

    async def _run_subscription(self, emit: Emit) -> None:
        started = time.monotonic()
        await self._subscribe()
        self.subscribe_seconds = time.monotonic() - started
        initial = self._unavailable_readings()
        if initial:
            await emit(initial)
        queue = self._queue
        while True:
            first: Reading | None = None
            try:
                async with asyncio.timeout(_TICK):
                    first = await queue.get()
            except TimeoutError:
                pass
            batch = self._drain(first)
            for chunk in chunks(batch, MAX_EMIT):
                await emit(list(chunk))
            self._check_alive()

    async def _subscribe(self) -> None:
        client = self._connected()
        c = self.config
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=c.publishing_interval * 1000,
            # The server drops a subscription that gets no Publish request for
            # this many intervals: at least 3 keep-alives and 30 s.
            RequestedLifetimeCount=max(
                3 * c.keepalive_count, math.ceil(30 / c.publishing_interval)
            ),
            RequestedMaxKeepAliveCount=c.keepalive_count,
            MaxNotificationsPerPublish=c.buffer_size,
            PublishingEnabled=True,
            Priority=0,
        )
        try:
            self._last_publish = time.monotonic()
            result = await client.uaclient.create_subscription(params, self._on_publish)
            self.subscription_id = result.SubscriptionId
            interval = result.RevisedPublishingInterval / 1000 or c.publishing_interval
            self.revised_publishing_interval = interval
            keepalive = result.RevisedMaxKeepAliveCount or c.keepalive_count
            self._watchdog_s = max(max(c.watchdog, keepalive + 1) * interval, c.timeout)
            items = [(i, self._item_request(i)) for i, n in enumerate(self._nodes) if n is not None]
            for batch in chunks(items, c.max_items_per_call):
                self._check_alive()
                req = ua.CreateMonitoredItemsParameters(
                    SubscriptionId=result.SubscriptionId,
                    TimestampsToReturn=self._ttr,
                    ItemsToCreate=[m for _, m in batch],
                )
                created = await client.uaclient.create_monitored_items(req)
                for (i, _), res in zip(batch, created, strict=True):
                    if res.StatusCode.is_good():
                        self.items_created += 1
                    else:
                        self._unavailable[i] = res.StatusCode.value
                        self.log.warning(
                            "opcua monitored item refused",
                            tag=self._names[i],
                            status=status_name(res.StatusCode.value),
                        )
        except DriverError:
            raise
        except TimeoutError as exc:
            raise DriverError(c.id, "subscription setup got no answer (timeout)") from exc
        except (OSError, UaError) as exc:
            raise DriverError(c.id, f"cannot subscribe: {describe(exc)}") from exc
        self.log.info(
            "opcua subscribed",
            items=self.items_created,
            refused=len(self._unavailable),
            publishing_interval=interval,
            keepalive_count=keepalive,
        )

    def _item_request(self, index: int) -> ua.MonitoredItemCreateRequest:
        t = self._tags[index]
        mp = ua.MonitoringParameters(
            ClientHandle=index,
            SamplingInterval=-1.0 if t.sampling_interval is None else t.sampling_interval * 1000,
            QueueSize=t.queue_size,
            DiscardOldest=t.discard_oldest,
        )
        if t.trigger != "status_value" or t.deadband_type != "none":
            mp.Filter = ua.DataChangeFilter(
                Trigger=_TRIGGERS[t.trigger],
                DeadbandType=_DEADBANDS[t.deadband_type],
                DeadbandValue=t.deadband_value,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=self._nodes[index], AttributeId=AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=mp,
        )

    def _check_alive(self) -> None:
        """Raise DriverError when the session, the subscription or the publishing is dead."""
        c = self.config
        if self._failure is not None:
            raise DriverError(c.id, self._failure)
        self._connected()  # the socket closed (asyncua's state; before its callbacks ran)
        silent = time.monotonic() - self._last_publish
        if silent > self._watchdog_s:
            raise DriverError(
                c.id,
                f"no notification and no keep-alive for {silent:.1f} s "
                f"(watchdog {self._watchdog_s:g} s)",
            )

    def _on_publish(self, result: ua.PublishResult) -> None:
        """asyncua's publish loop calls this inline for every Publish response."""
        self._last_publish = time.monotonic()
        msg = result.NotificationMessage
        data = msg.NotificationData
        if not data:
            return  # keep-alive
        seq = msg.SequenceNumber
        last = self._last_seq
        if last is not None and seq > last + 1:
            self.lost_messages += seq - last - 1
            self.log.warning("opcua notification messages missing", count=seq - last - 1)
        self._last_seq = seq
        n = len(self._names)
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                items = notification.MonitoredItems
                self.notifications += len(items)
                push, make = self._push, self._reading
                for item in items:
                    handle = item.ClientHandle
                    if 0 <= handle < n:
                        push(make(handle, item.Value))
            elif isinstance(notification, ua.StatusChangeNotification):
                code = notification.Status.value if notification.Status else 0
                if self._failure is None:
                    self._failure = f"subscription ended: {status_name(code)}"

    def _push(self, reading: Reading) -> None:
        overflow = self._overflow
        if not overflow:
            try:
                self._queue.put_nowait(reading)
                return
            except asyncio.QueueFull:
                pass
        # Once coalescing, everything goes here until the consumer drains it,
        # so a tag's values are never reordered.
        tag = reading.tag
        if tag in overflow:
            self._dropped[tag] = self._dropped.get(tag, 0) + 1
            self.coalesced += 1
        overflow[tag] = reading

    def _drain(self, first: Reading | None) -> list[Reading]:
        out = [] if first is None else [first]
        queue = self._queue
        while True:
            try:
                out.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        if self._overflow:
            dropped = self._dropped
            for tag, r in self._overflow.items():
                count = dropped.get(tag)
                out.append(coalesced(r, count) if count else r)
            now = time.monotonic()
            if dropped and now - self._coalesce_logged > 10.0:
                self._coalesce_logged = now
                self.log.warning(
                    "opcua notifications coalesced",
                    dropped=sum(dropped.values()),
                    tags=len(dropped),
                    total_dropped=self.coalesced,
                )
            self._overflow.clear()
            dropped.clear()
        return out


def coalesced(r: Reading, count: int) -> Reading:
    """The reading that stands for ``count`` dropped notifications and itself."""
    status = f"coalesced: {count} notifications dropped"
    if isinstance(r.status, int):
        status += f"; status 0x{r.status:08X}"
    elif r.status is not None:
        status += f"; {r.status}"
    return Reading(r.tag, r.val, BAD if r.q == BAD else UNCERTAIN, status, r.src_ts, r.unit)


def _why(why: int | str) -> str:
    return status_name(why) if isinstance(why, int) else why
