"""Instrument profiles: what an instrument says and how to read it, as data.

A profile is a TOML file (``drivers/serial/profiles/<name>.toml``, or any file
given by path) validated by :class:`Profile`. It holds the port defaults, the
commands of request mode, the line patterns (regular expressions with named
groups), the value types and units, and an optional checksum. Adding an
instrument means adding a file: no driver code changes (see
docs/drivers/serial.md, "Writing a profile").
"""

from __future__ import annotations

import codecs
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from gateway.config import StrictModel

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
_PROFILE_NAME = re.compile(r"^[a-z0-9_]{1,64}$")

Quality = Literal["good", "uncertain", "bad"]
DataType = Literal["float", "int", "string", "bool"]
Parity = Literal["none", "even", "odd", "mark", "space"]
FlowControl = Literal["none", "rtscts", "xonxoff"]
Mode = Literal["request", "stream"]
ChecksumAlgorithm = Literal["xor8", "sum8", "sum8_twos", "crc16_modbus"]
STOPBITS = (1.0, 1.5, 2.0)


def check_stopbits(value: float) -> float:
    if value not in STOPBITS:
        raise ValueError("stopbits must be 1, 1.5 or 2")
    return value


def check_encoding(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise ValueError(f"unknown text encoding {value!r}") from None
    return value


class PortDefaults(StrictModel):
    """``[port]``: line settings of the instrument (each one a device key too)."""

    baudrate: int = Field(9600, ge=50, le=4_000_000, description="Bits per second")
    bytesize: Literal[5, 6, 7, 8] = Field(8, description="Data bits")
    parity: Parity = "none"
    stopbits: float = Field(1, description="1, 1.5 or 2")
    flow_control: FlowControl = Field("none", description="none, rtscts (hardware), xonxoff")
    terminator: str = Field(
        "\r\n", min_length=1, max_length=8, description="Ends every line, both directions"
    )
    encoding: str = Field("ascii", description="Python codec of the lines, e.g. ascii, latin-1")

    _stopbits = field_validator("stopbits")(check_stopbits)
    _encoding = field_validator("encoding")(check_encoding)


class FieldSpec(StrictModel):
    """``[fields.<name>]``: the type and unit of one value."""

    data_type: DataType = Field("float", description="float, int, string or bool")
    unit: str = Field("", description="UCUM unit of the value, when the line does not say")
    unit_group: str | None = Field(
        None, description="Named group of the pattern holding the unit the line reports"
    )


class Split(StrictModel):
    """Splits one group of the line into several values (key=value pairs or CSV columns)."""

    group: str = Field(description="Named group of the pattern holding the values")
    separator: str = Field(min_length=1, description="Between two values, e.g. ';' or ','")
    assign: str | None = Field(
        None, min_length=1, description="Between key and value ('='): key=value pairs"
    )
    columns: list[str] | None = Field(
        None, min_length=1, description="Value names by position: a CSV line"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Split:
        if (self.assign is None) == (self.columns is None):
            raise ValueError("give `assign` (key=value pairs) or `columns` (CSV), not both")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError("a column name appears twice")
        return self


class Checksum(StrictModel):
    """``[checksum]``: a checksum carried by the line in a named group."""

    algorithm: ChecksumAlgorithm = Field(description="xor8, sum8, sum8_twos or crc16_modbus")
    group: str = Field("checksum", description="Named group holding the checksum")
    covers: str | None = Field(
        None,
        description="Named group of the bytes it covers; default: everything before the group",
    )
    format: Literal["hex", "dec"] = Field("hex", description="How the checksum is written")
    required: bool = Field(True, description="A line without the checksum group is bad")


class Message(StrictModel):
    """``[[messages]]``: one kind of line the instrument sends."""

    name: str = Field(pattern=NAME_PATTERN, description="Name, for logs and `fields` checks")
    pattern: str = Field(min_length=1, description="Regular expression the whole line matches")
    quality: Quality = Field("good", description="Quality of the values of such a line")
    status: str | None = Field(None, description="Status of its readings (required when bad)")
    ignore: bool = Field(False, description="Skip such a line (an echo, a prompt, an ack)")
    split: Split | None = None
    fields: list[str] | None = Field(
        None, description="Values such a line must carry; default: its named groups or columns"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Message:
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"message {self.name!r}: invalid pattern: {exc}") from None
        if self.quality == "bad" and not self.status:
            raise ValueError(f"message {self.name!r}: a bad message needs a `status`")
        if self.ignore and (self.quality != "good" or self.status or self.split or self.fields):
            raise ValueError(f"message {self.name!r}: an ignored line carries nothing else")
        if self.split is not None and self.split.group not in compiled.groupindex:
            raise ValueError(
                f"message {self.name!r}: split group {self.split.group!r} is not a named "
                "group of its pattern"
            )
        return self

    def groups(self) -> set[str]:
        return set(re.compile(self.pattern).groupindex)


class Command(StrictModel):
    """``[[commands]]``: one request of request mode."""

    name: str = Field(pattern=NAME_PATTERN, description="Name, for tags' `command`")
    send: str = Field(min_length=1, description="Sent as is, followed by the terminator")
    timeout: float | None = Field(
        None, gt=0, le=3600, description="Seconds to wait for its reply; default: `timeout`"
    )
    fields: list[str] | None = Field(
        None, description="Values its reply carries; default: every value of the profile"
    )


class Profile(StrictModel):
    """An instrument profile: a TOML file, or ``inline_profile`` of a device."""

    description: str = ""
    mode: Mode = Field("request", description="request: poll with commands; stream: just listen")
    port: PortDefaults = PortDefaults()
    timeout: float = Field(
        1.0, gt=0, le=3600, description="request: s per reply; stream: longest silence"
    )
    decimal: Literal[".", ","] = Field(".", description="Decimal separator of numbers")
    strip: bool = Field(True, description="Strip blanks around each line before matching")
    on_connect: list[str] = Field(
        default_factory=list, description="Commands sent once after opening (e.g. SIR)"
    )
    commands: list[Command] = Field(default_factory=list)
    messages: list[Message] = Field(min_length=1)
    fields: dict[str, FieldSpec] = Field(default_factory=dict)
    checksum: Checksum | None = None
    units: dict[str, str] = Field(
        default_factory=dict, description="Unit text of the line -> UCUM code, beyond built-ins"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        for what, names in (
            ("command", [c.name for c in self.commands]),
            ("message", [m.name for m in self.messages]),
        ):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{what} name {sorted(dup)[0]!r} appears twice")
        for name, spec in self.fields.items():
            if spec.unit_group is not None and not any(
                spec.unit_group in m.groups() for m in self.messages
            ):
                raise ValueError(
                    f"fields.{name}.unit_group {spec.unit_group!r} is not a named group of "
                    "any message pattern"
                )
        cs = self.checksum
        if cs is not None:
            for m in self.messages:
                groups = m.groups()
                if cs.group not in groups:
                    if cs.required and not m.ignore:
                        raise ValueError(
                            f"message {m.name!r}: pattern has no checksum group {cs.group!r} "
                            "(and checksum.required is true)"
                        )
                    continue
                if cs.covers is not None and cs.covers not in groups:
                    raise ValueError(
                        f"message {m.name!r}: pattern has no group {cs.covers!r} (checksum.covers)"
                    )
        return self

    def role_groups(self) -> set[str]:
        """Named groups that hold no value: units, checksum, split input."""
        roles = {s.unit_group for s in self.fields.values() if s.unit_group is not None}
        if self.checksum is not None:
            roles.add(self.checksum.group)
            if self.checksum.covers is not None:
                roles.add(self.checksum.covers)
        roles.update(m.split.group for m in self.messages if m.split is not None)
        return roles

    def message_fields(self, message: Message) -> set[str] | None:
        """The values a line of ``message`` carries; None when not known in advance."""
        if message.fields is not None:
            return set(message.fields)
        if message.quality == "bad":
            return None  # an error line concerns every value that was due
        if message.split is not None and message.split.columns is None:
            return None  # key=value pairs: the keys come with the line
        names = message.groups() - self.role_groups()
        if message.split is not None and message.split.columns is not None:
            names.update(message.split.columns)
        return names

    def all_fields(self) -> set[str] | None:
        """Every value a line may carry; None when some message's keys are open."""
        out: set[str] = set()
        for m in self.messages:
            if m.ignore or m.quality == "bad":
                continue
            names = self.message_fields(m)
            if names is None:
                return None
            out |= names
        return out

    def command_fields(self, command: Command) -> set[str] | None:
        if command.fields is not None:
            return set(command.fields)
        return self.all_fields()


class ProfileError(ValueError):
    """A profile cannot be found, read or validated; the message says which and why."""


def builtin_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def is_path(ref: str) -> bool:
    """A profile reference is a path when it has a slash or ends in .toml."""
    return "/" in ref or ref.endswith(".toml")


def profile_path(ref: str) -> Path:
    if is_path(ref):
        return Path(ref).expanduser()
    if not _PROFILE_NAME.match(ref) or not (PROFILE_DIR / f"{ref}.toml").is_file():
        raise ProfileError(
            f"unknown profile {ref!r}; built-in profiles: {', '.join(builtin_names())} "
            "(or give the path of a .toml file)"
        )
    return PROFILE_DIR / f"{ref}.toml"


def load_profile(ref: str) -> Profile:
    """The profile named ``ref`` (built-in) or stored at path ``ref``; ProfileError if not."""
    path = profile_path(ref)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"profile {str(path)!r}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {str(path)!r}: not valid TOML: {exc}") from None
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"profile {str(path)!r}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """A pydantic error as one line: ``where: what; where: what``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
