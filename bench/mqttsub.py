"""A minimal MQTT 3.1.1 subscriber for the harness: QoS 1, persistent session, reconnects.

Why not paho (what ``gateway tail``/``verify`` use): paho through the asyncio
loop handles one packet per readable event and registers a writer for each
PUBACK, about 150 µs per message here; the subscriber would then be the limit
of a run (the Node-RED variant with one message per record sends tens of
thousands per second). This one reads the socket in large chunks, parses every
packet in them and answers all their PUBACKs with one write, and stamps each
chunk's arrival time once, before any decoding or verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable

OnMessage = Callable[[int, str, bytes], None]  # (arrival ns, topic, payload)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


async def _session(
    port: int, topic: str, client_id: str, on_message: OnMessage, on_ready: Callable[[], None]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        # CONNECT: protocol level 4, clean session off (the broker keeps our
        # subscription and queues for us across a reconnect), keepalive 60 s.
        connect = _str("MQTT") + bytes([4, 0x00]) + struct.pack(">H", 60) + _str(client_id)
        writer.write(_packet(0x10, connect))
        head = await reader.readexactly(4)
        if head[0] != 0x20 or head[3] != 0:
            raise ConnectionError(f"broker refused the connection: CONNACK {head.hex()}")
        writer.write(_packet(0x82, struct.pack(">H", 1) + _str(topic) + b"\x01"))
        await writer.drain()
        ping = asyncio.get_running_loop().time()
        buf = bytearray()
        ready = False
        while True:
            chunk = await reader.read(1 << 20)
            if not chunk:
                raise ConnectionError("broker closed the connection")
            now = time.time_ns()
            buf += chunk
            acks = bytearray()
            i, n = 0, len(buf)
            while n - i >= 2:
                # remaining length: 1..4 bytes of 7 bits each
                length, mult, j, complete = 0, 1, i + 1, False
                while j < n and j < i + 5:
                    b = buf[j]
                    j += 1
                    length += (b & 0x7F) * mult
                    mult <<= 7
                    if not b & 0x80:
                        complete = True
                        break
                if not complete:
                    break
                end = j + length
                if end > n:
                    break
                kind = buf[i] >> 4
                if kind == 3:
                    qos = (buf[i] >> 1) & 3
                    tl = (buf[j] << 8) | buf[j + 1]
                    t = buf[j + 2 : j + 2 + tl].decode()
                    k = j + 2 + tl
                    if qos:
                        acks += b"\x40\x02" + buf[k : k + 2]
                        k += 2
                    on_message(now, t, bytes(buf[k:end]))
                elif kind == 9 and not ready:  # SUBACK
                    ready = True
                    on_ready()
                i = end
            del buf[:i]
            if acks:
                writer.write(acks)
            loop_now = asyncio.get_running_loop().time()
            if loop_now - ping > 20:
                writer.write(b"\xc0\x00")
                ping = loop_now
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def subscribe(
    port: int,
    topic: str,
    client_id: str,
    on_message: OnMessage,
    stop: asyncio.Event,
    on_ready: Callable[[], None],
) -> None:
    """Receive until ``stop`` is set, reconnecting (every 0.2 s) while the broker is away."""
    while not stop.is_set():
        task = asyncio.create_task(_session(port, topic, client_id, on_message, on_ready))
        halt = asyncio.create_task(stop.wait())
        await asyncio.wait({task, halt}, return_when=asyncio.FIRST_COMPLETED)
        halt.cancel()
        if not task.done():
            task.cancel()
        gone = (asyncio.CancelledError, OSError, ConnectionError, asyncio.IncompleteReadError)
        with contextlib.suppress(*gone):
            await task
        if not stop.is_set():
            await asyncio.sleep(0.2)
