"""End-to-end tests of the OPC UA bioreactor simulator with a real asyncua client."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from simulators.bioreactor import NAMESPACE_URI, NODES, BioreactorSimulator

REPO = Path(__file__).resolve().parents[1]
UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"
CONNECT_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError, ua.UaError)


def unit_id(code: str) -> int:
    return int.from_bytes(code.encode(), "big")


@asynccontextmanager
async def simulator(**kwargs: Any) -> AsyncIterator[BioreactorSimulator]:
    sim = BioreactorSimulator(port=0, **kwargs)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@asynccontextmanager
async def client(url: str, **setup: Any) -> AsyncIterator[Client]:
    c = Client(url, timeout=3)
    if "user" in setup:
        c.set_user(setup["user"])
        c.set_password(setup["password"])
    if "user_cert" in setup:
        await c.load_client_certificate(str(setup["user_cert"]))
        await c.load_private_key(str(setup["user_key"]))
    if "cert" in setup:
        await c.set_security(
            SecurityPolicyBasic256Sha256,
            str(setup["cert"]),
            str(setup["key"]),
            server_certificate=str(setup["server_cert"]),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
    await c.connect()
    try:
        yield c
    finally:
        # The server may be gone already (restart tests).
        try:
            await asyncio.wait_for(c.disconnect(), 3)
        except Exception:
            c.disconnect_socket()


async def resolve(c: Client, tag: str) -> ua.NodeId:
    """NODES uses ``nsu=`` NodeIds; asyncua wants the namespace index resolved first."""
    idx = await c.get_namespace_index(NAMESPACE_URI)
    return ua.NodeId(NODES[tag].split(";s=", 1)[1], idx)


async def read(c: Client, tag: str) -> ua.DataValue:
    node = c.get_node(await resolve(c, tag))
    return await node.read_data_value(raise_on_bad_status=False)


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def shared() -> AsyncIterator[BioreactorSimulator]:
    """A simulator the tests below only read from."""
    async with simulator(time_scale=3600, update_interval=0.05) as sim:
        yield sim


# ------------------------------------------------------------ address space
async def test_browse_finds_functional_units(shared: BioreactorSimulator) -> None:
    assert shared.endpoint == f"opc.tcp://127.0.0.1:{shared.port}/bioreactor"
    async with client(shared.endpoint) as c:
        idx = await c.get_namespace_index(NAMESPACE_URI)
        assert idx == shared.namespace_index >= 2
        bioreactor = await c.nodes.objects.get_child(f"{idx}:Bioreactor")
        names = {(await n.read_browse_name()).Name for n in await bioreactor.get_children()}
        assert {"Temperature", "pH", "DO", "Agitation", "Gassing", "Feed", "Analytics"} <= names
        assert {"Manufacturer", "Model", "SerialNumber"} <= names
        model = await (await bioreactor.get_child(f"{idx}:Model")).read_value()
        assert "STR-10" in model.Text
        gassing = await bioreactor.get_child(f"{idx}:Gassing")
        flows = {(await n.read_browse_name()).Name for n in await gassing.get_children()}
        assert flows == {"O2Flow", "AirFlow", "CO2Flow"}
        analytics = await bioreactor.get_child(f"{idx}:Analytics")
        assert {(await n.read_browse_name()).Name for n in await analytics.get_children()} == {
            "VCD", "Viability", "Glucose", "Lactate", "Volume", "BaseAdded"
        }  # fmt: skip
        temp = await bioreactor.get_child([f"{idx}:Temperature", f"{idx}:CurrentValue"])
        assert temp.nodeid == await resolve(c, "temperature")
        assert await temp.read_type_definition() == ua.NodeId(ua.ObjectIds.AnalogItemType)
        setpoint = c.get_node(await resolve(c, "temperature_sp"))
        assert ua.AccessLevel.CurrentWrite in await setpoint.get_access_level()
        assert ua.AccessLevel.CurrentWrite not in await temp.get_access_level()


async def test_every_node_readable_with_units(shared: BioreactorSimulator) -> None:
    async with client(shared.endpoint) as c:
        for tag, nodeid in NODES.items():
            assert nodeid.startswith(f"nsu={NAMESPACE_URI};s=Bioreactor.")
            node = c.get_node(await resolve(c, tag))
            dv = await node.read_data_value()
            assert dv.StatusCode is not None and dv.StatusCode.is_good(), tag
            assert dv.Value is not None and dv.Value.VariantType == ua.VariantType.Double, tag
            assert dv.SourceTimestamp is not None and dv.ServerTimestamp is not None, tag
            age = dt.datetime.now(dt.UTC) - dv.SourceTimestamp.replace(tzinfo=dt.UTC)
            assert abs(age.total_seconds()) < 5, tag
            eu = await (await node.get_child("0:EngineeringUnits")).read_value()
            assert isinstance(eu, ua.EUInformation), tag
            assert eu.NamespaceUri == UNECE and eu.DisplayName.Text, tag
            rng = await (await node.get_child("0:EURange")).read_value()
            assert isinstance(rng, ua.Range) and rng.Low < rng.High, tag
            if not tag.endswith(("_sp", "_max")):  # setpoints sit inside too
                assert rng.Low <= dv.Value.Value <= rng.High, tag
        units = {}
        for tag in (
            "temperature",
            "pH",
            "DO",
            "agitation",
            "O2_flow",
            "glucose",
            "feed_rate",
            "VCD",
        ):
            node = c.get_node(await resolve(c, tag))
            eu = await (await node.get_child("0:EngineeringUnits")).read_value()
            units[tag] = (eu.UnitId, eu.DisplayName.Text)
        assert units["temperature"] == (unit_id("CEL"), "°C")
        assert units["DO"] == (unit_id("P1"), "%")
        assert units["agitation"] == (unit_id("RPM"), "r/min")
        assert units["O2_flow"] == (unit_id("L2"), "l/min")
        assert units["glucose"] == (unit_id("GL"), "g/l")
        assert units["feed_rate"] == (unit_id("G55"), "ml/h")
        assert units["pH"] == (unit_id("Q30"), "pH")
        assert units["VCD"] == (-1, "1e6 cells/mL")


async def test_values_move_with_time(shared: BioreactorSimulator) -> None:
    async with client(shared.endpoint) as c:
        first = {tag: await read(c, tag) for tag in ("VCD", "DO", "temperature", "glucose")}
        elapsed = shared.model.state.elapsed_s
        await asyncio.sleep(0.6)  # ~36 simulated minutes
        second = {tag: await read(c, tag) for tag in first}
        assert shared.model.state.elapsed_s - elapsed > 900
        for tag in first:
            assert second[tag].SourceTimestamp > first[tag].SourceTimestamp, tag
            assert second[tag].Value.Value != first[tag].Value.Value, tag
        assert second["VCD"].Value.Value > first["VCD"].Value.Value * 0.97  # growing, +-noise


async def test_subscription_sees_updates_and_history(shared: BioreactorSimulator) -> None:
    received: list[float] = []

    class Handler:
        def datachange_notification(self, node: Any, val: float, data: Any) -> None:
            received.append(val)

    async with client(shared.endpoint) as c:
        sub = await c.create_subscription(50, Handler())
        await sub.subscribe_data_change(c.get_node(await resolve(c, "temperature")))

        async def enough() -> bool:
            return len(received) >= 5

        await eventually(enough)
        await sub.delete()
    served = {snap["temperature"] for _, snap in shared.history}
    assert set(received[1:]) <= served
    stamps = [t for t, _ in shared.history]
    assert stamps == sorted(stamps) and stamps[-1] <= time.time()
    assert shared.history.maxlen == 5000
    assert set(shared.values()) == set(NODES)


# ----------------------------------------------------------------- setpoints
async def test_setpoint_write_moves_the_process() -> None:
    async with (
        simulator(time_scale=3600, update_interval=0.05) as sim,
        client(sim.endpoint) as c,
    ):
        await asyncio.sleep(0.3)  # past the warm-up (~20 simulated minutes)
        sp = c.get_node(await resolve(c, "temperature_sp"))
        await sp.write_value(ua.DataValue(ua.Variant(33.0, ua.VariantType.Double)))
        assert sim.model.setpoints["temperature"] == 33.0  # applied at once
        assert await sp.read_value() == 33.0

        async def cooled() -> bool:
            return (await read(c, "temperature")).Value.Value < 33.5

        await eventually(cooled)
        assert (await read(c, "temperature_sp")).Value.Value == 33.0
        # Out of range: refused, nothing changes.
        with pytest.raises(ua.uaerrors.BadOutOfRange):
            await sp.write_value(ua.DataValue(ua.Variant(80.0, ua.VariantType.Double)))
        assert sim.model.setpoints["temperature"] == 33.0 and await sp.read_value() == 33.0
        with pytest.raises(ua.uaerrors.BadTypeMismatch):
            await sp.write_value(ua.DataValue(ua.Variant(34.0, ua.VariantType.Float)))
        measured = c.get_node(await resolve(c, "temperature"))
        with pytest.raises(ua.UaStatusCodeError):
            await measured.write_value(ua.DataValue(ua.Variant(20.0, ua.VariantType.Double)))
        # Other setpoints reach the model too.
        do_sp = c.get_node(await resolve(c, "DO_sp"))
        await do_sp.write_value(ua.DataValue(ua.Variant(55.0, ua.VariantType.Double)))
        assert sim.model.setpoints["do"] == 55.0 and sim.values()["DO_sp"] == 55.0


# -------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
async def faulty_sim() -> AsyncIterator[BioreactorSimulator]:
    async with simulator(time_scale=3600, update_interval=0.05) as sim:
        await asyncio.sleep(0.3)  # past the temperature warm-up
        yield sim


@pytest.fixture
async def faulty(faulty_sim: BioreactorSimulator) -> AsyncIterator[BioreactorSimulator]:
    """The fault tests' simulator, faults cleared after each test."""
    yield faulty_sim
    faulty_sim.set_fault(None)
    await asyncio.sleep(0.1)


