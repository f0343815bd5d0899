"""The publisher against a real Mosquitto with TLS and authentication.

A session fixture makes a small PKI with ``cryptography`` (a CA; a server
certificate for 127.0.0.1 and localhost; a client certificate; and a rogue CA
with its own server certificate) and a password file with
``mosquitto_passwd``. Three brokers use them: TLS + password, mutual TLS
(the client certificate's CN is the user name), and TLS with the rogue
certificate. The gateway runs in-process, or as a real process where its
logs or its death matter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import BrokerSection, TLSSection, load_config
from gateway.subscribe import subscribe
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import SMALL_TAGS, kill, running, spawn

x509 = pytest.importorskip(
    "cryptography.x509",
    reason="cryptography is needed to make the test PKI (pip install cryptography)",
)
hashes = pytest.importorskip("cryptography.hazmat.primitives.hashes")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
ec = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ec")

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or shutil.which(
    "mosquitto_passwd", path="/usr/sbin:/sbin"
)
pytestmark = pytest.mark.skipif(
    MOSQUITTO_PASSWD is None, reason="mosquitto_passwd (package mosquitto) is not installed"
)

USER = "gw-user"
PASSWORD = "Sup3r-s3cret-pa55word!"
WRONG_PASSWORD = "not-the-Right-0ne-42"
CLIENT_CN = "gw-client"
REPO = Path(__file__).resolve().parent.parent


# -- PKI -------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_server_cert: Path
    rogue_server_key: Path
    passwords: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def _certificate(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (_name(cn), key)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), False)
    if client:
        b = b.add_extension(
            x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> Path:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").touch(0o600)  # private keys must not be group/other readable
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path.with_suffix(".crt")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Test Plant CA", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("localhost", server_key, (ca, ca_key), server=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(CLIENT_CN, client_key, (ca, ca_key), client=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _certificate("Rogue CA", rogue_key, None, ca=True)
    rogue_server_key = ec.generate_private_key(ec.SECP256R1())
    rogue_server = _certificate("localhost", rogue_server_key, (rogue, rogue_key), server=True)

    _write(d / "ca", ca, None)
    _write(d / "server", server, server_key)
    _write(d / "client", client, client_key)
    _write(d / "rogue-ca", rogue, None)
    _write(d / "rogue-server", rogue_server, rogue_server_key)
    passwords = d / "passwords"
    assert MOSQUITTO_PASSWD is not None
    subprocess.run(
        [MOSQUITTO_PASSWD, "-b", "-c", str(passwords), USER, PASSWORD],
        check=True,
        capture_output=True,
        timeout=30,
    )
    assert PASSWORD not in passwords.read_text(), "mosquitto_passwd stores a hash"
    return Pki(
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        rogue_ca=d / "rogue-ca.crt",
        rogue_server_cert=d / "rogue-server.crt",
        rogue_server_key=d / "rogue-server.key",
        passwords=passwords,
    )


# -- brokers -------------------------------------------------------------------------------
# Mosquitto's runner writes "listener <port> 127.0.0.1" first and appends extra_conf:
# cafile/certfile/keyfile/require_certificate/use_identity_as_username apply to the
# most recent listener (that one); allow_anonymous and password_file are global with
# per_listener_settings false (the default), and a later allow_anonymous wins.


def _broker(work: Path, conf: str) -> Iterator[Mosquitto]:
    b = Mosquitto(work, extra_conf=conf)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """TLS (server certificate from the CA) and user name + password, no anonymous."""
    yield from _broker(
        tmp_path_factory.mktemp("mosquitto-tls"),
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"password_file {pki.passwords}\nallow_anonymous false\n",
    )


@pytest.fixture(scope="module")
def mtls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """Mutual TLS: a client certificate from the CA is required and names the user."""
    yield from _broker(
        tmp_path_factory.mktemp("mosquitto-mtls"),
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
    )


@pytest.fixture(scope="module")
def rogue_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """TLS with a server certificate from another CA (anonymous allowed)."""
    yield from _broker(
        tmp_path_factory.mktemp("mosquitto-rogue"),
        f"cafile {pki.rogue_ca}\ncertfile {pki.rogue_server_cert}\n"
        f"keyfile {pki.rogue_server_key}\n",
    )


@pytest.fixture(scope="module")
async def sim() -> AsyncIterator[OffGasSimulator]:
    s = OffGasSimulator(time_scale=600, update_interval=0.05)
    await s.start()
    yield s
    await s.stop()


# -- configs and subscribers ---------------------------------------------------------------


def broker_toml(
    port: int,
    *,
    password_file: Path | None = None,
    password: str | None = None,
    user: str | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    protocol: str = "5",
    keepalive: int = 30,
) -> str:
    """The [broker] keys after host/reconnect_*, then [broker.tls] when any TLS file is set."""
    lines = [f"port = {port}", f'protocol = "{protocol}"', f"keepalive = {keepalive}"]
    if user is not None:
        lines.append(f'username = "{user}"')
    if password_file is not None:
        lines.append(f'password_file = "{password_file}"')
    if password is not None:
        lines.append(f'password = "{password}"')
    if ca or cert or key:
        lines.append("[broker.tls]")
        lines += [
            f'{name} = "{path}"'
            for name, path in (("ca_file", ca), ("cert_file", cert), ("key_file", key))
            if path is not None
        ]
    return "\n".join(lines)


def write_config(
    tmp_path: Path,
    gw_id: str,
    broker: str,
    device_port: int,
    *,
    shutdown_timeout: float = 2.0,
    log_level: str = "info",
) -> Path:
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{gw_id}.toml"
    path.write_text(
        f'[gateway]\nid = "{gw_id}"\nstate_dir = "{state}"\n'
        f'shutdown_timeout = {shutdown_timeout}\nlog_level = "{log_level}"\n\n'
        f'[broker]\nhost = "127.0.0.1"\nreconnect_min = 0.1\nreconnect_max = 0.5\n{broker}\n\n'
        f'[[devices]]\nid = "offgas"\ndriver = "modbus"\nhost = "127.0.0.1"\n'
        f"port = {device_port}\npoll_interval = 0.1\ntimeout = 0.3\n{SMALL_TAGS}\n"
    )
    return path


def password_file(tmp_path: Path, secret: str = PASSWORD) -> Path:
    path = tmp_path / "broker.pass"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def subscriber(
    port: int,
    pki: Pki,
    *,
    host: str = "127.0.0.1",
    password: bool = False,
    client_cert: bool = False,
    ca: Path | None = None,
) -> BrokerSection:
    """A subscriber's broker settings: TLS always, credentials as the broker wants them."""
    tls = TLSSection(
        ca_file=ca or pki.ca,
        cert_file=pki.client_cert if client_cert else None,
        key_file=pki.client_key if client_cert else None,
    )
    creds = {"username": USER, "password": PASSWORD} if password else {}
    return BrokerSection(host=host, port=port, tls=tls, **creds)


