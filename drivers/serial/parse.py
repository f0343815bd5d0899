"""Pure parsing for the serial driver: framing, matching, conversion, checksums.

Nothing here does I/O or keeps time, so everything is tested as plain
functions (tests/test_serial_parse.py), including with arbitrary bytes.

* :class:`LineFramer` cuts a byte stream into lines at a terminator, with a
  bounded buffer: a line longer than ``max_line`` bytes is discarded (one
  :class:`Overflow` event) up to its terminator. The events do not depend on
  how the stream was split into chunks.
* :class:`LineParser` matches one line against a profile's messages and
  returns a :class:`Parsed`: values as text (with their unit), an error line,
  or a failure naming the problem. It never raises on input.
* :func:`convert` turns a value's text into its data type, strictly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from drivers.serial.profiles import ChecksumAlgorithm, DataType, Message, Profile

Value = float | int | bool | str

# --- framing ------------------------------------------------------------------------

PREVIEW_BYTES = 16


@dataclass(frozen=True, slots=True)
class Line:
    """One complete line, terminator removed."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Overflow:
    """A line longer than ``max_line`` bytes, discarded; ``head`` is its first bytes."""

    head: bytes


Event = Line | Overflow


def _partial_terminator(buf: bytes | bytearray, term: bytes) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``term``."""
    for k in range(min(len(term) - 1, len(buf)), 0, -1):
        if buf.endswith(term[:k]):
            return k
    return 0


class LineFramer:
    """Splits a byte stream into lines; holds at most ``max_line`` + terminator bytes.

    A segment (bytes between two terminators) of more than ``max_line`` bytes
    yields one :class:`Overflow` as soon as it is known to be too long; its
    bytes are dropped up to and including its terminator. The sequence of
    events is the same however the stream is split into ``feed`` calls.
    """

    def __init__(self, terminator: bytes, max_line: int) -> None:
        if not terminator:
            raise ValueError("the terminator must not be empty")
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.terminator = terminator
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False

    @property
    def pending(self) -> bytes:
        """Bytes of an unfinished line (empty while an over-long line is being dropped)."""
        return b"" if self._discarding else bytes(self._buf)

    def reset(self) -> bytes:
        """Forget everything buffered; returns the unfinished line's bytes."""
        pending = self.pending
        self._buf.clear()
        self._discarding = False
        return pending

    def feed(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        buf, term, limit = self._buf, self.terminator, self.max_line
        buf += data
        start = 0
        while (end := buf.find(term, start)) >= 0:
            if self._discarding:
                self._discarding = False  # Overflow was emitted when it began
            elif end - start > limit:
                out.append(Overflow(bytes(buf[start : start + min(PREVIEW_BYTES, limit)])))
            else:
                out.append(Line(bytes(buf[start:end])))
            start = end + len(term)
        del buf[:start]
        # No terminator left in buf. Keep only what can still be a line's start:
        # the tail that may begin a terminator is kept in every case.
        keep = _partial_terminator(buf, term)
        if self._discarding:
            del buf[: len(buf) - keep]
        elif len(buf) - keep > limit:
            out.append(Overflow(bytes(buf[: min(PREVIEW_BYTES, limit)])))
            self._discarding = True
            del buf[: len(buf) - keep]
        return out


# --- checksums ----------------------------------------------------------------------


def compute_checksum(algorithm: ChecksumAlgorithm, data: bytes) -> int:
    if algorithm == "xor8":
        acc = 0
        for b in data:
            acc ^= b
        return acc
    if algorithm == "sum8":
        return sum(data) & 0xFF
    if algorithm == "sum8_twos":
        return -sum(data) & 0xFF
    crc = 0xFFFF  # crc16_modbus: reflected 0x8005, init 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def format_checksum(algorithm: ChecksumAlgorithm, value: int, fmt: str = "hex") -> str:
    if fmt == "dec":
        return str(value)
    return f"{value:04X}" if algorithm == "crc16_modbus" else f"{value:02X}"


# --- conversion and units -------------------------------------------------------------

_FLOAT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INT = re.compile(r"[+-]?\d+")
_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})


class ConversionError(ValueError):
    """A value's text does not fit its data type."""


