"""Security rules: private file modes, TLS by default, where credentials may come from.

The end-to-end test runs a real gateway process with a password from a systemd
credential and a TLS client key, against the TLS Mosquitto of
tests/test_mqtt_security.py, through a reload and a refused reload, and greps
every log line for the secrets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.secrets import check_private_file, is_loopback, read_private_text
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.test_mqtt_security import (
    MOSQUITTO_PASSWD,
    PASSWORD,
    USER,
    Pki,
    TlsCollector,
    broker_toml,
    pki,  # noqa: F401  (fixture)
    subscriber,
    tls_broker,  # noqa: F401  (fixture)
    write_config,
)

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path("/etc/gateway/gateway.toml")


def config(broker: str, devices: str = "") -> str:
    return f'[gateway]\nid = "gw"\n\n[broker]\n{broker}\n{devices}'


def errors_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE, env or {})
    return str(info.value)


# -- private files -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_file_with_owner_only_bits_is_accepted(tmp_path: Path, mode: int) -> None:
    f = tmp_path / "key.pem"
    f.write_text("secret\n")
    f.chmod(mode)
    check_private_file(f, "broker.tls.key_file")
    assert read_private_text(f, "broker.password_file") == "secret\n"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_private_file_readable_by_others_is_refused_naming_file_and_mode(
    tmp_path: Path, mode: int
) -> None:
    f = tmp_path / "key.pem"
    f.write_text("secret\n")
    f.chmod(mode)
    for check in (check_private_file, read_private_text):
        with pytest.raises(ConfigError) as info:
            check(f, "broker.tls.key_file")
        msg = str(info.value)
        assert msg.startswith("broker.tls.key_file: ")
        assert str(f) in msg and f"mode {mode:04o}" in msg and "chmod 600" in msg


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX access ACL as Linux stores it in system.posix_acl_access."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_systemd_credential_acl_for_our_user_is_accepted_but_not_for_another(
    tmp_path: Path,
) -> None:
    # What systemd's write_credential does: 0400, then user:<service uid>:r-- by ACL,
    # so stat shows the ACL mask in the group bits (0440).
    f = tmp_path / "mqtt-password"
    f.write_text("from-systemd\n")
    f.chmod(0o400)
    anyone = 0xFFFFFFFF
    ours = _acl((1, 4, anyone), (2, 4, os.geteuid()), (4, 0, anyone), (0x10, 4, anyone))
    try:
        os.setxattr(f, "system.posix_acl_access", ours + _acl((0x20, 0, anyone))[4:])
    except OSError as exc:
        pytest.skip(f"no POSIX ACL support here: {exc}")
    assert stat.S_IMODE(f.stat().st_mode) == 0o440
    check_private_file(f, "broker.password_credential")
    assert read_private_text(f, "broker.password_credential") == "from-systemd\n"
    theirs = _acl(
        (1, 4, anyone), (2, 4, 65534), (4, 0, anyone), (0x10, 4, anyone), (0x20, 0, anyone)
    )
    os.setxattr(f, "system.posix_acl_access", theirs)
    with pytest.raises(ConfigError, match="mode 0440"):
        check_private_file(f, "broker.password_credential")


def test_private_file_missing_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"devices\.x\.user_key: cannot read .*absent"):
        check_private_file(tmp_path / "absent", "devices.x.user_key")
    with pytest.raises(ConfigError, match="is not a regular file"):
        check_private_file(tmp_path, "signing key")


def test_password_file_readable_by_group_is_refused(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("hunter2-x\n")
    pw.chmod(0o640)
    cfg = parse_config(config(f'username = "u"\npassword_file = "{pw}"'), SOURCE, {})
    with pytest.raises(ConfigError, match=r"broker\.password_file: .* mode 0640") as info:
        cfg.broker.secret_password()
    assert "hunter2-x" not in str(info.value)


# -- TLS by default ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.53", "[::1]"])
def test_loopback_broker_may_be_plain(host: str) -> None:
    assert is_loopback(host)
    cfg = parse_config(config(f'host = "{host}"'), SOURCE, {})
    assert cfg.broker.tls is None and cfg.broker.port == 1883


@pytest.mark.parametrize("host", ["mqtt.plant.local", "10.0.0.5", "localhost.evil.com"])
def test_remote_broker_gets_tls_with_verification_by_default(host: str) -> None:
    assert not is_loopback(host)
    cfg = parse_config(config(f'host = "{host}"'), SOURCE, {})
    assert cfg.broker.tls is not None and cfg.broker.tls.ca_file is None  # system CAs
    assert cfg.broker.port == 8883
    cfg = parse_config(config(f'host = "{host}"\nport = 18883'), SOURCE, {})
    assert cfg.broker.tls is not None and cfg.broker.port == 18883


def test_remote_broker_on_the_plain_port_is_refused_unless_insecure() -> None:
    msg = errors_of(config('host = "mqtt.plant.local"\nport = 1883'))
    assert str(SOURCE) in msg and "broker: port 1883" in msg and "insecure = true" in msg
    cfg = parse_config(
        config('host = "mqtt.plant.local"\nport = 1883\ninsecure = true'), SOURCE, {}
    )
    assert cfg.broker.tls is None and cfg.broker.insecure


def test_insecure_cannot_turn_off_tls_verification() -> None:
    msg = errors_of(config('host = "mqtt.plant.local"\ninsecure = true\n[broker.tls]\n'))
    assert "broker: insecure = true" in msg and "never turned off" in msg


# -- where credentials come from --------------------------------------------------------------


def test_inline_password_is_refused_and_not_echoed() -> None:
    msg = errors_of(config('username = "u"\npassword = "Lit3ral-pw"'))
    assert "broker.password: a password written in the config file is refused" in msg
    assert "${VAR}" in msg and "password_credential" in msg
    assert "Lit3ral-pw" not in msg
    # A default value in the reference is a literal too.
    msg = errors_of(config('username = "u"\npassword = "${MQTT_PW:-Lit3ral-pw}"'))
    assert "broker.password" in msg and "Lit3ral-pw" not in msg


def test_password_from_the_environment_is_accepted() -> None:
    cfg = parse_config(
        config('username = "u"\npassword = "${MQTT_PW}"'), SOURCE, {"MQTT_PW": "from-env"}
    )
    assert cfg.broker.secret_password() == "from-env"


def test_inline_device_password_is_refused() -> None:
    device = (
        '[[devices]]\nid = "bio"\ndriver = "opcua"\nendpoint = "opc.tcp://127.0.0.1:4840"\n'
        'username = "op"\npassword = "Dev1ce-pw"\ntrust_on_first_use = true\n'
        '[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n'
    )
    msg = errors_of(config("", device))
    assert "devices[0].password: a password written in the config file is refused" in msg
    assert "Dev1ce-pw" not in msg


def test_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = config('username = "u"\npassword_credential = "mqtt-password"')
    cfg = parse_config(text, SOURCE, {})
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"broker\.password_credential: .*LoadCredential="):
        cfg.broker.secret_password()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    (creds / "mqtt-password").chmod(0o400)  # as systemd makes it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert cfg.broker.secret_password() == "from-systemd"
    msg = errors_of(config('password_credential = "../etc/passwd"'))
    assert "broker.password_credential" in msg
    msg = errors_of(config('password_credential = "p"\npassword_file = "/x"'))
    assert "give one of password, password_file, password_credential" in msg


# -- end to end: a real gateway never logs its secrets ----------------------------------------


def _run_gateway(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config), "--log-json"],
            stdout=f,
            stderr=f,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
        )


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
async def test_real_gateway_never_logs_its_password_or_key(
    sim: OffGasSimulator,
    tls_broker: Mosquitto,  # noqa: F811
    pki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text(PASSWORD + "\n")
    (creds / "mqtt-password").chmod(0o400)
    key_text = pki.client_key.read_text()
    key_lines = [ln for ln in key_text.splitlines() if ln and not ln.startswith("-----")]
    broker = broker_toml(
        tls_broker.port, user=USER, ca=pki.ca, cert=pki.client_cert, key=pki.client_key
    ).replace("[broker.tls]", 'password_credential = "mqtt-password"\n[broker.tls]')
    path = write_config(tmp_path, "gw-nolog", broker, sim.port, log_level="debug")
    log = tmp_path / "gw.log"
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    sub = subscriber(tls_broker.port, pki, password=True)
    async with TlsCollector(sub, "plant/gw-nolog/#") as col:
        proc = _run_gateway(path, log, env)
        try:
            await col.wait_for(lambda: len(col.of("offgas", "O2")) >= 3, what="records")
            # A reload, then a refused one whose error quotes the [broker] section.
            proc.send_signal(signal.SIGHUP)
            await col.wait_for(lambda: col.of("$gateway", "$reload"), what="reload")
            good = path.read_text()
            path.write_text(good.replace("keepalive = 30", "keepalive = 1"))
            proc.send_signal(signal.SIGHUP)
            await col.wait_for(lambda: len(col.of("$gateway", "$reload")) == 2, what="refusal")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
    applied, refused = col.of("$gateway", "$reload")
    assert applied["q"] == "good" and refused["q"] == "bad"
    assert "broker.keepalive" in refused["info"]["error"]
    text = log.read_text()
    assert "config reload refused" in text and "gateway stopped" in text
    lines = text.splitlines()
    assert len(lines) > 5
    for n, line in enumerate(lines, 1):
        assert PASSWORD not in line, f"password in log line {n}"
        assert not any(k in line for k in key_lines), f"key material in log line {n}"
    for r in col.records:  # nor in any record (the audit events quote errors)
        assert PASSWORD not in repr(r)

    # A group-readable key stops the gateway at once (exit 2), naming file and mode.
    loose = tmp_path / "loose.key"
    loose.write_text(key_text)
    loose.chmod(0o644)
    path.write_text(good.replace(str(pki.client_key), str(loose)))
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **env},
    )
    assert bad.returncode == 2, bad.stderr
    assert f"broker.tls.key_file: {loose} has mode 0644" in bad.stderr
    assert PASSWORD not in bad.stdout + bad.stderr
    assert not any(k in bad.stdout + bad.stderr for k in key_lines)
