"""Configuration: TOML validated by pydantic, one model per section and per driver.

Errors name the file, the field path (``devices[2].tags[5].data_type``) and what
was expected. Unknown keys are errors. Any string may reference the environment
as ``${VAR}`` or ``${VAR:-default}``; secrets may also come from files
(``password_file``) and are held as ``SecretStr`` so they never reach a log.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.secrets import CREDENTIAL_NAME, credential_path, is_loopback, read_private_text

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:/%-]{0,127}$"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SENSITIVE = ("password", "secret", "token", "key")
# A secret in the config file may only be a reference to the environment.
_ENV_ONLY = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(StrictModel):
    """``[gateway]``: who this gateway is and where it keeps its state."""

    id: str = Field(pattern=ID_PATTERN, description="Gateway id: the `gw` field and topic level")
    state_dir: Path = Field(Path("/var/lib/gateway"), description="Outbox and keys live here")
    shutdown_timeout: float = Field(
        5.0, gt=0, description="Seconds to publish the backlog on SIGTERM"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class TLSSection(StrictModel):
    """``[broker.tls]``: TLS with CA verification, optional client certificate."""

    ca_file: Path | None = Field(None, description="CA bundle; system CAs when omitted")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="Client private key (mutual TLS)")

    @model_validator(mode="after")
    def _pair(self) -> TLSSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        return self


class BrokerSection(StrictModel):
    """``[broker]``: the MQTT broker the records are published to."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    client_id: str | None = Field(None, description="Defaults to 'gateway-<gateway id>'")
    username: str | None = None
    password: SecretStr | None = Field(
        None, description="Only as ${VAR} in a config file; an inline literal is refused"
    )
    password_file: Path | None = Field(
        None, description="File holding the password (mode 0600 or stricter)"
    )
    password_credential: str | None = Field(
        None,
        pattern=CREDENTIAL_NAME,
        description="systemd credential holding the password ($CREDENTIALS_DIRECTORY/<name>)",
    )
    tls: TLSSection | None = Field(
        None, description="TLS; on by default (system CAs, port 8883) for a non-loopback host"
    )
    insecure: bool = Field(
        False, description="Allow plain TCP to a non-loopback broker (never turns off TLS checks)"
    )
    topic_prefix: str = Field("plant", pattern=r"^[^#+$][^#+]*$")
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds")
    inflight: int = Field(
        32, ge=1, le=1000, description="Messages awaiting PUBACK at once (kept small on purpose)"
    )
    reconnect_min: float = Field(0.5, gt=0, description="First reconnect delay, seconds")
    reconnect_max: float = Field(30.0, gt=0, description="Longest reconnect delay, seconds")
    output: Literal["records", "sparkplug"] = Field(
        "records", description="records: hash-chained msgpack arrays; sparkplug: Sparkplug B 3.0"
    )

    @model_validator(mode="before")
    @classmethod
    def _tls_by_default(cls, data: Any) -> Any:
        # Plain text leaves the host only when the config says so in writing.
        if not isinstance(data, dict) or data.get("tls") is not None:
            return data
        host = data.get("host", "127.0.0.1")
        if not isinstance(host, str) or is_loopback(host) or data.get("insecure") is True:
            return data
        if str(data.get("port")) == "1883":
            raise ValueError(
                f"port 1883 is plain-text MQTT, but host {host!r} is not a loopback address, "
                "so TLS is required: use the broker's TLS port (8883, the default) and add "
                "[broker.tls] if it needs a CA file, or write insecure = true in [broker] to "
                "allow plain text"
            )
        return {**data, "tls": {}, "port": data.get("port", 8883)}

    @model_validator(mode="after")
    def _secrets(self) -> BrokerSection:
        given = [
            k
            for k in ("password", "password_file", "password_credential")
            if getattr(self, k) is not None
        ]
        if given == ["password", "password_file"]:
            raise ValueError("give password or password_file, not both")
        if len(given) > 1:
            raise ValueError(f"give one of password, password_file, password_credential: {given}")
        if self.insecure and self.tls is not None:
            raise ValueError(
                "insecure = true allows plain TCP and cannot be combined with [broker.tls] "
                "(certificate verification is never turned off)"
            )
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be >= reconnect_min")
        return self

    def secret_password(self) -> str | None:
        """The password, from the environment, password_file or a systemd credential."""
        if self.password_credential is not None:
            path = credential_path(self.password_credential, "broker.password_credential")
            return resolve_secret(None, path, "broker.password_credential")
        return resolve_secret(self.password, self.password_file, "broker.password_file")


