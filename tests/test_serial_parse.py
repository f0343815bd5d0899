"""Serial driver, pure parts: framing, checksums, conversion, units, profiles, matching.

Table tests pin the behaviour line by line; hypothesis checks the properties
that make the driver safe on a noisy line: arbitrary bytes never crash the
framer or the parser, the framer's buffer stays bounded, and framing does not
depend on how the bytes were split into reads.
"""

from __future__ import annotations

import contextlib
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.serial.parse import (
    UCUM,
    ConversionError,
    Line,
    LineFramer,
    LineParser,
    Overflow,
    compute_checksum,
    convert,
    format_checksum,
    preview,
    to_ucum,
)
from drivers.serial.profiles import (
    PROFILE_DIR,
    Profile,
    ProfileError,
    builtin_names,
    load_profile,
)

MT_SICS = load_profile("mt_sics")
KV_METER = load_profile("kv_meter")


def frame(framer: LineFramer, *chunks: bytes) -> list[Line | Overflow]:
    out: list[Line | Overflow] = []
    for c in chunks:
        out.extend(framer.feed(c))
    return out


def xor(data: bytes) -> str:
    return f"{compute_checksum('xor8', data):02X}"


# --- framing ------------------------------------------------------------------------


def test_lines_are_cut_at_the_terminator_and_kept_whole_across_reads() -> None:
    f = LineFramer(b"\r\n", 64)
    assert frame(f, b"S S   1.0 g\r\nS D", b"   2.0 g\r", b"\nS I\r\n") == [
        Line(b"S S   1.0 g"),
        Line(b"S D   2.0 g"),
        Line(b"S I"),
    ]
    assert f.pending == b""


def test_partial_line_stays_pending_until_its_terminator_or_reset() -> None:
    f = LineFramer(b"\r\n", 64)
    assert f.feed(b"pH=7.0") == []
    assert f.pending == b"pH=7.0"
    assert f.reset() == b"pH=7.0"
    assert f.pending == b""
    assert f.feed(b"2\r\n") == [Line(b"2")]


def test_a_line_longer_than_max_line_is_one_overflow_and_the_next_line_is_intact() -> None:
    f = LineFramer(b"\n", 8)
    events = frame(f, b"0123456789", b"abcdef", b"ghi\nOK\n")
    assert events == [Overflow(b"01234567"), Line(b"OK")]
    assert f.pending == b""


def test_overflow_is_found_in_one_read_as_in_many() -> None:
    whole = LineFramer(b"\r\n", 4).feed(b"12345\r\nab\r\n")
    assert whole == [Overflow(b"1234"), Line(b"ab")]


def test_exactly_max_line_is_a_line_even_when_the_terminator_is_split() -> None:
    f = LineFramer(b"\r\n", 4)
    assert frame(f, b"abcd\r", b"\n") == [Line(b"abcd")]


def test_self_overlapping_terminator() -> None:
    f = LineFramer(b"\r\n", 16)
    assert frame(f, b"a\r", b"\r", b"\nb\r\n") == [Line(b"a\r"), Line(b"b")]


def test_framer_rejects_an_empty_terminator() -> None:
    with pytest.raises(ValueError):
        LineFramer(b"", 10)


# --- checksums ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "data", "expected"),
    [
        # NMEA: XOR of everything between '$' and '*'
        ("xor8", b"GPGLL,5300.97914,N,00259.98174,E,125926,A", "28"),
        ("xor8", b"", "00"),
        ("sum8", b"\x01\x02\xff", "02"),
        ("sum8_twos", b"\x01\x02\x03", "FA"),
        ("crc16_modbus", b"123456789", "4B37"),  # the CRC catalogue's check value
    ],
)
def test_checksums(algorithm: Any, data: bytes, expected: str) -> None:
    assert format_checksum(algorithm, compute_checksum(algorithm, data)) == expected


# --- conversion and units -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "data_type", "expected"),
    [
        ("12.345", "float", 12.345),
        ("  -0.002 ", "float", -0.002),
        ("+5", "float", 5.0),
        (".5", "float", 0.5),
        ("1e3", "float", 1000.0),
        ("7.", "float", 7.0),
        ("42", "int", 42),
        ("-7", "int", -7),
        ("ON", "bool", True),
        ("0", "bool", False),
        ("No", "bool", False),
        (" as is ", "string", " as is "),
    ],
)
def test_convert(text: str, data_type: Any, expected: object) -> None:
    val = convert(text, data_type)
    assert val == expected and type(val) is type(expected)