async def test_fault_stall(faulty: BioreactorSimulator) -> None:
    async with client(faulty.endpoint) as c:
        faulty.set_fault("stall", "temperature")
        await asyncio.sleep(0.1)
        a, other_a = await read(c, "temperature"), await read(c, "pH")
        await asyncio.sleep(0.3)
        b, other_b = await read(c, "temperature"), await read(c, "pH")
        assert (a.Value.Value, a.SourceTimestamp) == (b.Value.Value, b.SourceTimestamp)
        assert other_b.SourceTimestamp > other_a.SourceTimestamp
        assert faulty.faults == {"temperature": "stall"}
        faulty.set_fault(None, "temperature")
        await asyncio.sleep(0.2)
        assert (await read(c, "temperature")).SourceTimestamp > b.SourceTimestamp
        # Whole-device stall: every timestamp freezes.
        faulty.set_fault("stall")
        await asyncio.sleep(0.1)
        frozen = {tag: (await read(c, tag)).SourceTimestamp for tag in NODES}
        await asyncio.sleep(0.3)
        assert {tag: (await read(c, tag)).SourceTimestamp for tag in NODES} == frozen
        faulty.set_fault(None)
        await asyncio.sleep(0.2)
        assert (await read(c, "VCD")).SourceTimestamp > frozen["VCD"]


