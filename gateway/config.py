"""Configuration: TOML validated by pydantic, one model per section and per driver.

Errors name the file, the field path (``devices[2].tags[5].data_type``) and what
was expected. Unknown keys are errors. Any string may reference the environment
as ``${VAR}`` or ``${VAR:-default}``; secrets may also come from files
(``password_file``) and are held as ``SecretStr`` so they never reach a log.
"""

from __future__ import annotations

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

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:/%-]{0,127}$"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SENSITIVE = ("password", "secret", "token", "key")


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
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="File holding the password")
    tls: TLSSection | None = None
    topic_prefix: str = Field("plant", pattern=r"^[^#+$][^#+]*$")
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds")
    inflight: int = Field(
        32, ge=1, le=1000, description="Messages awaiting PUBACK at once (kept small on purpose)"
    )
    reconnect_min: float = Field(0.5, gt=0, description="First reconnect delay, seconds")
    reconnect_max: float = Field(30.0, gt=0, description="Longest reconnect delay, seconds")

    @model_validator(mode="after")
    def _secrets(self) -> BrokerSection:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be >= reconnect_min")
        return self

    def secret_password(self) -> str | None:
        """The password, read from password_file when one is given."""
        return resolve_secret(self.password, self.password_file, "broker.password_file")


def resolve_secret(value: SecretStr | None, file: Path | None, field: str) -> str | None:
    """A secret given inline or in a file (one line; the newline is not part of it)."""
    if value is not None:
        return value.get_secret_value()
    if file is None:
        return None
    try:
        return file.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {file}: {exc.strerror or exc}") from None


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
    devices: list[DeviceConfig] = Field(default_factory=list)
    source: Path | None = None

    @property
    def outbox_path(self) -> Path:
        return self.outbox.path or self.gateway.state_dir / "outbox.db"


class _Raw(StrictModel):
    gateway: GatewaySection
    broker: BrokerSection = BrokerSection()
    outbox: OutboxSection = OutboxSection()
    devices: list[dict[str, Any]] = Field(default_factory=list)


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_config(text, path, os.environ if env is None else env)


def parse_config(text: str, source: Path, env: Mapping[str, str]) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    data = _interpolate(data, env, source, ())
    # Errors are raised "from None": pydantic's own message quotes input
    # values, and a chained traceback would leak a password into a log.
    try:
        raw = _Raw.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(source, exc, ())) from None
    from gateway.registry import driver_class  # late: the registry imports config models

    devices: list[DeviceConfig] = []
    problems: list[str] = []
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
        gateway=raw.gateway, broker=raw.broker, outbox=raw.outbox, devices=devices, source=source
    )


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
        f"topics {b.topic_prefix}/{cfg.gateway.id}/<device>",
        f"outbox {cfg.outbox_path} quota {cfg.outbox.max_bytes.human_readable()} "
        f"policy {cfg.outbox.policy}, durability {cfg.outbox.durability}",
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