@pytest.mark.parametrize(
    ("text", "data_type"),
    [
        ("nan", "float"),
        ("inf", "float"),
        ("1e999", "float"),
        ("1_000", "float"),
        ("12.3.4", "float"),
        ("", "float"),
        ("- 5", "float"),
        ("7.0pH=7.02", "float"),
        ("12.0", "int"),
        ("0x10", "int"),
        ("maybe", "bool"),
    ],
)
def test_convert_refuses_what_is_not_a_value(text: str, data_type: Any) -> None:
    with pytest.raises(ConversionError):
        convert(text, data_type)


def test_decimal_comma() -> None:
    assert convert("12,5", "float", ",") == 12.5
    with pytest.raises(ConversionError):
        convert("1.234,5", "float", ",")


@pytest.mark.parametrize(
    ("printed", "ucum"),
    [("g", "g"), ("mg", "mg"), ("kg", "kg"), ("%", "%"), ("C", "Cel"), ("°C", "Cel"),
     (" g ", "g"), ("µg", "ug"), ("lb", "[lb_av]"), ("furlong", "furlong")],
)  # fmt: skip
def test_units_map_to_ucum_and_unknown_ones_pass_through(printed: str, ucum: str) -> None:
    assert to_ucum(printed) == ucum


def test_a_profile_can_map_more_units() -> None:
    assert to_ucum("GN", {"GN": "[gr]"}) == "[gr]"
    assert to_ucum("dC", {"dC": "Cel"}) == "Cel"
    assert "Cel" in UCUM.values()


def test_preview_is_short_and_quoted() -> None:
    assert preview("abc") == "'abc'"
    assert preview(b"\xff\x00") == "'\\xff\\x00'"
    assert preview("x" * 40).endswith("…")


# --- MT-SICS -------------------------------------------------------------------------

MT = LineParser(MT_SICS)


@pytest.mark.parametrize(
    ("line", "kind", "q", "status", "weight", "unit"),
    [
        (b"S S      12.345 g", "values", "good", None, "12.345", "g"),
        (b"S S     -0.002 g", "values", "good", None, "-0.002", "g"),
        (b"S S      0.012345 kg", "values", "good", None, "0.012345", "kg"),
        (b"S D      12.301 g", "values", "uncertain", "dynamic", "12.301", "g"),
        (b"  S S 1.5 mg  ", "values", "good", None, "1.5", "mg"),
        (b"S I", "error", "bad", "busy (S I)", None, None),
        (b"S +", "error", "bad", "overload (S +)", None, None),
        (b"S -", "error", "bad", "underload (S -)", None, None),
        (b"ES", "error", "bad", "syntax error (ES)", None, None),
        (b"ET", "error", "bad", "transmission error (ET)", None, None),
        (b"EL", "error", "bad", "logical error (EL)", None, None),
        (b"Z A", "ignored", "good", None, None, None),
        (b'I4 A "B123456789"', "ignored", "good", None, None, None),
        (b"", "blank", "good", None, None, None),
        (b"   ", "blank", "good", None, None, None),
        (b"S S      12.345", "failure", "bad", "parse error: unexpected line 'S S      12.345'",
         None, None),
        (b"S S 12.3 g extra", "failure", "bad", "parse error: unexpected line 'S S 12.3 g extra'",
         None, None),
        (b"S X 1.0 g", "failure", "bad", "parse error: unexpected line 'S X 1.0 g'", None, None),
        (b"\xb5S S 1.0 g", "failure", "bad", "parse error: not ascii text: '\\xb5S S 1.0 g'",
         None, None),
    ],
)  # fmt: skip
def test_mt_sics_replies(
    line: bytes, kind: str, q: str, status: str | None, weight: str | None, unit: str | None
) -> None:
    p = MT.parse(line)
    assert (p.kind, p.q, p.status) == (kind, q, status)
    if weight is None:
        assert not p.values
    else:
        assert p.values["weight"].text == weight
        assert p.values["weight"].unit == unit and p.values["weight"].reported
        assert p.fields == frozenset({"weight"})


# --- the key=value meter -----------------------------------------------------------------

KV = LineParser(KV_METER)
KV_STRICT = LineParser(KV_METER, require_checksum=True)
BODY = b"pH=7.02;T=25.1;DO=41.2"


def test_kv_line_with_and_without_checksum() -> None:
    for line in (BODY, BODY + b"*" + xor(BODY).encode()):
        p = KV.parse(line)
        assert p.kind == "values" and p.q == "good" and p.fields is None
        assert {k: (v.text, v.unit, v.reported) for k, v in p.values.items()} == {
            "pH": ("7.02", "[pH]", False),
            "T": ("25.1", "Cel", False),
            "DO": ("41.2", "%", False),
        }


