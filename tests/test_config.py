"""Configuration: error cases as data, shipped configs, env interpolation, secrets, CLI.

The error cases live in tests/cases/<name>/ (see tests/cases/README.md): each
``gateway.toml`` must fail to load with a ConfigError whose message names the
file and contains every line of ``expected.txt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.decode import BYTE_ORDERS, DATA_TYPES
from gateway.config import Config, load_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "cases"
CASE_DIRS = sorted(p for p in CASES.iterdir() if p.is_dir())
CONFIG_FILES = sorted((REPO / "config").glob("**/*.toml"))

SECRET = "s3cret-Pa55word-xyzzy"
SECRET_NUMBER = 987654321


def _expected_lines(case: Path) -> list[str]:
    expected = case / "expected.txt"
    assert expected.is_file(), f"{case.name}: expected.txt is missing"
    lines = [ln for ln in expected.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert lines, f"{case.name}: expected.txt is empty"
    return lines


def _write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gateway ARGS`` in a child process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


VALID = """\
[gateway]
id = "line1-gw"
state_dir = "{state_dir}"

[broker]
host = "mqtt.plant.example"
port = 8883
username = "gw-line1"
{password_line}

[broker.tls]
ca_file = "/etc/gateway/ca.pem"

[outbox]
max_bytes = "64MiB"

[[devices]]
id = "plc-1"
driver = "modbus"
host = "10.0.0.5"
poll_interval = 0.5

[[devices.tags]]
name = "temp"
table = "input"
address = 0
data_type = "float32"
unit = "Cel"

[[devices.tags]]
name = "flow"
table = "input"
address = 2
data_type = "uint16"
scale = 0.1

[[devices.tags]]
name = "pump_on"
table = "coil"
address = 0

[[devices]]
id = "analyser-2"
driver = "modbus"
host = "10.0.0.6"
unit_id = 2
poll_interval = 2

[[devices.tags]]
name = "O2"
table = "input"
address = 4
data_type = "float32"
byte_order = "CDAB"
"""


def _valid(tmp_path: Path, password_line: str = "") -> Path:
    text = VALID.format(state_dir=tmp_path / "state", password_line=password_line)
    return _write(tmp_path, text)


# --- (a) error cases as data ------------------------------------------------


def test_cases_exist() -> None:
    assert len(CASE_DIRS) >= 25, f"expected the error cases in {CASES}"
    for case in CASE_DIRS:
        assert (case / "gateway.toml").is_file(), f"{case.name}: gateway.toml is missing"


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_config_error_case(case: Path) -> None:
    expected = _expected_lines(case)
    path = case / "gateway.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})  # empty environment: every case is deterministic
    message = str(info.value)
    assert str(path) in message, f"the error must name the file:\n{message}"
    missing = [line for line in expected if line not in message]
    assert not missing, f"not in the error message: {missing}\nmessage:\n{message}"


# --- (b) every shipped config loads ------------------------------------------


@pytest.mark.parametrize(
    "path",
    CONFIG_FILES
    or [pytest.param(None, marks=pytest.mark.skip(reason="config/ holds no *.toml files"))],
    ids=[str(p.relative_to(REPO)) for p in CONFIG_FILES] or ["no-configs"],
)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.source == path


# --- (c) environment interpolation ------------------------------------------


ENV_CONFIG = """\
[gateway]
id = "${GW_ID:-default-gw}"
state_dir = "${GW_STATE}/gateway"

[broker]
host = "${GW_BROKER_HOST}"
port = "${GW_BROKER_PORT}"
client_id = "${GW_PREFIX:-gw}-${GW_SUFFIX:-one}"

[[devices]]
id = "plc-1"
driver = "modbus"
host = "${PLC_HOST:-10.0.0.5}"
port = "${PLC_PORT:-5020}"
poll_interval = "${PLC_POLL:-0.25}"

