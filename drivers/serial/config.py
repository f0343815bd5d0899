"""Configuration models of the serial driver: a device, its tags, and what they resolve to.

The profile is loaded and checked against the tags when the configuration is
loaded, so every mistake (unknown profile, a tag naming a value no line
carries, an ambiguous command) is a configuration error, and the driver's
constructor cannot fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from drivers.serial.profiles import (
    Command,
    DataType,
    FlowControl,
    Mode,
    Parity,
    Profile,
    ProfileError,
    check_encoding,
    check_stopbits,
    load_profile,
)
from gateway.config import DeviceConfig, TagConfig


class SerialTag(TagConfig):
    """One value of the instrument's lines."""

    field: str | None = Field(
        None,
        min_length=1,
        description="The value's name in the line (named group, key or column); default: name",
    )
    command: str | None = Field(
        None,
        description="Request mode: the command whose reply holds the value; default: the first",
    )
    data_type: DataType | None = Field(
        None, description="float, int, string or bool; default: the profile's, else float"
    )
    device_unit: str | None = Field(
        None,
        description="Unit the line must report (UCUM); default: `unit` when scale=1, offset=0",
    )


@dataclass(frozen=True, slots=True)
class PortSettings:
    """Everything needed to open the port (no I/O here)."""

    path: str
    baudrate: int
    bytesize: int
    parity: Parity
    stopbits: float
    flow_control: FlowControl
    exclusive: bool


@dataclass(frozen=True, slots=True)
class TagPlan:
    """A tag resolved against the profile."""

    name: str
    field: str
    data_type: DataType
    command: str | None
    expect_unit: str  # "" = no check