def convert(text: str, data_type: DataType, decimal: str = ".") -> Value:
    """The value of ``text`` as ``data_type``; ConversionError when it is not one.

    Numbers are matched strictly (no ``nan``, ``inf``, ``1_000``, blanks inside);
    a value that does not fit is an error, never a guess.
    """
    if data_type == "string":
        return text
    t = text.strip()
    if data_type == "bool":
        low = t.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConversionError(f"{preview(t)} is not a boolean")
    if data_type == "int":
        if not _INT.fullmatch(t):
            raise ConversionError(f"{preview(t)} is not an integer")
        return int(t)
    if decimal == ",":
        if "." in t:
            raise ConversionError(f"{preview(t)} is not a number (decimal comma expected)")
        t = t.replace(",", ".")
    if not _FLOAT.fullmatch(t):
        raise ConversionError(f"{preview(text.strip())} is not a number")
    val = float(t)
    if not math.isfinite(val):
        raise ConversionError(f"{preview(text.strip())} is out of range")
    return val


# Unit text an instrument prints -> UCUM code. Exact match (case matters: mg, Mg).
UCUM: Mapping[str, str] = {
    # mass
    "g": "g",
    "mg": "mg",
    "kg": "kg",
    "ug": "ug",
    "µg": "ug",
    "μg": "ug",
    "t": "t",
    "ct": "[car_m]",
    "lb": "[lb_av]",
    "oz": "[oz_av]",
    "ozt": "[oz_tr]",
    "GN": "[gr]",
    "dwt": "[pwt_tr]",
    # temperature
    "C": "Cel",
    "°C": "Cel",
    "ºC": "Cel",
    "degC": "Cel",
    "Cel": "Cel",
    "F": "[degF]",
    "°F": "[degF]",
    "K": "K",
    # dimensionless, electrochemistry
    "%": "%",
    "pH": "[pH]",
    "ppm": "[ppm]",
    "mV": "mV",
    "V": "V",
    "mA": "mA",
    "mS/cm": "mS/cm",
    "uS/cm": "uS/cm",
    "µS/cm": "uS/cm",
    # volume, flow, concentration
    "L": "L",
    "l": "L",
    "mL": "mL",
    "ml": "mL",
    "uL": "uL",
    "µL": "uL",
    "µl": "uL",
    "L/min": "L/min",
    "l/min": "L/min",
    "mL/min": "mL/min",
    "ml/min": "mL/min",
    "g/L": "g/L",
    "g/l": "g/L",
    "mg/L": "mg/L",
    "mg/l": "mg/L",
    # pressure, time
    "bar": "bar",
    "mbar": "mbar",
    "Pa": "Pa",
    "hPa": "hPa",
    "kPa": "kPa",
    "psi": "[psi]",
    "s": "s",
    "min": "min",
    "h": "h",
}


def to_ucum(text: str, extra: Mapping[str, str] | None = None) -> str:
    """The UCUM code of a unit as printed; unknown units are returned as printed."""
    t = text.strip()
    if extra and t in extra:
        return extra[t]
    return UCUM.get(t, t)


def preview(data: str | bytes, limit: int = 32) -> str:
    """A short, printable, quoted rendering of line text for statuses and logs."""
    shown = data[:limit]
    text = repr(shown)[1:] if isinstance(shown, bytes) else repr(shown)
    return text + ("…" if len(data) > limit else "")


# --- matching -----------------------------------------------------------------------

Kind = Literal["blank", "ignored", "values", "error", "failure"]

# Counter names of failures (the driver counts and logs them by these).
PARSE_ERROR = "parse_error"
CHECKSUM_MISMATCH = "checksum_mismatch"
CHECKSUM_MISSING = "checksum_missing"