@pytest.mark.parametrize(
    ("line", "problem", "status"),
    [
        (BODY + b"*00", "checksum_mismatch", "checksum mismatch: line has 00, computed 40"),
        (BODY + b"*40" + b"x", "parse_error", None),
        (b"pH=7.02;pH=7.03", "parse_error", "parse error: key 'pH' appears twice"),
        (b"pH=7.0pH=7.02;T=25.1", "parse_error", "parse error: 'pH=7.0pH=7.02' is not key=value"),
        (b"hello", "parse_error", "parse error: 'hello' is not key=value"),
        (b"=5", "parse_error", "parse error: '=5' is not key=value"),
    ],
)  # fmt: skip
def test_kv_failures(line: bytes, problem: str, status: str | None) -> None:
    p = KV.parse(line)
    assert p.kind == "failure" and p.q == "bad" and p.problem == problem, p
    if status is not None:
        assert p.status == status
    assert not p.values


def test_checksum_can_be_required() -> None:
    p = KV_STRICT.parse(BODY)
    assert (p.kind, p.problem, p.status) == ("failure", "checksum_missing", "checksum missing")
    assert KV_STRICT.parse(BODY + b"*" + xor(BODY).encode()).kind == "values"
    assert KV_STRICT.parse(BODY + b"*" + xor(BODY).lower().encode()).kind == "values"


def test_trailing_separator_and_blanks_are_tolerated() -> None:
    p = KV.parse(b" pH = 7.02 ; T=25.1; \r")
    assert p.kind == "values"
    assert {k: v.text for k, v in p.values.items()} == {"pH": "7.02", "T": "25.1"}


def profile(**overrides: Any) -> Profile:
    base: dict[str, Any] = {"mode": "stream", "messages": [{"name": "m", "pattern": ".*"}]}
    base.update(overrides)
    return Profile.model_validate(base)


def test_csv_columns_and_a_sum_checksum_over_everything_before_it() -> None:
    prof = profile(
        messages=[
            {
                "name": "csv",
                "pattern": r"(?P<row>[^,]*(?:,[^,]*)*),(?P<checksum>\d{1,3})",
                "split": {"group": "row", "separator": ",", "columns": ["flow", "pressure"]},
            }
        ],
        checksum={"algorithm": "sum8", "format": "dec"},
        fields={"flow": {"unit": "mL/min"}},
    )
    body = b"12.5,1.013,"
    line = body + str(compute_checksum("sum8", body)).encode()
    p = LineParser(prof).parse(line)
    assert p.kind == "values", p
    assert {k: (v.text, v.unit) for k, v in p.values.items()} == {
        "flow": ("12.5", "mL/min"),
        "pressure": ("1.013", None),
    }
    assert p.fields == frozenset({"flow", "pressure"})
    bad = LineParser(prof).parse(b"12.5,1.013,1")
    assert bad.problem == "checksum_mismatch"
    short = LineParser(prof).parse(b"12.5," + str(compute_checksum("sum8", b"12.5,")).encode())
    assert short.status == "parse error: 1 values, expected 2 columns"


def test_regex_groups_are_values_and_role_groups_are_not() -> None:
    prof = profile(
        messages=[
            {
                "name": "t",
                "pattern": r"T=(?P<temp>\S+) (?P<u>\S+)(?: P=(?P<pressure>\S+))?",
            }
        ],
        fields={"temp": {"unit_group": "u"}},
    )
    p = LineParser(prof).parse(b"T=37.0 C")
    assert p.kind == "values"
    assert {k: (v.text, v.unit, v.reported) for k, v in p.values.items()} == {
        "temp": ("37.0", "Cel", True)
    }
    assert p.fields == frozenset(
        {"temp", "pressure"}
    )  # an optional group is still a value it may carry


# --- profiles -------------------------------------------------------------------------


def test_builtin_profiles_load() -> None:
    assert {"mt_sics", "kv_meter"} <= set(builtin_names())
    for name in builtin_names():
        load_profile(name)


