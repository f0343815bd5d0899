"""OPC UA driver against the bioreactor simulator (a real asyncua server) and a real Mosquitto.

The gateway runs in-process (tests/support/gateway.py); records are collected
from the broker and verified. Security, tokens, units and the coalescing path
are exercised on the driver directly, which is faster and says more.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from drivers.opcua import OpcUaDriver
from drivers.opcua.browse import browse, render_config
from drivers.opcua.config import OpcUaDevice
from drivers.opcua.security import ensure_client_identity, fingerprint
from gateway import registry
from gateway.config import load_config
from gateway.driver import Reading
from gateway.errors import DriverError
from gateway.record import Record
from simulators.bioreactor import NAMESPACE_URI, BioreactorSimulator
from tests.support.broker import Mosquitto, free_port
from tests.support.collector import Collector
from tests.support.gateway import running

registry.register("opcua", OpcUaDriver)


TAGS = ("temperature", "pH", "DO")
UNITS = {"temperature": "Cel", "pH": "[pH]", "DO": "%"}
SECURE = [
    ("Basic256Sha256", "Sign"),
    ("Basic256Sha256", "SignAndEncrypt"),
    ("Aes128Sha256RsaOaep", "Sign"),
    ("Aes128Sha256RsaOaep", "SignAndEncrypt"),
    ("Aes256Sha256RsaPss", "Sign"),
    ("Aes256Sha256RsaPss", "SignAndEncrypt"),
]
USERS = {"operator": "op-Pa55word"}


# --- config builders ------------------------------------------------------------


def q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def device_toml(
    dev_id: str,
    endpoint: str,
    tags: dict[str, str],
    *,
    settings: str = "",
    tag_settings: str = "",
    units: dict[str, str] | None = None,
) -> str:
    out = [
        f'[[devices]]\nid = "{dev_id}"\ndriver = "opcua"\nendpoint = {q(endpoint)}\n'
        f"timeout = 2.0\n{settings}"
    ]
    for name, node in tags.items():
        unit = (units or {}).get(name)
        out.append(
            f"[[devices.tags]]\nname = {q(name)}\nnode_id = {q(node)}\n"
            + (f"unit = {q(unit)}\n" if unit else "")
            + tag_settings
        )
    return "\n".join(out)


def write_config(tmp_path: Path, broker_port: int, *devices: str) -> Path:
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    text = (
        f'[gateway]\nid = "gw-opcua"\nstate_dir = {q(str(state))}\nshutdown_timeout = 5.0\n\n'
        f"[broker]\nport = {broker_port}\nreconnect_min = 0.1\nreconnect_max = 0.5\n\n"
        + "\n".join(devices)
    )
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


def device_model(sim: Any, tags: tuple[str, ...] = TAGS, **settings: Any) -> OpcUaDevice:
    data: dict[str, Any] = {
        "id": "bio-1",
        "driver": "opcua",
        "endpoint": sim.endpoint,
        "timeout": 2.0,
        "publishing_interval": 0.1,
        "tags": [{"name": t, "node_id": sim.NODES[t]} for t in tags],
    }
    data.update(settings)
    return OpcUaDevice.model_validate(data)


def read_bytes(path: Any) -> bytes:
    return Path(path).read_bytes()


def readings_of(col: Collector, dev: str) -> list[Record]:
    return [r for r in col.of(dev) if not r["tag"].startswith("$")]


async def collect(
    drv: OpcUaDriver,
    until: Callable[[list[Reading]], bool],
    *,
    timeout: float = 10.0,
    slow: float = 0.0,
) -> list[Reading]:
    """Connect ``drv``, run it until ``until(readings)``, close it; the readings."""
    got: list[Reading] = []

    async def emit(readings: list[Reading]) -> None:
        got.extend(readings)
        if slow:
            await asyncio.sleep(slow)

    await asyncio.wait_for(drv.connect(), 15)
    task = asyncio.create_task(drv.run(emit))
    try:
        deadline = time.monotonic() + timeout
        while not until(got):
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; {len(got)} readings: {got[-5:]}")
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DriverError):
            await task
        await drv.close()
    return got


def good(tag: str, n: int = 1) -> Callable[[list[Reading]], bool]:
    return lambda got: sum(1 for r in got if r.tag == tag and r.q == "good") >= n


async def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def served(sim: Any) -> dict[int, dict[str, float]]:
    """What the simulator served, by SourceTimestamp (ns): it stamps every update
    with ``datetime.fromtimestamp(wall, UTC)`` of the wall time in its history."""
    out = {}
    for wall, values in list(sim.history):
        when = datetime.fromtimestamp(wall, UTC)
        out[calendar.timegm(when.utctimetuple()) * 10**9 + when.microsecond * 1000] = values
    return out


def check_served(sim: Any, tag: str, val: Any, src_ts: int) -> None:
    """A reading's value is exactly what the server served with that SourceTimestamp."""
    stamps = served(sim)
    assert src_ts in stamps, f"{tag}: src_ts {src_ts} is no SourceTimestamp the server used"
    assert stamps[src_ts][tag] == val, (tag, val, stamps[src_ts][tag])


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
async def sim() -> AsyncIterator[Any]:
    """No security; anonymous, and a user (whose password cannot be protected here)."""
    s = BioreactorSimulator(time_scale=600, update_interval=0.1, users=USERS, allow_anonymous=True)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def open_secure_sim(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """Every policy and mode; any client certificate; anonymous allowed."""
    work = tmp_path_factory.mktemp("opcua-open")
    s = BioreactorSimulator(
        time_scale=600,
        update_interval=0.1,
        security=("None", *(f"{p}_{m}" for p, m in SECURE)),
        cert_dir=work / "server-pki",
    )
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def strict_sim(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """Every policy and mode; only the gateway's certificate; no anonymous access.

    The gateway's client certificate is made first (as on a real site, where the
    server's administrator trusts it once) and handed to the server.
    """
    work = tmp_path_factory.mktemp("opcua-strict")
    client = ensure_client_identity(work / "gateway-opcua")
    user = ensure_client_identity(work / "user-token")  # an X509 user token
    s = BioreactorSimulator(
        time_scale=600,
        update_interval=0.1,
        security=("None", *(f"{p}_{m}" for p, m in SECURE)),
        users=USERS,
        allow_anonymous=False,
        cert_dir=work / "server-pki",
        trusted_client_certs=(client.cert_path, user.cert_path),
    )
    s.client_dir = client.cert_path.parent  # type: ignore[attr-defined]
    s.user_token = user  # type: ignore[attr-defined]
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def scale_sim() -> AsyncIterator[Any]:
    s = BioreactorSimulator(time_scale=600, update_interval=0.5, extra_variables=5000)
    await s.start()
    yield s
    await s.stop()


# --- records end to end ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_modes_deliver_verified_records(
    mode: str, sim: Any, broker: Mosquitto, tmp_path: Path
) -> None:
    settings = "publishing_interval = 0.1\n"
    if mode == "poll":
        settings = 'mode = "poll"\npoll_interval = 0.1\n'
    nodes = {t: sim.NODES[t] for t in TAGS}
    # Poll: units from the config; subscribe: units left out, read from the server.
    units = UNITS if mode == "poll" else None
    cfg = write_config(
        tmp_path,
        broker.port,
        device_toml("bio-1", sim.endpoint, nodes, settings=settings, units=units),
    )
    async with Collector(broker.port) as col:
        async with running(load_config(cfg)):
            await col.wait_for(
                lambda: all(len(col.of("bio-1", t)) >= 8 for t in TAGS), 15, "8 records per tag"
            )
        await col.wait_for(lambda: col.of("bio-1", "$stop"), 10, "stop event")
    report = col.verifier.report()
    assert report.ok, report.summary()
    events = [r["tag"] for r in col.of("bio-1") if r["tag"].startswith("$")]
    assert events[:2] == ["$start", "$online"] and events[-1] == "$stop"
    for r in readings_of(col, "bio-1"):
        assert r["q"] == "good", r
        assert r["unit"] == UNITS[r["tag"]]
        assert isinstance(r["val"], float)
        # src_ts is the server's SourceTimestamp of exactly this value.
        check_served(sim, r["tag"], r["val"], r["src_ts"])
    temps = [r["val"] for r in col.of("bio-1", "temperature")]
    assert len(set(temps)) > 1, "values must move"


async def test_server_deadband_reduces_records(sim: Any, broker: Mosquitto, tmp_path: Path) -> None:
    tags = {"temperature": sim.NODES["temperature"], "DO": sim.NODES["DO"]}
    settings = "publishing_interval = 0.1\n"
    plain = device_toml("plain", sim.endpoint, tags, settings=settings)
    banded = device_toml(
        "banded",
        sim.endpoint,
        tags,
        settings=settings,
        tag_settings='deadband_type = "absolute"\ndeadband_value = 0.05\n',
    )
    cfg = write_config(tmp_path, broker.port, plain, banded)
    async with Collector(broker.port) as col:
        async with running(load_config(cfg)):
            await col.wait_for(lambda: len(readings_of(col, "plain")) >= 40, 20, "40 records")
        await col.wait_for(lambda: col.of("banded", "$stop"), 10, "stop event")
    assert col.verifier.report().ok
    n_plain, n_banded = len(readings_of(col, "plain")), len(readings_of(col, "banded"))
    assert 0 < n_banded < n_plain * 0.8, (n_plain, n_banded)


async def test_server_restart_gives_offline_online_and_no_stale_values(
    sim: Any, broker: Mosquitto, tmp_path: Path
) -> None:
    nodes = {t: sim.NODES[t] for t in TAGS}
    settings = "publishing_interval = 0.1\nhealth_check_interval = 0.5\n"
    cfg = write_config(
        tmp_path, broker.port, device_toml("bio-1", sim.endpoint, nodes, settings=settings)
    )
    async with Collector(broker.port) as col:
        async with running(load_config(cfg)) as gw:
            sup = gw.supervisors["bio-1"]
            sup.backoff_base, sup.backoff_cap = 0.2, 0.5
            await col.wait_for(lambda: len(col.of("bio-1", "temperature")) >= 5, 10, "records")
            await sim.restart(downtime=1.0)
            restarted_ns = time.time_ns()
            await col.wait_for(lambda: col.of("bio-1", "$offline"), 10, "$offline")
            await col.wait_for(lambda: len(col.of("bio-1", "$online")) >= 2, 15, "second $online")
            online_seq = col.of("bio-1", "$online")[-1]["seq"]

            def resumed() -> bool:
                after = [r for r in col.of("bio-1", "temperature") if r["seq"] > online_seq]
                return len(after) >= 5

            await col.wait_for(resumed, 10, "records after the restart")
        await col.wait_for(lambda: col.of("bio-1", "$stop"), 10, "stop event")
    report = col.verifier.report()
    assert report.ok, report.summary()
    offline = col.of("bio-1", "$offline")[0]
    bad = [r for r in readings_of(col, "bio-1") if r["q"] == "bad"]
    assert bad and all(r["val"] is None for r in bad)
    assert all(r["seq"] > offline["seq"] for r in bad)
    after = [r for r in readings_of(col, "bio-1") if r["seq"] > online_seq]
    assert after and all(r["q"] == "good" for r in after)
    # No stale data: everything after the reconnect was served by the restarted
    # server (it stamps each update; the first one is the catch-up at start).
    assert all(r["src_ts"] >= restarted_ns - 200_000_000 for r in after), [
        (r["tag"], (r["src_ts"] - restarted_ns) / 1e9) for r in after
    ]
    for r in after:
        check_served(sim, r["tag"], r["val"], r["src_ts"])


async def test_bad_status_is_bad_with_numeric_status(sim: Any) -> None:
    sim.set_fault("bad_status", tag="pH")
    try:
        got = await collect(
            OpcUaDriver(device_model(sim)),
            lambda g: any(r.tag == "pH" for r in g) and good("temperature", 3)(g),
        )
    finally:
        sim.set_fault(None)
        # Let the update it triggers run: the simulator's update loop can lose a
        # cancel that races with that wake-up (Python 3.11 wait_for), hanging stop().
        await asyncio.sleep(0.3)
    ph = [r for r in got if r.tag == "pH"]
    assert ph and all(r.q == "bad" and r.val is None for r in ph), ph
    assert {r.status for r in ph} == {ua.StatusCodes.BadSensorFailure}
    assert all(isinstance(r.status, int) and r.src_ts for r in ph)
    got = await collect(OpcUaDriver(device_model(sim)), good("pH"))
    assert [r.q for r in got if r.tag == "pH"][-1] == "good"


async def test_timestamp_choices(sim: Any) -> None:
    got = await collect(
        OpcUaDriver(device_model(sim, mode="poll", poll_interval=0.1)), good("temperature", 3)
    )
    for r in got:
        check_served(sim, r.tag, r.val, r.src_ts or 0)
    server_ts = await collect(
        OpcUaDriver(device_model(sim, timestamp="server", tags=("temperature",))),
        good("temperature", 2),
    )
    for r in server_ts:  # the simulator gives both timestamps the same value
        check_served(sim, r.tag, r.val, r.src_ts or 0)
    gateway_ts = await collect(
        OpcUaDriver(device_model(sim, timestamp="gateway", tags=("temperature",))),
        good("temperature", 2),
    )
    assert all(r.src_ts is None for r in gateway_ts)


async def test_units_discovered_from_engineering_units(sim: Any) -> None:
    drv = OpcUaDriver(device_model(sim, tags=tuple(sim.NODES)))
    await collect(drv, good("temperature"))
    units = drv.discovered_units()
    assert units["temperature"] == "Cel" and units["pH"] == "[pH]" and units["DO"] == "%"
    assert units["agitation"] == "/min" and units["air_flow"] == "L/min"
    assert units["glucose"] == "g/L" and units["feed_added"] == "mL"
    assert units["VCD"] == "10*6/mL"  # no UNECE code: from the display name
    # A unit in the config wins: nothing is looked up for that tag.
    data = device_model(sim).model_dump()
    data["tags"][0]["unit"] = "K"
    drv = OpcUaDriver(OpcUaDevice.model_validate(data))
    await collect(drv, good("temperature"))
    assert "temperature" not in drv.discovered_units() and drv.units["pH"] == "[pH]"


async def test_browse_paths_and_namespace_uris_resolve_at_connect(sim: Any) -> None:
    # Namespace indices are looked up in the server's table at every connect.
    path = f"0:Objects/<{NAMESPACE_URI}>:Bioreactor/bio:Temperature/bio:CurrentValue"
    dev = OpcUaDevice.model_validate(
        {
            "id": "bio-1",
            "driver": "opcua",
            "endpoint": sim.endpoint,
            "publishing_interval": 0.1,
            "namespaces": {"bio": NAMESPACE_URI},
            "tags": [
                {"name": "by_path", "browse_path": path},
                {"name": "by_uri", "node_id": sim.NODES["temperature"]},
                {
                    "name": "by_index",
                    "node_id": f"ns={sim.namespace_index};s=Bioreactor.Temperature.CurrentValue",
                },
                {"name": "missing", "node_id": f"nsu={NAMESPACE_URI};s=No.Such.Node"},
                {"name": "bad_ns", "node_id": "nsu=urn:not:there;s=X"},
                {"name": "bad_path", "browse_path": "0:Objects/bio:Nowhere"},
            ],
        }
    )
    got = await collect(
        OpcUaDriver(dev), lambda g: all(good(t)(g) for t in ("by_path", "by_uri", "by_index"))
    )
    by_tag: dict[str, list[Reading]] = {}
    for r in got:
        by_tag.setdefault(r.tag, []).append(r)
    assert {r.val for r in by_tag["by_path"]} & {r.val for r in by_tag["by_uri"]}
    assert by_tag["missing"][0].q == "bad"
    assert by_tag["missing"][0].status == ua.StatusCodes.BadNodeIdUnknown
    assert by_tag["bad_ns"][0].q == "bad" and "not on the server" in str(by_tag["bad_ns"][0].status)
    assert by_tag["bad_path"][0].status == ua.StatusCodes.BadNoMatch


async def test_browse_finds_variables_and_renders_a_loadable_config(
    sim: Any, tmp_path: Path, broker: Mosquitto
) -> None:
    found = await browse(sim.endpoint, depth=4)
    by_id = {v.node_id: v for v in found}
    assert set(sim.NODES.values()) <= set(by_id)
    temp = by_id[sim.NODES["temperature"]]
    assert temp.unit == "Cel" and temp.data_type == "Double" and temp.eu_display == "°C"
    assert temp.browse_path == (
        f"0:Objects/<{NAMESPACE_URI}>:Bioreactor/<{NAMESPACE_URI}>:Temperature/"
        f"<{NAMESPACE_URI}>:CurrentValue"
    )
    assert by_id[sim.NODES["VCD"]].unit == "10*6/mL"
    text = render_config(found, endpoint=sim.endpoint, device_id="browsed")
    cfg = load_config(write_config(tmp_path, broker.port, text))
    dev = cfg.devices[0]
    assert isinstance(dev, OpcUaDevice) and len(dev.tags) == len(found)
    assert "Bioreactor.Temperature.CurrentValue" in {t.name for t in dev.tags}


# --- scale and flooding ------------------------------------------------------------


async def test_5000_monitored_items_subscribe_and_deliver(
    scale_sim: Any, broker: Mosquitto, tmp_path: Path
) -> None:
    names = {f"v{i:05d}": node for i, node in enumerate(scale_sim.scale_nodes)}
    assert len(names) == 5000
    settings = "publishing_interval = 0.2\nmax_items_per_call = 500\n"
    cfg = write_config(
        tmp_path, broker.port, device_toml("scale", scale_sim.endpoint, names, settings=settings)
    )
    seen: set[str] = set()
    done = [0]
    async with Collector(broker.port) as col:

        def all_seen() -> bool:
            fresh = col.records[done[0] :]
            done[0] += len(fresh)
            seen.update(r["tag"] for r in fresh if not r["tag"].startswith("$"))
            return len(seen) >= 5000

        async with running(load_config(cfg)) as gw:
            started = time.monotonic()
            await col.wait_for(all_seen, 30, "a record of each of the 5000 tags")
            elapsed = time.monotonic() - started
            stream = gw.streams["scale"]
            assert stream.errors == 0
        await col.wait_for(lambda: col.of("scale", "$stop"), 20, "stop event")
    report = col.verifier.report()
    assert report.ok, report.summary()
    assert seen == set(names)
    assert all(r["q"] == "good" for r in readings_of(col, "scale"))
    assert elapsed < 20, elapsed


async def test_slow_pipeline_coalesces_visibly_with_bounded_memory(scale_sim: Any) -> None:
    nodes = scale_sim.scale_nodes[:1000]
    dev = OpcUaDevice.model_validate(
        {
            "id": "flood",
            "driver": "opcua",
            "endpoint": scale_sim.endpoint,
            "publishing_interval": 0.1,
            "buffer_size": 100,
            "tags": [{"name": f"v{i:05d}", "node_id": n} for i, n in enumerate(nodes)],
        }
    )
    drv = OpcUaDriver(dev)
    peak = 0

    def until(got: list[Reading]) -> bool:
        nonlocal peak
        peak = max(peak, drv._queue.qsize() + len(drv._overflow))
        return sum(1 for r in got if isinstance(r.status, str)) >= 50

    got = await collect(drv, until, slow=1.2, timeout=20)
    merged = [r for r in got if isinstance(r.status, str)]
    assert all(r.status.startswith("coalesced: ") and r.q == "uncertain" for r in merged)
    assert all(r.val is not None for r in merged)
    assert drv.coalesced > 0
    assert peak <= 100 + 1000, peak  # the buffer plus one entry per tag, whatever the flood


# --- security and user tokens ------------------------------------------------------


def pinned(sim: Any) -> str:
    return fingerprint(read_bytes(sim.server_certificate))


@pytest.mark.parametrize(("policy", "mode"), SECURE, ids=[f"{p}-{m}" for p, m in SECURE])
async def test_anonymous_over_each_policy_and_mode(
    open_secure_sim: Any, tmp_path: Path, policy: str, mode: str
) -> None:
    dev = device_model(
        open_secure_sim,
        tags=("temperature",),
        security_policy=policy,
        security_mode=mode,
        server_cert_sha256=pinned(open_secure_sim),
        client_cert_dir=str(tmp_path / "opcua"),
    )
    got = await collect(OpcUaDriver(dev), good("temperature"))
    check_served(open_secure_sim, "temperature", got[0].val, got[0].src_ts or 0)


@pytest.mark.parametrize(("policy", "mode"), SECURE, ids=[f"{p}-{m}" for p, m in SECURE])
@pytest.mark.parametrize("token", ["username", "certificate"])
async def test_user_tokens_over_each_policy_and_mode(
    strict_sim: Any, policy: str, mode: str, token: str
) -> None:
    settings: dict[str, Any] = {
        "security_policy": policy,
        "security_mode": mode,
        "server_cert_sha256": pinned(strict_sim),
        "client_cert_dir": str(strict_sim.client_dir),
    }
    if token == "username":
        settings.update(username="operator", password=USERS["operator"])
    else:
        ident = strict_sim.user_token
        settings.update(user_cert=str(ident.cert_path), user_key=str(ident.key_path))
    got = await collect(
        OpcUaDriver(device_model(strict_sim, tags=("temperature",), **settings)),
        good("temperature"),
    )
    assert got[0].tag == "temperature"


async def test_tokens_without_channel_security(strict_sim: Any, sim: Any) -> None:
    # Certificate token on a None channel: the token itself is signed.
    ident = strict_sim.user_token
    got = await collect(
        OpcUaDriver(
            device_model(
                strict_sim,
                tags=("temperature",),
                user_cert=str(ident.cert_path),
                user_key=str(ident.key_path),
            )
        ),
        good("temperature"),
    )
    assert got
    # UserName on a None channel: the server encrypts the token with its
    # certificate, which the gateway must trust first (here: the certificate file).
    got = await collect(
        OpcUaDriver(
            device_model(
                strict_sim,
                tags=("temperature",),
                username="operator",
                password=USERS["operator"],
                server_cert=str(strict_sim.server_certificate),
            )
        ),
        good("temperature"),
    )
    assert got
    # A server that offers no encryption at all never gets the password.
    drv = OpcUaDriver(
        device_model(
            sim, username="operator", password=USERS["operator"], server_cert_sha256=pinned(sim)
        )
    )
    with pytest.raises(DriverError, match="clear text"):
        await drv.connect()
    await drv.close()


async def test_refusals_name_the_reason(strict_sim: Any, tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "security_policy": "Basic256Sha256",
        "server_cert_sha256": pinned(strict_sim),
        "client_cert_dir": str(strict_sim.client_dir),
    }
    cases: list[tuple[dict[str, Any], str]] = [
        ({"username": "operator", "password": "wrong"}, "BadUserAccessDenied"),
        ({}, "BadIdentityTokenRejected"),  # anonymous is not offered
        ({"server_cert_sha256": "00" * 32}, "is not the configured server_cert_sha256"),
        ({"client_cert_dir": str(tmp_path / "unknown")}, "BadCertificateUntrusted"),
        ({"security_policy": "Aes256Sha256RsaPss", "security_mode": "None"}, "do not go together"),
    ]
    for extra, why in cases:
        try:
            dev = device_model(strict_sim, **{**base, **extra})
        except ValueError as exc:  # pydantic: a config error
            assert why in str(exc)
            continue
        drv = OpcUaDriver(dev)
        with pytest.raises(DriverError, match=why):
            await drv.connect()
        await drv.close()


async def test_client_certificate_is_made_once_and_tofu_pins_the_server(
    open_secure_sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Default location <state_dir>/opcua; the state dir from the daemon or the env.
    state = tmp_path / "state"
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(state))
    settings = {"security_policy": "Aes256Sha256RsaPss", "trust_on_first_use": True}
    sim = open_secure_sim
    await collect(OpcUaDriver(device_model(sim, **settings)), good("temperature"))
    cert = state / "opcua" / "client_cert.der"
    first = read_bytes(cert)
    pins = sorted((state / "opcua" / "servers").iterdir())
    assert len(pins) == 1 and read_bytes(pins[0]) == read_bytes(sim.server_certificate)
    await collect(OpcUaDriver(device_model(sim, **settings)), good("temperature"))
    assert read_bytes(cert) == first, "the client certificate must be reused"
    # Another certificate at the same endpoint is refused once one is pinned.
    pins[0].write_bytes(read_bytes(ensure_client_identity(tmp_path / "other").cert_path))
    drv = OpcUaDriver(device_model(sim, **settings))
    with pytest.raises(DriverError, match="server certificate changed"):
        await drv.connect()
    await drv.close()


# --- a connection that dies without closing ------------------------------------------


class FreezableProxy:
    """A TCP forwarder that can stop forwarding without closing (a dead network path)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.frozen = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if self.frozen.is_set():
                        await asyncio.sleep(3600)  # swallow: never forward, never close
                    dst.write(data)
                    await dst.drain()

        for t in (pipe(reader, up_w), pipe(up_r, writer)):
            task = asyncio.create_task(t)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()


@pytest.mark.parametrize(
    ("health_check_interval", "reason"),
    [
        (0.5, r"connection lost: no answer \(timeout\)"),  # asyncua's read of the server state
        (600.0, r"no notification and no keep-alive for 2\.\d s"),  # the publish watchdog
    ],
    ids=["health-check", "publish-watchdog"],
)
async def test_dead_connection_is_detected(
    sim: Any, health_check_interval: float, reason: str
) -> None:
    proxy = FreezableProxy(sim.port)
    await proxy.start()
    try:
        endpoint = sim.endpoint.replace(f":{sim.port}/", f":{proxy.port}/")
        dev = device_model(
            sim,
            endpoint=endpoint,
            health_check_interval=health_check_interval,
            keepalive_count=3,  # watchdog: max(6 x 0.1 s, timeout 2 s) = 2 s
        )
        drv = OpcUaDriver(dev)
        await drv.connect()
        got: list[Reading] = []

        async def emit(readings: list[Reading]) -> None:
            got.extend(readings)

        task = asyncio.create_task(drv.run(emit))
        await wait_for(lambda: good("temperature", 3)(got), 10, "readings")
        proxy.frozen.set()
        frozen_at = time.monotonic()
        with pytest.raises(DriverError, match=reason):
            await asyncio.wait_for(task, 15)
        assert time.monotonic() - frozen_at < 4
        await drv.close()
    finally:
        await proxy.stop()