@dataclass(frozen=True, slots=True)
class FieldText:
    """A value as the line wrote it, with its unit (UCUM) and where the unit came from."""

    text: str
    unit: str | None = None
    reported: bool = False  # True: the line itself gave the unit


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one line says.

    ``kind``: ``blank`` (nothing but blanks), ``ignored`` (a message with
    ``ignore``), ``values`` (``values`` hold the line's values, ``q`` and
    ``status`` the message's), ``error`` (an error line: ``q`` is bad and
    ``status`` says why) or ``failure`` (the line is not what the profile
    describes: ``status`` names the problem, ``problem`` is its counter name).
    ``fields`` are the values the line was due to carry (None: every value).
    """

    kind: Kind
    q: str = "good"
    status: str | None = None
    message: str | None = None
    values: Mapping[str, FieldText] = field(default_factory=dict)
    fields: frozenset[str] | None = None
    problem: str | None = None

    @property
    def bad(self) -> bool:
        return self.kind in ("error", "failure")


BLANK = Parsed("blank")


def _failure(problem: str, status: str) -> Parsed:
    return Parsed("failure", "bad", status, problem=problem)


@dataclass(frozen=True, slots=True)
class _Rule:
    message: Message
    regex: re.Pattern[str]
    fields: frozenset[str] | None


class LineParser:
    """Matches lines against a profile. ``parse`` never raises on any input."""

    def __init__(
        self,
        profile: Profile,
        *,
        encoding: str | None = None,
        require_checksum: bool | None = None,
    ) -> None:
        self.profile = profile
        self.encoding = encoding or profile.port.encoding
        self._roles = profile.role_groups()
        self._rules = [
            _Rule(m, re.compile(m.pattern), _frozen(profile.message_fields(m)))
            for m in profile.messages
        ]
        cs = profile.checksum
        self._checksum = cs
        # Without a [checksum] there is nothing to require (config refuses the combination).
        self._require = cs is not None and (
            cs.required if require_checksum is None else require_checksum
        )

    def parse(self, line: bytes) -> Parsed:
        try:
            text = line.decode(self.encoding)
        except UnicodeDecodeError:
            return _failure(PARSE_ERROR, f"parse error: not {self.encoding} text: {preview(line)}")
        if self.profile.strip:
            text = text.strip()
        if not text:
            return BLANK
        for rule in self._rules:
            m = rule.regex.fullmatch(text)
            if m is not None:
                return self._matched(rule, m, text)
        return _failure(PARSE_ERROR, f"parse error: unexpected line {preview(text)}")

    def _matched(self, rule: _Rule, m: re.Match[str], text: str) -> Parsed:
        msg = rule.message
        if msg.ignore:
            return Parsed("ignored", message=msg.name)
        bad = self._verify_checksum(m, text)
        if bad is not None:
            return bad
        if msg.quality == "bad":
            return Parsed("error", "bad", msg.status, msg.name, fields=rule.fields)
        values: dict[str, str] = {
            name: val
            for name, val in m.groupdict().items()
            if val is not None and name not in self._roles
        }
        if msg.split is not None:
            failed = _split(m.group(msg.split.group) or "", msg, values)
            if failed is not None:
                return failed
        out: dict[str, FieldText] = {}
        specs = self.profile.fields
        for name, val in values.items():
            spec = specs.get(name)
            unit: str | None = None
            reported = False
            if spec is not None and spec.unit_group is not None:
                printed = m.groupdict().get(spec.unit_group)
                if printed and printed.strip():
                    unit, reported = to_ucum(printed, self.profile.units), True
            if unit is None and spec is not None and spec.unit:
                unit = spec.unit
            out[name] = FieldText(val, unit, reported)
        return Parsed("values", msg.quality, msg.status, msg.name, out, rule.fields)

    def _verify_checksum(self, m: re.Match[str], text: str) -> Parsed | None:
        cs = self._checksum
        if cs is None:
            return None
        got = m.groupdict().get(cs.group)
        if got is None:
            return _failure(CHECKSUM_MISSING, "checksum missing") if self._require else None
        if cs.covers is not None:
            covered = m.groupdict().get(cs.covers) or ""
        else:
            covered = text[: m.start(cs.group)]
        try:
            expected = compute_checksum(cs.algorithm, covered.encode(self.encoding))
            value = int(got, 16 if cs.format == "hex" else 10)
        except (UnicodeEncodeError, ValueError):
            return _failure(CHECKSUM_MISMATCH, f"checksum mismatch: unreadable {preview(got)}")
        if value != expected:
            want = format_checksum(cs.algorithm, expected, cs.format)
            return _failure(
                CHECKSUM_MISMATCH, f"checksum mismatch: line has {got}, computed {want}"
            )
        return None


def _frozen(names: set[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(names)


def _split(text: str, msg: Message, values: dict[str, str]) -> Parsed | None:
    """Adds the split group's values to ``values``; a failure if the text does not fit."""
    split = msg.split
    assert split is not None
    parts = text.split(split.separator)
    if split.columns is not None:
        if len(parts) != len(split.columns):
            return _failure(
                PARSE_ERROR,
                f"parse error: {len(parts)} values, expected {len(split.columns)} columns",
            )
        values.update(zip(split.columns, (p.strip() for p in parts), strict=True))
        return None
    assert split.assign is not None
    seen: set[str] = set()
    for part in parts:
        if not part.strip():
            continue  # a trailing or doubled separator
        key, sep, val = part.partition(split.assign)
        key = key.strip()
        # A second '=' in one pair is two lines run together (a partial line): refuse it.
        if not sep or not key or split.assign in val:
            return _failure(
                PARSE_ERROR, f"parse error: {preview(part)} is not key{split.assign}value"
            )
        if key in seen:
            return _failure(PARSE_ERROR, f"parse error: key {preview(key)} appears twice")
        seen.add(key)
        values[key] = val.strip()
    return None