def test_a_profile_is_loaded_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text((PROFILE_DIR / "kv_meter.toml").read_text())
    assert load_profile(str(path)) == KV_METER


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mode = 'stream'", "messages: required key is missing"),
        ("[[messages]]\nname = 'a'\npattern = '(x'", "message 'a': invalid pattern"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\nquality = 'bad'",
         "message 'a': a bad message needs a `status`"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\nsplit = {group = 'g', separator = ';', "
         "assign = '='}", "split group 'g' is not a named group of its pattern"),
        ("[[messages]]\nname = 'a'\npattern = '(?P<g>x)'\nsplit = {group = 'g', "
         "separator = ';'}", "give `assign` (key=value pairs) or `columns` (CSV), not both"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\n[checksum]\nalgorithm = 'xor8'",
         "message 'a': pattern has no checksum group 'checksum'"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\n[checksum]\nalgorithm = 'md5'",
         "checksum.algorithm: Input should be"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\n[port]\nstopbits = 3",
         "port.stopbits: stopbits must be 1, 1.5 or 2"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\n[port]\nencoding = 'klingon'",
         "port.encoding: unknown text encoding 'klingon'"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\npatern = 'y'", "messages.0.patern: unknown key"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\n[[messages]]\nname = 'a'\npattern = 'y'",
         "message name 'a' appears twice"),
        ("[[messages]]\nname = 'a'\npattern = 'x'\n[fields.v]\nunit_group = 'u'",
         "fields.v.unit_group 'u' is not a named group of any message pattern"),
    ],
)  # fmt: skip
def test_invalid_profiles_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_unknown_profile_names_the_builtins() -> None:
    with pytest.raises(ProfileError, match="unknown profile 'mt-sics'; built-in profiles: "):
        load_profile("mt-sics")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile("/nonexistent/profile.toml")


def test_builtin_profile_files_are_plain_toml() -> None:
    for path in PROFILE_DIR.glob("*.toml"):
        assert tomllib.loads(path.read_text())["messages"]


# --- properties -----------------------------------------------------------------------

TERMINATORS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\x03", b"END", b"\r\n\r\n"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, bytes, int, list[int]]:
    """(terminator, data, max_line, cut points): line-ish data with junk and terminators."""
    term = draw(TERMINATORS)
    max_line = draw(st.integers(1, 40))
    pieces = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=60),
                st.just(term),
                st.sampled_from([b"S S  1.0 g", b"pH=7;T=2", term[:1], b"\r", b"\n"]),
            ),
            max_size=30,
        )
    )
    data = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return term, data, max_line, cuts


@settings(max_examples=400, deadline=None)
@given(streams())
def test_framing_random_splits_equals_framing_the_whole(
    case: tuple[bytes, bytes, int, list[int]],
) -> None:
    term, data, max_line, cuts = case
    whole = LineFramer(term, max_line)
    expected = whole.feed(data)
    split = LineFramer(term, max_line)
    events: list[Line | Overflow] = []
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        events.extend(split.feed(data[a:b]))
        # bounded: an unfinished line never holds more than max_line + a partial terminator
        assert len(split.pending) <= max_line + len(term) - 1
    assert events == expected
    assert split.pending == whole.pending


@settings(max_examples=300, deadline=None)
@given(streams())
def test_framed_lines_are_bounded_and_rebuild_the_stream(
    case: tuple[bytes, bytes, int, list[int]],
) -> None:
    term, data, max_line, _ = case
    f = LineFramer(term, max_line)
    events = f.feed(data)
    for ev in events:
        if isinstance(ev, Line):
            assert len(ev.data) <= max_line and term not in ev.data
        else:
            assert 0 < len(ev.head) <= max_line
    if not any(isinstance(ev, Overflow) for ev in events):
        rebuilt = b"".join(ev.data + term for ev in events if isinstance(ev, Line))
        assert rebuilt + f.pending == data


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([MT, KV, KV_STRICT]))
def test_arbitrary_bytes_never_crash_the_parser(line: bytes, parser: LineParser) -> None:
    p = parser.parse(line)
    assert p.kind in ("blank", "ignored", "values", "error", "failure")
    if p.kind in ("error", "failure"):
        assert p.q == "bad" and p.status and not p.values
    for ft in p.values.values():
        with contextlib.suppress(ConversionError):
            convert(ft.text, "float")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.sampled_from(["float", "int", "bool", "string"]))
def test_convert_raises_nothing_but_conversion_error(text: str, data_type: Any) -> None:
    try:
        val = convert(text, data_type)
    except ConversionError:
        return
    if isinstance(val, float):
        assert math.isfinite(val)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,5}", fullmatch=True),
        st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 3)),
        min_size=1,
        max_size=5,
    )
)
def test_kv_line_round_trip_with_checksum(values: dict[str, float]) -> None:
    body = ";".join(f"{k}={v}" for k, v in values.items()).encode()
    p = KV_STRICT.parse(body + b"*" + xor(body).encode())
    assert p.kind == "values"
    assert {k: convert(v.text, "float") for k, v in p.values.items()} == values