class TlsCollector(Collector):
    """The test Collector, over TLS (and with credentials) instead of plain TCP."""

    def __init__(self, broker: BrokerSection, topic: str = "plant/#") -> None:
        super().__init__(broker.port, topic)
        self.broker = broker


async def retained(broker: BrokerSection, topic: str, timeout: float = 2.0) -> bytes | None:
    """The retained message on ``topic`` as a new subscriber sees it (None: there is none)."""
    got: list[bytes] = []
    stop = asyncio.Event()

    def on(_topic: str, payload: bytes) -> None:
        got.append(payload)
        stop.set()

    await subscribe(broker, topic, on, stop=stop, seconds=timeout)
    return got[0] if got else None


async def wait_retained(
    broker: BrokerSection, topic: str, want: bytes, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = await retained(broker, topic, timeout=1.0)
        if seen == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{topic}: retained {seen!r}, want {want!r}")


async def wait_until(pred: object, timeout: float = 10.0, what: str = "condition") -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def assert_verified(col: Collector, dev: str = "offgas") -> None:
    report = col.verifier.report()
    assert report.ok, report.summary()
    assert [s.dev for s in report.streams] == ["$gateway", dev]  # with the audit stream
    assert all(s.first_seq == 1 and not s.unexplained for s in report.streams)


# -- (a), (f): TLS with CA verification and a password, MQTT 5 and 3.1.1 ----------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_tls_and_password_records_arrive_and_verify(
    protocol: str, sim: OffGasSimulator, tls_broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    gw_id = f"gw-tls-{protocol.replace('.', '')}"
    cfg = load_config(
        write_config(
            tmp_path,
            gw_id,
            broker_toml(
                tls_broker.port,
                user=USER,
                password_file=password_file(tmp_path),
                ca=pki.ca,
                protocol=protocol,
            ),
            sim.port,
        )
    )
    assert cfg.broker.tls is not None and cfg.broker.protocol == protocol
    # The subscriber connects by name: the server certificate's DNS SAN; the gateway
    # connects to 127.0.0.1: its IP SAN.
    sub = subscriber(tls_broker.port, pki, host="localhost", password=True)
    async with TlsCollector(sub, f"plant/{gw_id}/#") as col:
        async with running(cfg) as gw:
            await col.wait_for(lambda: len(col.of("offgas", "O2")) >= 5, what="records over TLS")
            assert gw.publisher is not None
            assert gw.publisher.connected and gw.publisher.last_error is None
            assert gw.publisher.acked > 0
        await col.wait_for(lambda: col.of("offgas", "$stop"), what="the stop event")
    assert_verified(col)
    assert {r["gw"] for r in col.records} == {gw_id}


# -- (b) mutual TLS ----------------------------------------------------------------------------


async def test_mutual_tls_with_a_client_certificate_publishes(
    sim: OffGasSimulator, mtls_broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    gw_id = "gw-mtls"
    cfg = load_config(
        write_config(
            tmp_path,
            gw_id,
            broker_toml(mtls_broker.port, ca=pki.ca, cert=pki.client_cert, key=pki.client_key),
            sim.port,
        )
    )
    sub = subscriber(mtls_broker.port, pki, client_cert=True)
    async with TlsCollector(sub, f"plant/{gw_id}/#") as col:
        async with running(cfg) as gw:
            await col.wait_for(lambda: len(col.of("offgas", "O2")) >= 5, what="records over mTLS")
            assert gw.publisher is not None and gw.publisher.connected
        await col.wait_for(lambda: col.of("offgas", "$stop"), what="the stop event")
    assert_verified(col)


async def test_mutual_tls_without_a_client_certificate_is_an_error_not_a_crash(
    sim: OffGasSimulator, mtls_broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    gw_id = "gw-mtls-nocert"
    cfg = load_config(
        write_config(
            tmp_path,
            gw_id,
            broker_toml(mtls_broker.port, ca=pki.ca),
            sim.port,
            shutdown_timeout=0.3,
        )
    )
    sub = subscriber(mtls_broker.port, pki, client_cert=True)
    async with TlsCollector(sub, f"plant/{gw_id}/#") as col, running(cfg) as gw:
        pub, outbox = gw.publisher, gw.outbox
        assert pub is not None and outbox is not None
        await wait_until(lambda: pub.last_error is not None, what="a connection error")
        before = outbox.messages
        await asyncio.sleep(1.0)
        # Still acquiring into the outbox, still trying, never connected.
        assert outbox.messages > before > 0
        assert not pub.connected and pub.reconnects == 0 and pub.published == 0
        assert pub.last_error
        assert not col.records and not col.status
    assert outbox.messages > 0, "what was not published stays in the outbox"


# -- (c) a server certificate from another CA -----------------------------------------------


async def test_server_certificate_from_another_ca_is_rejected(
    sim: OffGasSimulator, rogue_broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    gw_id = "gw-rogue"
    cfg = load_config(
        write_config(
            tmp_path,
            gw_id,
            broker_toml(rogue_broker.port, ca=pki.ca),
            sim.port,
            shutdown_timeout=0.3,
        )
    )
    # A subscriber that does trust the rogue CA sees whatever reaches that broker.
    sub = subscriber(rogue_broker.port, pki, ca=pki.rogue_ca)
    async with TlsCollector(sub, "plant/#") as col, running(cfg) as gw:
        pub = gw.publisher
        assert pub is not None and gw.outbox is not None
        await wait_until(lambda: pub.last_error is not None, what="a TLS error")
        assert "certificate verify failed" in (pub.last_error or "")
        await asyncio.sleep(1.0)
        assert "certificate verify failed" in (pub.last_error or ""), "every retry fails alike"
        assert not pub.connected and pub.published == 0
        assert gw.outbox.messages > 0
    assert not col.records and not col.status, "nothing may reach a broker we do not trust"


# -- (d) a wrong password ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_wrong_password_is_rejected_with_the_brokers_reason(
    protocol: str, sim: OffGasSimulator, tls_broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    gw_id = f"gw-badpw-{protocol.replace('.', '')}"
    cfg = load_config(
        write_config(
            tmp_path,
            gw_id,
            broker_toml(
                tls_broker.port,
                user=USER,
                password_file=password_file(tmp_path, WRONG_PASSWORD),
                ca=pki.ca,
                protocol=protocol,
            ),
            sim.port,
            shutdown_timeout=0.3,
        )
    )
    async with running(cfg) as gw:
        pub = gw.publisher
        assert pub is not None and gw.outbox is not None
        await wait_until(lambda: pub.last_error is not None, what="the broker's refusal")
        error = pub.last_error or ""
        assert error.startswith("broker refused the connection: "), error
        assert any(why in error for why in ("Not authorized", "Bad user name or password")), error
        assert WRONG_PASSWORD not in error
        assert not pub.connected and pub.published == 0 and gw.outbox.messages > 0


# -- (e) the password never reaches a log ------------------------------------------------------


def _gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


async def test_password_never_appears_in_logs_or_check_output(
    sim: OffGasSimulator, tls_broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    good = write_config(
        good_dir,
        "gw-secret",
        broker_toml(tls_broker.port, user=USER, password_file=password_file(good_dir), ca=pki.ca),
        sim.port,
        log_level="debug",
    )
    bad = write_config(
        bad_dir,
        "gw-secret-bad",
        broker_toml(
            tls_broker.port,
            user=USER,
            password_file=password_file(bad_dir, WRONG_PASSWORD),
            ca=pki.ca,
        ),
        sim.port,
        log_level="debug",
        shutdown_timeout=0.3,
    )
    sub = subscriber(tls_broker.port, pki, password=True)
    async with TlsCollector(sub, "plant/gw-secret/#") as col:
        ok = spawn(good, tmp_path / "good.log")
        refused = spawn(bad, tmp_path / "bad.log")
        try:
            await col.wait_for(lambda: len(col.of("offgas", "O2")) >= 3, what="records")
            await asyncio.sleep(1.0)  # the refused one retries a few times, logging each
        finally:
            assert kill(ok, signal.SIGTERM) == 0
            assert kill(refused, signal.SIGTERM) == 0
    good_log = (tmp_path / "good.log").read_text()
    bad_log = (tmp_path / "bad.log").read_text()
    assert "gateway stopped" in good_log and "broker unavailable" in bad_log
    assert "refused the connection" in bad_log
    assert PASSWORD not in good_log
    assert WRONG_PASSWORD not in bad_log

    check = await asyncio.to_thread(_gateway_cli, "check", "--config", str(good))
    assert check.returncode == 0, check.stderr
    assert f"user {USER}" in check.stdout and "TLS" in check.stdout
    assert PASSWORD not in check.stdout + check.stderr

    # An inline password in a config that fails validation elsewhere, or in the
    # password field itself, is not echoed in the error.
    for broker, field in (
        (broker_toml(tls_broker.port, user=USER, password=PASSWORD, keepalive=1), "keepalive"),
        (
            broker_toml(
                tls_broker.port, user=USER, password=PASSWORD, password_file=good_dir / "x"
            ),
            "password_file, not both",
        ),
        (f'port = {tls_broker.port}\npassword = ["{PASSWORD}"]', "broker.password"),
    ):
        path = write_config(tmp_path / "invalid", "gw-invalid", broker, sim.port)
        out = await asyncio.to_thread(_gateway_cli, "check", "--config", str(path))
        assert out.returncode == 2 and field in out.stderr, out.stderr
        assert PASSWORD not in out.stdout + out.stderr, out.stderr


# -- (g) the retained status topic and the Last Will ----------------------------------------


async def test_status_topic_online_then_offline_after_clean_stop_and_after_sigkill(
    sim: OffGasSimulator, tls_broker: Mosquitto, pki: Pki, tmp_path: Path
) -> None:
    gw_id = "gw-status"
    config = write_config(
        tmp_path,
        gw_id,
        broker_toml(
            tls_broker.port,
            user=USER,
            password_file=password_file(tmp_path),
            ca=pki.ca,
            keepalive=5,  # the smallest BrokerSection allows
        ),
        sim.port,
    )
    topic = f"plant/{gw_id}/$status"
    sub = subscriber(tls_broker.port, pki, password=True)

    async with running(load_config(config)) as gw:
        assert gw.publisher is not None and gw.publisher.status_topic == topic
        await wait_retained(sub, topic, b"online")
    assert await retained(sub, topic) == b"offline", "a clean stop publishes offline"

    async with TlsCollector(sub, topic) as col:
        proc = spawn(config, tmp_path / "gw.log")
        try:
            await wait_retained(sub, topic, b"online")
            await col.wait_for(lambda: col.status.get(topic) == b"online", what="online")
        finally:
            assert kill(proc) == -signal.SIGKILL
        # No DISCONNECT was sent: the broker publishes the Last Will.
        await col.wait_for(lambda: col.status.get(topic) == b"offline", what="the Last Will")
    assert await retained(sub, topic) == b"offline"