def resolve_secret(value: SecretStr | None, file: Path | None, field: str) -> str | None:
    """A secret given as a value or in a private file (one line; the newline is not part of it).

    The file must have mode 0600 or stricter (``gateway.secrets.check_private_file``).
    """
    if value is not None:
        return value.get_secret_value()
    if file is None:
        return None
    return read_private_text(file, field).rstrip("\r\n")


class OutboxSection(StrictModel):
    """``[outbox]``: the durable store between acquisition and the broker."""

    path: Path | None = Field(None, description="SQLite file; default <state_dir>/outbox.db")
    max_bytes: ByteSize = Field(
        ByteSize(1 << 30),
        ge=64 * 1024,
        description="Disk quota, e.g. '512MiB' or a number of bytes (at least 64 KiB)",
    )
    policy: Literal["drop_oldest", "drop_newest"] = Field(
        "drop_oldest", description="What happens at the quota; both leave a chained $gap record"
    )
    durability: Literal["full", "normal"] = Field(
        "full", description="full: fsync each commit (survives power loss); normal: WAL default"
    )
    max_pending: int = Field(10_000, ge=1, description="Messages queued in memory before commit")
    commit_window: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Seconds a new message may wait for others to share its transaction (fsync)",
    )


class SparkplugSection(StrictModel):
    """``[sparkplug]``: Sparkplug B names, used when ``broker.output = "sparkplug"``."""

    group_id: str = Field(
        "plant", pattern=r"^[^/#+]+$", description="Sparkplug Group ID (topic level)"
    )
    edge_node_id: str | None = Field(
        None, pattern=r"^[^/#+]+$", description="Sparkplug Edge Node ID; default: the gateway id"
    )


class CheckpointsSection(StrictModel):
    """``[checkpoints]``: signed stream heads (docs/integrity.md); key from `gateway keygen`."""

    enabled: bool = Field(False, description="Write signed $checkpoint records")
    key_file: Path | None = Field(
        None, description="Ed25519 signer key (mode 0600); default <state_dir>/checkpoint.key"
    )
    every_records: int = Field(
        1000, ge=1, description="A checkpoint once a stream has advanced this many records"
    )
    every_seconds: float = Field(
        60.0, gt=0, description="...or after this many seconds, if the stream advanced at all"
    )


class HealthSection(StrictModel):
    """``[health]``: the HTTP endpoint with /healthz, /readyz and /metrics."""

    enabled: bool = True
    listen: str = Field(
        "127.0.0.1", description="Address to bind; loopback by default (no authentication)"
    )
    port: int = Field(9108, ge=0, le=65535, description="TCP port; 0 picks a free one")


class TagConfig(StrictModel):
    """Fields every driver's tags share; drivers subclass it with addressing."""

    name: str = Field(pattern=TAG_PATTERN, description="Tag name, the record's `tag`")
    unit: str = Field("", description="UCUM unit code, e.g. Cel, %, g/L")
    scale: float = Field(1.0, description="val = raw * scale + offset (numeric tags)")
    offset: float = 0.0
    deadband: float = Field(
        0.0, ge=0, description="Report a numeric value only when it moved more than this"
    )


