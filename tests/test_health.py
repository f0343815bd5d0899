"""The health endpoint (/healthz, /readyz, /metrics) and `gateway status`, against real parts.

A real gateway on this event loop, a real Mosquitto and the off-gas simulator;
the HTTP requests are raw bytes over TCP, `gateway status` a real process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load_config
from gateway.daemon import Gateway
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto, free_port
from tests.support.collector import Collector
from tests.support.gateway import Device, GatewaySpec, running


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body) or request.startswith(b"HEAD")
    return int(lines[0].split(" ")[1]), headers, body


async def get(port: int, path: str) -> tuple[int, bytes]:
    status, _, body = await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return status, body


def samples(text: bytes) -> dict[tuple[str, str], float]:
    """(sample name, first label value or '') -> value."""
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, next(iter(s.labels.values()), ""))] = s.value
    return out


async def until_status(port: int, path: str, want: int, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    body = b""
    while time.monotonic() < deadline:
        status, body = await get(port, path)
        if status == want:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never answered {want}; last body: {body.decode()}")


async def gateway_status(port: int) -> tuple[int, str]:
    """`gateway status --url …` as a real process (the loop keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "status",
        "--url",
        f"http://127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def port_of(gw: Gateway) -> int:
    assert gw.health_port is not None and gw.health_port > 0
    return gw.health_port


async def test_health_ready_metrics_and_status_show_real_figures(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    dead = free_port()  # nothing listens there: this device is known down
    spec = GatewaySpec(
        tmp_path / "state",
        broker.port,
        [Device("offgas", sim.port), Device("nobody", dead, timeout=0.2)],
    )
    async with Collector(broker.port) as col, running(spec.config()) as gw:
        port = port_of(gw)
        assert await get(port, "/healthz") == (200, b"ok\n")

        body = json.loads(await until_status(port, "/readyz", 200))
        assert body["ready"] and body["reasons"] == []
        assert body["devices"]["offgas"]["state"] == "acquiring"
        assert body["devices"]["nobody"]["state"] == "down"
        assert "offline" in body["devices"]["nobody"]["detail"]

        status, first = await get(port, "/metrics")
        assert status == 200
        await asyncio.sleep(1.0)
        _, second = await get(port, "/metrics")
        m1, m2 = samples(first), samples(second)
        assert gw.outbox is not None
        # Records and reads grow at the poll rate (0.1 s): about 10 cycles a second.
        assert (
            m2[("gateway_device_records_total", "offgas")]
            > m1[("gateway_device_records_total", "offgas")]
        )
        reads = (
            m2[("gateway_device_reads_total", "offgas")]
            - m1[("gateway_device_reads_total", "offgas")]
        )
        assert 5 <= reads <= 15, reads
        # One consistent snapshot: every record of the stream is sealed, so its
        # seq equals the records produced (no gap in a fresh outbox).
        seq = m2[("gateway_chain_seq", "offgas")]
        assert seq == m2[("gateway_device_records_total", "offgas")]
        assert seq <= gw.outbox.chain.head("offgas")[0]
        # The gateway's own stream (configuration audit events) is there too.
        assert m2[("gateway_chain_seq", "$gateway")] == gw.outbox.chain.head("$gateway")[0] >= 1
        assert m2[("gateway_device_up", "offgas")] == 1 and m2[("gateway_device_up", "nobody")] == 0
        assert m2[("gateway_device_failures_total", "nobody")] >= 1
        assert m2[("gateway_device_errors_total", "offgas")] == 0
        assert m2[("gateway_device_last_good_read_age_seconds", "offgas")] < 1.0
        assert ("gateway_device_last_good_read_age_seconds", "nobody") not in m2
        assert m2[("gateway_broker_connected", "")] == 1
        assert (
            m2[("gateway_publisher_published_total", "")]
            >= m2[("gateway_publisher_acked_total", "")]
            > 0
        )
        assert m2[("gateway_ready", "")] == 1
        assert m2[("gateway_outbox_max_bytes", "")] == 1 << 30
        assert m2[("process_resident_memory_bytes", "")] > 10e6
        # The seq scraped is a record that really reaches subscribers.
        await col.wait_for(lambda: any(r["seq"] == seq for r in col.of("offgas")), what="seq")

        code, text = await gateway_status(port)
        assert code == 0, text
        assert ": READY" in text
        lines = {line.split()[0]: line for line in text.splitlines() if line.split()}
        assert lines["offgas"].split()[1] == "acquiring"
        assert lines["nobody"].split()[1] == "down"
        assert "broker   connected" in text

        # The server's edges: HEAD, unknown paths, other methods, oversized heads.
        status, headers, body = await http(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert (status, body, headers["Content-Length"]) == (200, b"", "3")
        assert (await get(port, "/nope"))[0] == 404
        status, headers, _ = await http(port, b"POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        big = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n"
        assert (await http(port, big))[0] == 431
        assert (await http(port, b"garbage\r\n\r\n"))[0] == 400
        # The endpoint stays up after all that.
        assert await get(port, "/healthz") == (200, b"ok\n")


async def test_readyz_follows_the_broker_and_status_exit_codes(
    sim: OffGasSimulator, own_broker: Mosquitto, tmp_path: Path
) -> None:
    spec = GatewaySpec(tmp_path / "state", own_broker.port, [Device("offgas", sim.port)])
    async with running(spec.config()) as gw:
        port = port_of(gw)
        await until_status(port, "/readyz", 200)

        own_broker.stop()
        body = json.loads(await until_status(port, "/readyz", 503))
        assert not body["ready"] and body["reasons"][0].startswith("broker not connected")
        # Still alive: the watchdog's rule does not depend on the broker.
        assert await get(port, "/healthz") == (200, b"ok\n")
        await asyncio.sleep(1.0)  # a backlog builds up in the outbox
        _, metrics = await get(port, "/metrics")
        m = samples(metrics)
        assert m[("gateway_broker_connected", "")] == 0
        assert m[("gateway_outbox_messages", "")] >= 5
        assert 0.3 < m[("gateway_outbox_oldest_age_seconds", "")] < 30
        assert m[("gateway_outbox_bytes", "")] > 0
        code, text = await gateway_status(port)
        assert code == 1, text
        assert "NOT READY" in text and "broker not connected" in text

        own_broker.start()
        await until_status(port, "/readyz", 200)
        _, metrics = await get(port, "/metrics")
        assert samples(metrics)[("gateway_broker_reconnects_total", "")] >= 1
        code, _ = await gateway_status(port)
        assert code == 0
    # Gateway gone: unreachable is its own exit status.
    code, text = await gateway_status(port)
    assert code == 3 and "unreachable" in text


async def test_status_finds_the_endpoint_in_the_config_file(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    port = free_port()
    spec = GatewaySpec(tmp_path / "state", broker.port, [Device("offgas", sim.port)])
    # The service's environment has a variable the operator's shell lacks (as
    # with ${CREDENTIALS_DIRECTORY}): `gateway status -c` reads only [health].
    text = (
        spec.toml()
        .replace("[health]\nport = 0", f"[health]\nport = {port}")
        .replace(f"port = {broker.port}", 'port = "${GW_TEST_BROKER_PORT}"')
    )
    config = tmp_path / "gw.toml"
    config.write_text(text)
    cfg = load_config(config, env={"GW_TEST_BROKER_PORT": str(broker.port)})
    async with running(cfg) as gw:
        assert gw.health_port == port
        await until_status(port, "/readyz", 200)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "status", "-c", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()
        assert f"at http://127.0.0.1:{port}: READY" in out.decode()


async def test_a_taken_health_port_leaves_the_gateway_acquiring(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = GatewaySpec(tmp_path / "state", broker.port, [Device("offgas", sim.port)])
        config = tmp_path / "gw.toml"
        config.write_text(spec.toml().replace("[health]\nport = 0", f"[health]\nport = {port}"))
        async with running(load_config(config)) as gw:
            assert gw.health_port is None
            stream = gw.streams["offgas"]
            before = stream.records
            await asyncio.sleep(0.5)
            assert stream.records > before, "acquisition goes on without the endpoint"
            assert gw.ops is not None and gw.ops.live()[0]