async def test_fault_bad_status(faulty: BioreactorSimulator) -> None:
    async with client(faulty.endpoint) as c:
        before = faulty.values()["DO"]
        faulty.set_fault("bad_status", "DO")
        await asyncio.sleep(0.2)
        dv = await read(c, "DO")
        assert dv.StatusCode == ua.StatusCode(ua.StatusCodes.BadSensorFailure)
        assert dv.Value is None or dv.Value.Value is None  # never a fake good value
        assert (await read(c, "pH")).StatusCode.is_good()
        assert faulty.values()["DO"] == before
        with pytest.raises(ua.uaerrors.BadSensorFailure):
            await c.get_node(await resolve(c, "DO")).read_value()
        faulty.set_fault(None, "DO")
        await asyncio.sleep(0.2)
        dv = await read(c, "DO")
        assert dv.StatusCode.is_good() and 0 < dv.Value.Value < 200
        faulty.set_fault("bad_status")
        await asyncio.sleep(0.2)
        statuses = [(await read(c, tag)).StatusCode for tag in NODES]
        bad = ua.StatusCode(ua.StatusCodes.BadSensorFailure)
        assert all(status == bad for status in statuses)
        faulty.set_fault(None)
        await asyncio.sleep(0.2)
        statuses = [(await read(c, tag)).StatusCode for tag in NODES]
        assert all(status.is_good() for status in statuses)


async def test_fault_drift(faulty: BioreactorSimulator) -> None:
    async with client(faulty.endpoint) as c:
        faulty.set_fault("drift", "temperature")
        await asyncio.sleep(1.2)  # ~1.2 simulated hours at 0.5 °C/h
        offset = faulty.values()["temperature"] - faulty.model.state.temperature
        assert 0.3 < offset < 1.2
        assert (await read(c, "temperature")).Value.Value > 37.3
        assert abs(faulty.model.state.temperature - 37.0) < 0.3  # the process is fine
        faulty.set_fault(None, "temperature")
        await asyncio.sleep(0.2)
        assert abs((await read(c, "temperature")).Value.Value - 37.0) < 0.3