class DeviceConfig(StrictModel):
    """Fields every device shares; each driver subclasses it."""

    id: str = Field(pattern=ID_PATTERN, description="Device id: the `dev` field and topic level")
    driver: str
    enabled: bool = True
    poll_interval: float = Field(1.0, gt=0, le=86400, description="Seconds between polls")
    tags: Sequence[TagConfig] = Field(min_length=1)

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, tags: Sequence[TagConfig]) -> Sequence[TagConfig]:
        seen: set[str] = set()
        for t in tags:
            if t.name in seen:
                raise ValueError(f"tag name {t.name!r} appears twice")
            seen.add(t.name)
        return tags


class Config(StrictModel):
    gateway: GatewaySection
    broker: BrokerSection = BrokerSection()
    outbox: OutboxSection = OutboxSection()
    health: HealthSection = HealthSection()
    checkpoints: CheckpointsSection = CheckpointsSection()
    sparkplug: SparkplugSection = SparkplugSection()
    devices: list[DeviceConfig] = Field(default_factory=list)
    source: Path | None = None
    source_sha256: str | None = Field(None, description="SHA-256 (hex) of the file's bytes")

    @property
    def outbox_path(self) -> Path:
        return self.outbox.path or self.gateway.state_dir / "outbox.db"

    @property
    def key_path(self) -> Path:
        return self.checkpoints.key_file or self.gateway.state_dir / "checkpoint.key"


class _Raw(StrictModel):
    gateway: GatewaySection
    broker: BrokerSection = BrokerSection()
    outbox: OutboxSection = OutboxSection()
    health: HealthSection = HealthSection()
    checkpoints: CheckpointsSection = CheckpointsSection()
    sparkplug: SparkplugSection = SparkplugSection()
    devices: list[dict[str, Any]] = Field(default_factory=list)


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; raises ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return config_from_bytes(raw, path, os.environ if env is None else env)


def config_from_bytes(raw: bytes, source: Path, env: Mapping[str, str]) -> Config:
    """Validate a config file's bytes; the result carries their SHA-256 (the audit hash)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text: {exc}") from None
    cfg = parse_config(text, source, env)
    return cfg.model_copy(update={"source_sha256": hashlib.sha256(raw).hexdigest()})


def parse_config(text: str, source: Path, env: Mapping[str, str]) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    inline = _inline_passwords(data)
    data = _interpolate(data, env, source, ())
    # Errors are raised "from None": pydantic's own message quotes input
    # values, and a chained traceback would leak a password into a log.
    try:
        raw = _Raw.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join([_format(source, exc, ()), *inline])) from None
    from gateway.registry import driver_class  # late: the registry imports config models

    devices: list[DeviceConfig] = []
    problems: list[str] = list(inline)
    seen: dict[str, int] = {}
    for i, dev in enumerate(raw.devices):
        where = ("devices", i)
        name = dev.get("driver")
        if not isinstance(name, str):
            what = "required key is missing" if name is None else f"must be a string (got {name!r})"
            problems.append(f"  {_loc((*where, 'driver'))}: {what}: the driver name")
            continue
        try:
            model = driver_class(name).config_model
        except ConfigError as exc:
            problems.append(f"  {_loc((*where, 'driver'))}: {exc}")
            continue
        try:
            device = model.model_validate(dev)
        except ValidationError as exc:
            problems.extend(_format(source, exc, where).splitlines()[1:])
            continue
        if device.id in seen:
            problems.append(
                f"  {_loc((*where, 'id'))}: device id {device.id!r} already used by "
                f"{_loc(('devices', seen[device.id]))}"
            )
        seen[device.id] = i
        devices.append(device)
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n" + "\n".join(problems))
    return Config(
        gateway=raw.gateway,
        broker=raw.broker,
        outbox=raw.outbox,
        health=raw.health,
        checkpoints=raw.checkpoints,
        sparkplug=raw.sparkplug,
        devices=devices,
        source=source,
    )


def _inline_passwords(data: Mapping[str, Any]) -> list[str]:
    """Problems for every ``password`` written as a literal instead of ``${VAR}``."""
    places: list[tuple[tuple[Any, ...], Any]] = []
    broker = data.get("broker")
    if isinstance(broker, dict):
        places.append((("broker", "password"), broker.get("password")))
    devices = data.get("devices")
    if isinstance(devices, list):
        for i, dev in enumerate(devices):
            if isinstance(dev, dict):
                places.append((("devices", i, "password"), dev.get("password")))
    return [
        f"  {_loc(where)}: a password written in the config file is refused (the file is "
        f'not a secret store): write password = "${{VAR}}" to take it from the environment, '
        f"or use {where[-1]}_file" + (" or password_credential" if where[0] == "broker" else "")
        for where, value in places
        if isinstance(value, str) and not _ENV_ONLY.match(value)
    ]


def _interpolate(value: Any, env: Mapping[str, str], source: Path, where: tuple[Any, ...]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{source}: invalid configuration:\n  {_loc(where)}: environment variable "
                f"{name} is not set (write ${{{name}:-default}} to give a default)"
            )

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, source, (*where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, source, (*where, i)) for i, v in enumerate(value)]
    return value


def _loc(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _format(source: Path, exc: ValidationError, prefix: tuple[Any, ...]) -> str:
    lines = [f"{source}: invalid configuration:"]
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = (*prefix, *loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `gateway schema`)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        sensitive = any(s in str(p).lower() for p in loc for s in _SENSITIVE)
        got = err.get("input")
        if not sensitive and err["type"] not in ("extra_forbidden", "missing") and _scalar(got):
            msg += f" (got {got!r})"
        lines.append(f"  {_loc(path)}: {msg}")
    return "\n".join(lines)


def _scalar(v: Any) -> bool:
    return isinstance(v, str | int | float | bool)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the config file, devices as a union over every known driver."""
    from gateway.registry import all_driver_classes

    models = [cls.config_model for cls in all_driver_classes()]
    device_union: Any = models[0]
    for m in models[1:]:
        device_union = device_union | m
    root = create_model(
        "GatewayConfigFile",
        __base__=StrictModel,
        gateway=(GatewaySection, ...),
        broker=(BrokerSection, BrokerSection()),
        outbox=(OutboxSection, OutboxSection()),
        health=(HealthSection, HealthSection()),
        checkpoints=(CheckpointsSection, CheckpointsSection()),
        sparkplug=(SparkplugSection, SparkplugSection()),
        devices=(list[device_union], Field(default_factory=list)),
    )
    return root.model_json_schema()