class SerialDevice(DeviceConfig):
    """An instrument on a serial port (RS-232, RS-485, USB CDC/virtual COM port)."""

    driver: Literal["serial"]
    port: str = Field(
        min_length=1,
        description="Device path, preferably /dev/serial/by-id/... (stable across replugs)",
    )
    profile: str | None = Field(
        None, description="Built-in profile name (mt_sics, kv_meter) or path of a .toml profile"
    )
    inline_profile: Profile | None = Field(
        None, description="The profile written in the device block instead of a file"
    )
    mode: Mode | None = Field(None, description="request or stream; default: the profile's")
    baudrate: int | None = Field(None, ge=50, le=4_000_000, description="Default: the profile's")
    bytesize: Literal[5, 6, 7, 8] | None = Field(None, description="Default: the profile's")
    parity: Parity | None = Field(None, description="none, even, odd, mark, space")
    stopbits: float | None = Field(None, description="1, 1.5 or 2; default: the profile's")
    flow_control: FlowControl | None = Field(None, description="none, rtscts or xonxoff")
    terminator: str | None = Field(
        None, min_length=1, max_length=8, description="Line terminator; default: the profile's"
    )
    encoding: str | None = Field(None, description="Text encoding; default: the profile's")
    timeout: float | None = Field(
        None, gt=0, le=3600, description="request: s per reply; stream: longest silence"
    )
    fail_after: int = Field(
        3, ge=1, le=1000, description="Unanswered requests / silent timeouts before reopening"
    )
    max_line: int = Field(
        1024, ge=16, le=65536, description="Longest line in bytes; longer ones are discarded"
    )
    exclusive: bool = Field(True, description="Lock the port against other programs")
    require_checksum: bool | None = Field(
        None, description="Refuse lines without a checksum; default: the profile's"
    )
    on_connect: list[str] | None = Field(
        None, description="Commands sent once after opening; default: the profile's"
    )
    tags: list[SerialTag] = Field(min_length=1)

    _profile: Profile | None = PrivateAttr(None)
    _plans: tuple[TagPlan, ...] = PrivateAttr(())

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, value: float | None) -> float | None:
        return None if value is None else check_stopbits(value)

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str | None) -> str | None:
        return None if value is None else check_encoding(value)

    @model_validator(mode="after")
    def _resolve(self) -> SerialDevice:
        if (self.profile is None) == (self.inline_profile is None):
            raise ValueError("give one of `profile` (a name or a file) and `inline_profile`")
        if self.inline_profile is not None:
            prof = self.inline_profile
        else:
            assert self.profile is not None
            try:
                prof = load_profile(self.profile)
            except ProfileError as exc:
                raise ValueError(str(exc)) from None
        self._profile = prof
        mode = self.effective_mode
        if mode == "request" and not prof.commands:
            raise ValueError("request mode needs commands, and the profile defines none")
        if self.require_checksum and prof.checksum is None:
            raise ValueError("require_checksum: the profile defines no [checksum]")
        enc = self.effective_encoding
        for what, text in (
            ("terminator", self.effective_terminator),
            *(("command", c.send) for c in prof.commands),
            *(("on_connect", c) for c in self.effective_on_connect),
        ):
            try:
                text.encode(enc)
            except UnicodeEncodeError:
                raise ValueError(f"{what} {text!r} cannot be written in {enc}") from None
        self._plans = tuple(self._plan(i, t, prof, mode) for i, t in enumerate(self.tags))
        return self

    def _plan(self, i: int, tag: SerialTag, prof: Profile, mode: Mode) -> TagPlan:
        where = f"tags[{i}] ({tag.name})"
        name = tag.field or tag.name
        spec = prof.fields.get(name)
        data_type = tag.data_type or (spec.data_type if spec is not None else "float")
        scaled = tag.scale != 1.0 or tag.offset != 0.0
        from_line = spec is not None and spec.unit_group is not None
        if scaled and not tag.unit and (from_line or (spec is not None and spec.unit)):
            # The device's unit would be stamped on a value scale/offset changed.
            raise ValueError(
                f"{where}: scale/offset change the value, so the unit of the line no longer "
                "applies: set `unit` (the unit after scaling)"
            )
        if scaled and from_line and tag.device_unit is None:
            raise ValueError(
                f"{where}: the line reports its unit and scale/offset convert from it: set "
                '`device_unit` to the unit the line must report (e.g. "g"), or "" for no check'
            )
        # The unit the line must report: device_unit, else the tag's unit unless scaled.
        expect = tag.unit if tag.device_unit is None and not scaled else tag.device_unit or ""
        command: str | None = None
        if mode == "stream":
            if tag.command is not None:
                raise ValueError(f"{where}: `command` only applies in request mode")
            known = prof.all_fields()
            if known is not None and name not in known:
                raise ValueError(
                    f"{where}: no line of the profile carries a value {name!r} "
                    f"(it has: {', '.join(sorted(known)) or 'none'}); set `field`"
                )
        else:
            command = _command_for(where, name, tag.command, prof)
        return TagPlan(tag.name, name, data_type, command, expect)

    # --- effective settings: the device's key, else the profile's -----------------------

    @property
    def resolved_profile(self) -> Profile:
        assert self._profile is not None  # set by validation
        return self._profile

    @property
    def tag_plans(self) -> tuple[TagPlan, ...]:
        return self._plans

    @property
    def effective_mode(self) -> Mode:
        return self.mode or self.resolved_profile.mode

    @property
    def effective_timeout(self) -> float:
        return self.timeout if self.timeout is not None else self.resolved_profile.timeout

    @property
    def effective_terminator(self) -> str:
        return (
            self.terminator
            if self.terminator is not None
            else self.resolved_profile.port.terminator
        )

    @property
    def effective_encoding(self) -> str:
        return self.encoding or self.resolved_profile.port.encoding

    @property
    def effective_on_connect(self) -> list[str]:
        return self.on_connect if self.on_connect is not None else self.resolved_profile.on_connect

    def port_settings(self) -> PortSettings:
        p = self.resolved_profile.port
        return PortSettings(
            path=self.port,
            baudrate=self.baudrate or p.baudrate,
            bytesize=self.bytesize or p.bytesize,
            parity=self.parity or p.parity,
            stopbits=self.stopbits or p.stopbits,
            flow_control=self.flow_control or p.flow_control,
            exclusive=self.exclusive,
        )


def _command_for(where: str, field: str, wanted: str | None, prof: Profile) -> str:
    names = [c.name for c in prof.commands]
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{where}: unknown command {wanted!r}; the profile has {names}")
        cmd = next(c for c in prof.commands if c.name == wanted)
        fields = prof.command_fields(cmd)
        if fields is not None and field not in fields:
            raise ValueError(
                f"{where}: the reply to {wanted!r} carries no value {field!r} "
                f"(it has: {', '.join(sorted(fields)) or 'none'})"
            )
        return wanted
    candidates: list[Command] = []
    for c in prof.commands:
        fields = prof.command_fields(c)
        if fields is None or field in fields:
            candidates.append(c)
    if not candidates:
        every = prof.all_fields() or set()
        raise ValueError(
            f"{where}: no reply of the profile carries a value {field!r} "
            f"(they have: {', '.join(sorted(every)) or 'none'}); set `field`"
        )
    return candidates[0].name  # the first one; `command` picks another