async def test_fault_out_of_range(faulty: BioreactorSimulator) -> None:
    async with client(faulty.endpoint) as c:
        faulty.set_fault("out_of_range", "pH")
        await asyncio.sleep(0.2)
        high = (
            await (await c.get_node(await resolve(c, "pH")).get_child("0:EURange")).read_value()
        ).High
        assert (await read(c, "pH")).Value.Value > high
        faulty.set_fault("out_of_range")  # every measured tag, setpoints untouched
        await asyncio.sleep(0.2)
        assert (await read(c, "VCD")).Value.Value > 100.0
        assert (await read(c, "pH_sp")).Value.Value == 7.0
        assert "pH_sp" not in faulty.faults
        faulty.set_fault(None)
        await asyncio.sleep(0.2)
        assert 6.8 < (await read(c, "pH")).Value.Value < 7.3


def test_fault_arguments_checked() -> None:
    sim = BioreactorSimulator()
    with pytest.raises(ValueError):
        sim.set_fault("melt")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sim.set_fault("stall", "no_such_tag")
    sim.set_fault("drift", "VCD")  # allowed before start
    assert sim.faults == {"VCD": "drift"}


# ------------------------------------------------------------------- restart
async def test_restart_breaks_session_and_rebinds_same_port() -> None:
    async with simulator(time_scale=3600, update_interval=0.05) as sim:
        port = sim.port
        async with client(sim.endpoint) as old:
            assert (await read(old, "VCD")).StatusCode.is_good()
            await sim.stop()
            with pytest.raises(CONNECT_ERRORS):
                await read(old, "VCD")
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
            vcd = sim.values()["VCD"]
            await sim.start()
            assert sim.port == port
            with pytest.raises(CONNECT_ERRORS):
                await read(old, "VCD")  # the old session does not come back
            async with client(sim.endpoint) as new:
                assert (await read(new, "VCD")).StatusCode.is_good()
        with pytest.raises(RuntimeError):
            await sim.start()
        t0 = time.monotonic()
        await sim.restart(0.3)
        assert time.monotonic() - t0 < 3.0
        async with client(sim.endpoint) as again:
            assert (await read(again, "VCD")).Value.Value != vcd  # model kept running


# ------------------------------------------------------------------ security
@pytest.fixture(scope="module")
def client_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A client application certificate made with asyncua's own helper."""
    work = tmp_path_factory.mktemp("client-pki")

    async def make() -> tuple[Path, Path]:
        return await Client("opc.tcp://unused").setup_self_signed_certificate(
            work / "client_key.pem", work / "client_cert.der"
        )

    return asyncio.run(make())


async def test_username_over_sign_and_encrypt(
    client_cert: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = client_cert
    async with simulator(
        security=("Basic256Sha256_SignAndEncrypt",), users={"op": "secret"}, cert_dir=tmp_path
    ) as sim:
        url = sim.endpoint
        endpoints = await Client(url, timeout=3).connect_and_get_server_endpoints()
        assert [(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints] == [
            (SecurityPolicyBasic256Sha256.URI, ua.MessageSecurityMode.SignAndEncrypt)
        ]
        tokens = {t.TokenType for t in endpoints[0].UserIdentityTokens}
        assert tokens == {ua.UserTokenType.UserName}
        assert endpoints[0].ServerCertificate == sim.server_certificate.read_bytes()

        secure = {"cert": cert, "key": key, "server_cert": sim.server_certificate}
        async with client(url, user="op", password="secret", **secure) as c:
            assert (await read(c, "temperature")).StatusCode.is_good()
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with client(url, user="op", password="wrong", **secure):
                pass
        with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
            async with client(url, **secure):  # anonymous, encrypted
                pass
        # Anonymous over an unsecured channel: asyncua's client already refuses
        # (no such endpoint) ...
        with pytest.raises(ua.UaError):
            async with client(url):
                pass
        # ... and so does the server when a client insists on a None channel.
        monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda eps, *_: eps[0]))
        with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
            async with client(url):
                pass
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with client(url, user="op", password="secret"):
                pass
        der = sim.server_certificate.read_bytes()
        await sim.restart(0.1)
        assert sim.server_certificate.read_bytes() == der
    # A new simulator on the same cert_dir reuses the certificate too.
    again = BioreactorSimulator(cert_dir=tmp_path)
    await again.start()
    try:
        assert again.server_certificate.read_bytes() == der
    finally:
        await again.stop()