def summary(cfg: Config) -> str:
    """What `gateway check` prints: devices, tags, poll rates, broker, outbox."""
    b = cfg.broker
    tls = "TLS" if b.tls else "plain TCP"
    auth = f", user {b.username}" if b.username else ""
    lines = [
        f"config {cfg.source}: OK",
        f"gateway {cfg.gateway.id}, state in {cfg.gateway.state_dir}",
        f"broker mqtt://{b.host}:{b.port} (MQTT {b.protocol}, {tls}{auth}), "
        + (
            f"topics {b.topic_prefix}/{cfg.gateway.id}/<device>"
            if b.output == "records"
            else f"topics spBv1.0/{cfg.sparkplug.group_id}/<type>/"
            f"{cfg.sparkplug.edge_node_id or cfg.gateway.id}/<device> (Sparkplug B)"
        ),
        f"outbox {cfg.outbox_path} quota {cfg.outbox.max_bytes.human_readable()} "
        f"policy {cfg.outbox.policy}, durability {cfg.outbox.durability}",
        f"health http://{cfg.health.listen}:{cfg.health.port}/ (/healthz, /readyz, /metrics)"
        if cfg.health.enabled
        else "health endpoint off",
        f"{len(cfg.devices)} device(s), {sum(len(d.tags) for d in cfg.devices)} tag(s):",
    ]
    for d in cfg.devices:
        rate = len(d.tags) / d.poll_interval
        state = "" if d.enabled else " (disabled)"
        lines.append(
            f"  {d.id}: driver {d.driver}, {len(d.tags)} tag(s) every {d.poll_interval:g} s "
            f"(~{rate:g} readings/s){state}"
        )
    return "\n".join(lines)