[[devices.tags]]
name = "temp"
address = 0
unit = "${TEMP_UNIT}"
"""


def test_env_interpolation(tmp_path: Path) -> None:
    path = _write(tmp_path, ENV_CONFIG)
    env = {
        "GW_STATE": "/srv/state",
        "GW_BROKER_HOST": "mqtt.example",
        "GW_BROKER_PORT": "8883",
        "GW_SUFFIX": "two",
        "PLC_HOST": "192.168.1.10",
        "TEMP_UNIT": "Cel",
    }
    cfg = load_config(path, env=env)
    assert cfg.gateway.id == "default-gw"  # ${VAR:-default}, VAR unset
    assert cfg.gateway.state_dir == Path("/srv/state/gateway")  # ${VAR} inside a string
    assert cfg.broker.host == "mqtt.example"
    assert cfg.broker.port == 8883 and isinstance(cfg.broker.port, int)  # "${PORT}" -> int
    assert cfg.broker.client_id == "gw-two"  # two references, one defaulted
    dev = cfg.devices[0]
    assert dev.host == "192.168.1.10"  # a set variable wins over its default
    assert dev.port == 5020 and isinstance(dev.port, int)  # defaulted, then coerced
    assert dev.poll_interval == 0.25
    assert dev.tags[0].unit == "Cel"


def test_env_interpolation_reads_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path,
        '[gateway]\nid = "${GW_TEST_ID}"\n[broker]\nport = "${GW_TEST_PORT:-1883}"\n',
    )
    monkeypatch.setenv("GW_TEST_ID", "from-env")
    monkeypatch.setenv("GW_TEST_PORT", "11883")
    cfg = load_config(path)
    assert cfg.gateway.id == "from-env"
    assert cfg.broker.port == 11883


def test_env_unset_names_variable_and_path(tmp_path: Path) -> None:
    path = _write(tmp_path, ENV_CONFIG)
    env = {"GW_STATE": "/s", "GW_BROKER_HOST": "h", "GW_BROKER_PORT": "1883"}
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    message = str(info.value)
    assert str(path) in message
    assert "devices[0].tags[0].unit: environment variable TEMP_UNIT is not set" in message


def test_env_value_that_is_not_a_port(tmp_path: Path) -> None:
    path = _write(tmp_path, '[gateway]\nid = "gw"\n[broker]\nport = "${GW_BROKER_PORT}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"GW_BROKER_PORT": "mqtt"})
    assert "broker.port: Input should be a valid integer" in str(info.value)
    assert "(got 'mqtt')" in str(info.value)


# --- (d) secrets ---------------------------------------------------------------


def test_password_file_is_read_and_never_shown(tmp_path: Path) -> None:
    secret_file = tmp_path / "mqtt-password"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    path = _valid(tmp_path, f'password_file = "{secret_file}"')
    cfg = load_config(path, env={})
    assert cfg.broker.password_file == secret_file
    assert cfg.broker.secret_password() == SECRET  # trailing newline stripped
    assert SECRET not in repr(cfg)
    assert SECRET not in str(cfg)
    assert SECRET not in cfg.model_dump_json()

    result = _gateway("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_password_file_unreadable(tmp_path: Path) -> None:
    path = _valid(tmp_path, f'password_file = "{tmp_path / "absent"}"')
    cfg = load_config(path, env={})  # the file is read when the password is needed
    with pytest.raises(ConfigError, match=r"broker\.password_file: cannot read"):
        cfg.broker.secret_password()


def test_inline_password_from_env_never_shown(tmp_path: Path) -> None:
    path = _valid(tmp_path, 'password = "${GW_MQTT_PASSWORD}"')
    cfg = load_config(path, env={"GW_MQTT_PASSWORD": SECRET})
    assert cfg.broker.secret_password() == SECRET
    assert SECRET not in repr(cfg)
    assert SECRET not in repr(cfg.broker)

    result = _gateway("check", "--config", str(path), env={"GW_MQTT_PASSWORD": SECRET})
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr


BAD_PASSWORDS = {
    "integer": f"password = {SECRET_NUMBER}",
    "table": f'password = {{ value = "{SECRET}" }}',
    "array": f'password = ["{SECRET}"]',
    "with-password-file": f'password = "{SECRET}"\npassword_file = "/etc/gateway/pw"',
    "with-other-error": f'password = "{SECRET}"\nkeepalive = 1',
}


def _bad_password_config(tmp_path: Path, password_lines: str) -> Path:
    return _write(
        tmp_path,
        f'[gateway]\nid = "gw"\n\n[broker]\nusername = "u"\n{password_lines}\n',
    )


@pytest.mark.parametrize("lines", BAD_PASSWORDS.values(), ids=BAD_PASSWORDS.keys())
def test_password_never_in_validation_error(tmp_path: Path, lines: str) -> None:
    path = _bad_password_config(tmp_path, lines)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert "broker" in message
    assert SECRET not in message
    assert str(SECRET_NUMBER) not in message

    result = _gateway("check", "--config", str(path))
    assert result.returncode == 2
    assert "broker" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert str(SECRET_NUMBER) not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "lines", [BAD_PASSWORDS["integer"], BAD_PASSWORDS["table"]], ids=["integer", "table"]
)
def test_password_never_in_error_traceback(tmp_path: Path, lines: str) -> None:
    path = _bad_password_config(tmp_path, lines)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = "".join(traceback.format_exception(info.value))
    assert SECRET not in text
    assert str(SECRET_NUMBER) not in text


# --- (e) gateway check -----------------------------------------------------------


def test_check_valid_config(tmp_path: Path) -> None:
    path = _valid(tmp_path)
    result = _gateway("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"config {path}: OK" in out
    assert "gateway line1-gw" in out
    assert "mqtt://mqtt.plant.example:8883" in out
    assert "TLS" in out and "user gw-line1" in out
    assert "2 device(s), 4 tag(s)" in out
    assert "plc-1: driver modbus, 3 tag(s) every 0.5 s (~6 readings/s)" in out
    assert "analyser-2: driver modbus, 1 tag(s) every 2 s (~0.5 readings/s)" in out
    assert "64.0MiB" in out


def test_check_invalid_config_exits_2() -> None:
    path = CASES / "errors-in-two-devices" / "gateway.toml"
    result = _gateway("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: ")
    for line in _expected_lines(path.parent):
        assert line in result.stderr


def test_check_missing_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = _gateway("check", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}: cannot read" in result.stderr


# --- (f) gateway schema --------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/$defs/"), ref
    found: dict[str, Any] = schema["$defs"][ref.removeprefix("#/$defs/")]
    return found


def _device_models(schema: dict[str, Any]) -> list[dict[str, Any]]:
    items = schema["properties"]["devices"]["items"]
    options = items.get("anyOf") or items.get("oneOf") or [items]
    return [_resolve(schema, o) for o in options]


def test_schema_is_json_and_describes_modbus() -> None:
    result = _gateway("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "gateway" in schema["required"]
    assert schema["additionalProperties"] is False  # unknown keys are errors
    for section in ("gateway", "broker", "outbox", "devices"):
        assert section in schema["properties"]

    def is_modbus(model: dict[str, Any]) -> bool:
        driver = model["properties"]["driver"]
        return driver.get("const") == "modbus" or driver.get("enum") == ["modbus"]

    modbus = [m for m in _device_models(schema) if is_modbus(m)]
    assert len(modbus) == 1, "devices items must include the modbus driver's model"
    device = modbus[0]
    assert device["additionalProperties"] is False
    for key in ("id", "host", "port", "unit_id", "poll_interval", "timeout", "tags"):
        assert key in device["properties"], key
    assert {"id", "driver", "tags"} <= set(device["required"])
    # host is required with transport tcp only (RTU devices have a serial_port)
    assert device["allOf"][0]["else"]["required"] == ["host"]

    tag = _resolve(schema, device["properties"]["tags"]["items"])
    props = tag["properties"]
    assert set(props["data_type"]["enum"]) == DATA_TYPES
    assert set(props["byte_order"]["enum"]) == BYTE_ORDERS
    assert set(props["table"]["enum"]) == {"holding", "input", "coil", "discrete"}
    assert props["bit"]  # the bit index is described
    assert props["address"]["maximum"] == 65535
    assert "address" in tag["required"] and "name" in tag["required"]