async def test_trusted_client_certificates(client_cert: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = client_cert
    other = Client("opc.tcp://unused")
    other_cert, other_key = await other.setup_self_signed_certificate(
        tmp_path / "other_key.pem", tmp_path / "other_cert.der", host_name="elsewhere"
    )
    async with simulator(
        security=("None", "Basic256Sha256_SignAndEncrypt"), trusted_client_certs=[cert]
    ) as sim:
        async with client(
            sim.endpoint, cert=cert, key=key, server_cert=sim.server_certificate
        ) as c:
            assert (await read(c, "pH")).StatusCode.is_good()
        with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
            async with client(
                sim.endpoint, cert=other_cert, key=other_key, server_cert=sim.server_certificate
            ):
                pass
        async with client(sim.endpoint) as plain:  # "None" is offered: anonymous works
            assert (await read(plain, "pH")).StatusCode.is_good()
        # X509 user tokens: only trusted certificates.
        async with client(sim.endpoint, user_cert=cert, user_key=key) as by_cert:
            assert (await read(by_cert, "pH")).StatusCode.is_good()
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with client(
                sim.endpoint,
                cert=cert,
                key=key,
                server_cert=sim.server_certificate,
                user_cert=other_cert,
                user_key=other_key,
            ):
                pass


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        BioreactorSimulator(security=("Basic128Rsa15_Sign",))
    with pytest.raises(ValueError):
        BioreactorSimulator(security=())
    with pytest.raises(ValueError):
        BioreactorSimulator(update_interval=0)
    with pytest.raises(ValueError):
        BioreactorSimulator(allow_anonymous=False)  # nobody could log in


# --------------------------------------------------------------------- scale
async def test_extra_variables_at_scale() -> None:
    t0 = time.monotonic()
    async with simulator(time_scale=60, update_interval=0.2, extra_variables=5000) as sim:
        assert time.monotonic() - t0 < 10.0
        assert len(sim.scale_nodes) == 5000
        async with client(sim.endpoint) as c:
            idx = await c.get_namespace_index(NAMESPACE_URI)
            nodes = [ua.NodeId(f"Scale.V{i:05d}", idx) for i in range(5000)]
            params = ua.ReadParameters()
            params.NodesToRead = [
                ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value) for n in nodes
            ]
            first = await c.uaclient.read(params)
            assert len(first) == 5000
            assert all(dv.StatusCode.is_good() and dv.SourceTimestamp for dv in first)
            await asyncio.sleep(0.5)
            second = await c.uaclient.read(params)
            moved = sum(a.Value.Value != b.Value.Value for a, b in zip(first, second, strict=True))
            assert moved > 4900
            scale = await c.nodes.objects.get_child(f"{idx}:Scale")
            assert len(await scale.get_children()) == 50  # blocks of 100


# ----------------------------------------------------------------------- CLI
async def _readline(stream: asyncio.StreamReader, timeout: float = 20.0) -> str:
    return (await asyncio.wait_for(stream.readline(), timeout)).decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_main_runs_until_signal(sig: signal.Signals) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.bioreactor",
        "--port",
        "0",
        "--time-scale",
        "3600",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = await _readline(proc.stdout)
        assert first.startswith("bioreactor simulator listening on opc.tcp://127.0.0.1:"), first
        url = first.rsplit(" ", 1)[1].strip()
        assert url.endswith("/bioreactor")
        assert (await _readline(proc.stdout)).startswith("server certificate: ")
        async with client(url) as c:
            assert (await read(c, "glucose")).StatusCode.is_good()
            proc.stdin.write(b"values\n")
            values = json.loads(await _readline(proc.stdout))
            assert set(values) == set(NODES)
            proc.stdin.write(b"fault bad_status glucose\n")
            assert (await _readline(proc.stdout)).startswith("ok: fault bad_status glucose")
            await asyncio.sleep(0.4)
            dv = await read(c, "glucose")
            assert dv.StatusCode == ua.StatusCode(ua.StatusCodes.BadSensorFailure)
            proc.stdin.write(b"fault off\nbogus\n")
            assert (await _readline(proc.stdout)).startswith("ok: fault off")
            assert (await _readline(proc.stdout)).startswith("commands:")
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        assert time.monotonic() - t0 < 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
