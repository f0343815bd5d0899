"""paho-mqtt driven from the asyncio event loop (no paho thread).

paho's ``loop_start`` thread costs about 1.5x the CPU of driving its socket
ourselves, and sharing paho state between its thread and the loop invites
races. Here the loop watches paho's socket (``add_reader``/``add_writer``) and
calls ``loop_read``/``loop_write``; a 1 s timer calls ``loop_misc`` for
keep-alives. Only the blocking TCP/TLS connect runs in a worker thread, and the
socket callbacks paho fires from there are marshalled back onto the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import BrokerSection
from gateway.errors import ConfigError, GatewayError


class _PackedOnce(Properties):
    """Publish properties that never change after the first use: paho packs the
    properties of every PUBLISH anew (a loop over all property names), which
    costs more per message than the rest of building the packet."""

    _packed: bytes | None = None

    def pack(self) -> bytes:
        packed = self._packed
        if packed is None:
            packed = super().pack()  # type: ignore[no-untyped-call]
            # Properties.__setattr__ accepts only MQTT property names.
            object.__setattr__(self, "_packed", packed)
        return packed


class MqttError(GatewayError):
    """The broker refused us or the connection failed."""


def tls_context(broker: BrokerSection) -> ssl.SSLContext | None:
    """Client TLS context: CA verification always on, optional client certificate."""
    tls = broker.tls
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"broker.tls: cannot load certificates: {exc}") from exc
    return ctx


def _set_cork(sock: Any, on: bool) -> bool:
    """TCP_CORK on or off (Linux); False where the socket or platform has none."""
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1 if on else 0)
    except (OSError, AttributeError, ValueError):
        return False
    return True


class AsyncMqtt:
    """One paho client whose network I/O runs on the asyncio loop."""

    def __init__(
        self,
        broker: BrokerSection,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        max_inflight: int = 1000,
        session_expiry: int = 0,
    ) -> None:
        self.broker = broker
        self.v5 = broker.protocol == "5"
        # session_expiry > 0: the broker keeps our subscriptions and queues QoS 1
        # messages while we are away (subscribers that must not miss anything).
        self.session_expiry = session_expiry
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else session_expiry == 0,
        )
        c = self.client
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        if broker.username is not None:
            c.username_pw_set(broker.username, broker.secret_password())
        ctx = tls_context(broker)
        if ctx is not None:
            c.tls_set_context(ctx)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        self.on_publish: Callable[[int, bool, str], None] = lambda mid, ok, why: None
        self.on_message: Callable[[paho.MQTTMessage], None] = lambda msg: None
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._subacks: dict[int, asyncio.Future[None]] = {}
        c.on_message = lambda _c, _u, msg: self.on_message(msg)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._sock: socket.socket | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._connack: asyncio.Future[None] | None = None
        self.disconnected = asyncio.Event()
        self.disconnect_reason = ""
        self._props: dict[str, Properties] = {}

    # -- connecting -----------------------------------------------------------------
    async def connect(self, timeout: float = 10.0) -> None:
        """Open the session; raises MqttError with the broker's reason on refusal."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._connack = self._loop.create_future()
        self.disconnected.clear()
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry
        b = self.broker
        try:
            # asyncio.timeout rather than wait_for, which on 3.11 can swallow a
            # cancellation that races completion (seen with pymodbus here).
            async with asyncio.timeout(timeout):
                await asyncio.to_thread(
                    self.client.connect,
                    b.host,
                    b.port,
                    keepalive=b.keepalive,
                    clean_start=self.session_expiry == 0
                    if self.v5
                    else paho.MQTT_CLEAN_START_FIRST_ONLY,
                    properties=props,
                )
            async with asyncio.timeout(timeout):
                await self._connack
        except TimeoutError as exc:
            self.close()
            raise MqttError(f"broker {b.host}:{b.port}: no answer within {timeout:g} s") from exc
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.close()
            raise MqttError(f"broker {b.host}:{b.port}: {exc}") from exc
        self._schedule_misc()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        fut = self._connack
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(MqttError(f"broker refused the connection: {reason}"))
        else:
            fut.set_result(None)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.disconnect_reason = str(reason)
        self.disconnected.set()
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_exception(MqttError(f"broker closed the connection: {reason}"))

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        self.on_publish(mid, not reason.is_failure, str(reason))

    # -- socket plumbing (paho calls these; maybe from the connect thread) -----------
    def _in_loop(self, fn: Callable[[], None]) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _on_socket_open(self, _c: Any, _u: Any, sock: Any) -> None:
        def watch() -> None:
            assert self._loop is not None
            self._sock = sock
            self._loop.add_reader(sock, self._readable)

        self._in_loop(watch)

    def _on_socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        def unwatch() -> None:
            assert self._loop is not None
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            if self._sock is sock:
                self._sock = None

        self._in_loop(unwatch)

    def _on_register_write(self, _c: Any, _u: Any, sock: Any) -> None:
        def watch() -> None:
            assert self._loop is not None
            if self._sock is not None and self._sock is sock:
                self._loop.add_writer(sock, self._writable)

        self._in_loop(watch)

    def _on_unregister_write(self, _c: Any, _u: Any, sock: Any) -> None:
        def unwatch() -> None:
            assert self._loop is not None
            self._loop.remove_writer(sock)

        self._in_loop(unwatch)

    def _readable(self) -> None:
        self.client.loop_read()

    def _writable(self) -> None:
        # paho sends each queued packet with its own send(); corked, the
        # kernel pushes them as one segment: one trip through the TCP stack
        # and one wake-up of the broker per batch instead of per message.
        sock = self._sock
        corked = sock is not None and _set_cork(sock, True)
        try:
            self.client.loop_write()
        finally:
            if corked and self._sock is sock:
                _set_cork(sock, False)

    def _schedule_misc(self) -> None:
        assert self._loop is not None

        def tick() -> None:
            if self.client.socket() is None:
                self._misc = None
                return
            self.client.loop_misc()
            self._schedule_misc()

        self._misc = self._loop.call_later(1.0, tick)

    # -- using the session ---------------------------------------------------------
    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, content_type: str | None = None
    ) -> int:
        """Queue a QoS 1 publish; returns its message id (acked via ``on_publish``)."""
        props = None
        if self.v5 and content_type is not None:
            # One Properties per content type: building it per message costs
            # more than the rest of paho's publish. paho only reads it.
            props = self._props.get(content_type)
            if props is None:
                props = _PackedOnce(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ContentType = content_type
                self._props[content_type] = props
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return int(info.mid)

    async def subscribe(self, topic: str, timeout: float = 10.0) -> None:
        """Subscribe at QoS 1 and wait for the broker's SUBACK."""
        assert self._loop is not None
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"subscribe to {topic} failed: {paho.error_string(rc)}")
        assert mid is not None
        fut = self._subacks[mid] = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError as exc:
            raise MqttError(f"subscribe to {topic}: no SUBACK within {timeout:g} s") from exc
        finally:
            self._subacks.pop(mid, None)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _props: Any) -> None:
        fut = self._subacks.get(mid)
        if fut is None or fut.done():
            return
        bad = [r for r in reasons if r.is_failure]
        if bad:
            fut.set_exception(MqttError(f"broker refused the subscription: {bad[0]}"))
        else:
            fut.set_result(None)

    def disconnect(self) -> None:
        """Clean MQTT DISCONNECT (the Last Will is not sent)."""
        if self.client.socket() is not None:
            self.client.disconnect()
            # paho queues DISCONNECT; write it now since the loop may stop soon.
            self.client.loop_write()

    def close(self) -> None:
        """Drop the connection without a DISCONNECT packet."""
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        sock = self.client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        self._sock = None
        with contextlib.suppress(Exception):  # already closed is fine
            self.client._sock_close()  # no public "drop the socket" in paho 2.x
        self.disconnected.set()
