"""OPC UA driver, pure logic: status, units, config validation, addresses, readings,
coalescing, certificates and the browse renderer. No server, no network."""

from __future__ import annotations

import asyncio
import tomllib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from drivers.opcua import OpcUaDriver
from drivers.opcua.browse import BrowsedVariable, render_config, tag_name
from drivers.opcua.config import (
    OpcUaDevice,
    PathSegment,
    format_browse_path,
    parse_browse_path,
    parse_node_id,
)
from drivers.opcua.driver import coalesced, convert_value, datetime_ns
from drivers.opcua.security import (
    ServerTrust,
    UntrustedCertificate,
    ensure_client_identity,
    fingerprint,
    pin_path,
)
from drivers.opcua.status import is_overflow, quality, record_status, status_name
from drivers.opcua.units import (
    UNECE_NAMESPACE,
    ucum_from_display,
    ucum_from_eu,
    unece_code,
    unit_id,
)
from gateway import registry
from gateway.config import parse_config
from gateway.driver import Reading
from gateway.errors import ConfigError

registry.register("opcua", OpcUaDriver)

ENDPOINT = "opc.tcp://127.0.0.1:4840/bioreactor"
BIO = "urn:gateway:simulators:bioreactor"


def device(**overrides: Any) -> OpcUaDevice:
    data: dict[str, Any] = {
        "id": "bio-1",
        "driver": "opcua",
        "endpoint": ENDPOINT,
        "tags": [{"name": "temp", "node_id": f"nsu={BIO};s=Bioreactor.Temperature.CurrentValue"}],
    }
    data.update(overrides)
    return OpcUaDevice.model_validate(data)


# --- status -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "q", "status"),
    [
        (0, "good", None),
        (0x00000480, "good", 0x00000480),  # Good with the overflow info bits
        (0x002D0000, "good", 0x002D0000),  # GoodClamped
        (0x40000000, "uncertain", 0x40000000),
        (0x408F0000, "uncertain", 0x408F0000),  # UncertainEngineeringUnitsExceeded
        (0x808C0000, "bad", 0x808C0000),  # BadSensorFailure
        (0x80000000, "bad", 0x80000000),
        (0xC0000000, "bad", 0xC0000000),  # reserved severity: treated as bad
    ],
)
def test_status_code_maps_to_quality(code: int, q: str, status: int | None) -> None:
    assert quality(code) == q
    assert record_status(code) == status


def test_status_names_and_overflow() -> None:
    assert status_name(ua.StatusCodes.BadSensorFailure) == "BadSensorFailure"
    assert status_name(0x808C0480).startswith("BadSensorFailure")
    assert is_overflow(0x00000480) and not is_overflow(0)


# --- units ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "ucum"),
    [
        ("CEL", "Cel"),
        ("P1", "%"),
        ("GL", "g/L"),
        ("RPM", "/min"),
        ("L2", "L/min"),
        ("41", "mL/min"),
        ("MLT", "mL"),
        ("LTR", "L"),
        ("Q30", "[pH]"),
        ("M33", "mmol/L"),
        ("H61", "mS/cm"),
        ("MBR", "mbar"),
        ("KEL", "K"),
    ],
)
def test_unece_codes_map_to_ucum(code: str, ucum: str) -> None:
    assert unece_code(unit_id(code)) == code
    assert ucum_from_eu(unit_id(code), None, None, UNECE_NAMESPACE) == ucum
    assert ucum_from_eu(unit_id(code)) == ucum  # namespace omitted


def test_unit_id_is_the_packed_common_code() -> None:
    assert unit_id("CEL") == 4408652  # OPC Foundation UNECE_to_OPCUA.csv
    assert unit_id("41") == 13361
    assert unece_code(-1) is None and unece_code(0) is None
    assert unece_code(0x00C3A9) is None  # not a code


@pytest.mark.parametrize(
    ("text", "ucum"),
    [
        ("°C", "Cel"),
        ("degC", "Cel"),
        ("%", "%"),
        ("g/l", "g/L"),
        ("g/L", "g/L"),
        ("rpm", "/min"),
        ("revolutions per minute", "/min"),
        ("Revolutions per Minute", "/min"),
        ("l/min", "L/min"),
        ("mL", "mL"),
        ("pH", "[pH]"),
        ("10^6 cells/mL", "10*6/mL"),
        ("10*6/mL", "10*6/mL"),
        ("degree Celsius", "Cel"),
        ("µS/cm", "uS/cm"),
        ("mS/cm", "mS/cm"),
        ("ms", "ms"),  # symbols are case-sensitive: ms is not mS
        ("NTU", ""),
        ("", ""),
    ],
)
def test_display_name_fallbacks(text: str, ucum: str) -> None:
    assert ucum_from_display(text) == ucum


def test_eu_prefers_code_then_display_then_description() -> None:
    assert ucum_from_eu(unit_id("CEL"), "whatever", "whatever") == "Cel"
    assert ucum_from_eu(-1, "°C", None) == "Cel"
    assert ucum_from_eu(-1, "Temp unit", "degree Celsius") == "Cel"
    # A UnitId from another namespace is not a UNECE code: the names decide.
    assert ucum_from_eu(unit_id("CEL"), "rpm", None, "urn:vendor:units") == "/min"
    assert ucum_from_eu(-1, "NTU", "nephelometric turbidity") == ""


# --- node ids and browse paths -----------------------------------------------


def test_parse_node_ids() -> None:
    ref = parse_node_id(f"nsu={BIO};s=Bioreactor.Temperature.CurrentValue")
    assert (ref.namespace, ref.kind, ref.identifier) == (
        BIO,
        "s",
        "Bioreactor.Temperature.CurrentValue",
    )
    assert ref.text() == f"nsu={BIO};s=Bioreactor.Temperature.CurrentValue"
    assert parse_node_id("i=85").namespace == 0
    ref = parse_node_id("ns=3;i=1042")
    assert (ref.namespace, ref.identifier, ref.text()) == (3, 1042, "ns=3;i=1042")
    assert parse_node_id("ns=2;s=a;b=c").identifier == "a;b=c"  # ';' inside a string id
    guid = uuid.UUID("72962b91-fa75-4ae6-8d28-b404dc7daf63")
    assert parse_node_id(f"ns=1;g={guid}").identifier == guid
    assert parse_node_id("ns=1;b=AAEC").identifier == b"\x00\x01\x02"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Bioreactor.Temp", "expected an identifier"),
        ("ns=x;i=1", "ns=<index>"),
        ("ns=2;i=abc", "numeric identifier"),
        ("ns=2;s=", "string identifier is empty"),
        ("nsu=;s=x", "nsu=<namespace URI>"),
        ("ns=1;g=not-a-guid", "not a GUID"),
        ("ns=1;b=***", "not base64"),
    ],
)
def test_bad_node_ids(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_node_id(text)


def test_parse_browse_paths() -> None:
    assert parse_browse_path("0:Objects/2:Bioreactor/2:Temperature/2:CurrentValue") == [
        PathSegment(0, "Objects"),
        PathSegment(2, "Bioreactor"),
        PathSegment(2, "Temperature"),
        PathSegment(2, "CurrentValue"),
    ]
    # A URI qualifier may contain '/' and ':'; '&' escapes in names.
    segs = parse_browse_path("0:Objects/<http://vendor.example/UA/>:Tank&/1/bio:a:b&&c")
    assert segs == [
        PathSegment(0, "Objects"),
        PathSegment("http://vendor.example/UA/", "Tank/1"),
        PathSegment("bio", "a:b&c", alias=True),
    ]
    pairs: list[tuple[int | str, str]] = [(0, "Objects"), ("http://vendor.example/UA/", "Tank/1")]
    text = format_browse_path(pairs)
    assert text == "0:Objects/<http://vendor.example/UA/>:Tank&/1"
    assert [(s.namespace, s.name) for s in parse_browse_path(text)] == pairs


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Objects/2:Tank", "has no namespace"),
        ("0:Objects/", "ends with '/'"),
        ("0:Objects//2:Tank", "has no namespace"),
        ("<urn:x:Tank", "unclosed"),
        ("<urn:x>Tank", "expected ':'"),
        ("0:", "empty browse name"),
        ("0:Tank&", "escapes nothing"),
        ("a b:Tank", "bad namespace qualifier"),
    ],
)
def test_bad_browse_paths(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_browse_path(text)


def test_alias_resolves_to_uri() -> None:
    dev = device(
        namespaces={"bio": BIO},
        tags=[{"name": "t", "browse_path": "0:Objects/bio:Bioreactor/bio:Temperature"}],
    )
    assert dev.tags[0].segments(dev.namespaces)[1] == PathSegment(BIO, "Bioreactor")


# --- config validation (through the gateway's loader: errors carry paths) -------

HEAD = f"""
[gateway]
id = "gw"

[[devices]]
id = "bio-1"
driver = "opcua"
endpoint = "{ENDPOINT}"
"""


def load(text: str) -> Any:
    return parse_config(HEAD + text, Path("gw.toml"), {})


def errors_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value)


def test_valid_device_loads() -> None:
    cfg = load(
        f"""
mode = "subscribe"
publishing_interval = 0.5
security_policy = "Basic256Sha256"
trust_on_first_use = true
[devices.namespaces]
bio = "{BIO}"
[[devices.tags]]
name = "temp"
node_id = "nsu={BIO};s=Bioreactor.Temperature.CurrentValue"
sampling_interval = 0.1
deadband_type = "absolute"
deadband_value = 0.05
[[devices.tags]]
name = "pH"
browse_path = "0:Objects/bio:Bioreactor/bio:pH/bio:CurrentValue"
unit = "[pH]"
"""
    )
    dev = cfg.devices[0]
    assert isinstance(dev, OpcUaDevice)
    assert dev.effective_mode == "SignAndEncrypt" and dev.watchdog == 20
    assert dev.tags[0].deadband_type == "absolute"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[[devices.tags]]\nname = "t"\nnode_id = "Bioreactor.Temp"\n',
            "devices[0].tags[0].node_id: expected an identifier",
        ),
        (
            '[[devices.tags]]\nname = "t"\n',
            "devices[0].tags[0]: give exactly one of node_id and browse_path",
        ),
        (
            '[[devices.tags]]\nname = "t"\nnode_id = "i=1"\nbrowse_path = "0:Objects"\n',
            "devices[0].tags[0]: give exactly one of node_id and browse_path",
        ),
        (
            '[[devices.tags]]\nname = "t"\nbrowse_path = "Objects/2:X"\n',
            "devices[0].tags[0].browse_path: segment 'Objects' has no namespace",
        ),
        (
            '[[devices.tags]]\nname = "t"\nnode_id = "i=1"\ndeadband_type = "percent"\n'
            "deadband_value = 150\n",
            "devices[0].tags[0]: a percent deadband_value is 0..100",
        ),
        (
            '[[devices.tags]]\nname = "t"\nnode_id = "i=1"\ndeadband_value = 1\n',
            "devices[0].tags[0]: deadband_value needs deadband_type",
        ),
        (
            '[[devices.tags]]\nname = "t"\nnode_id = "i=1"\nsampling_rate = 1\n',
            "devices[0].tags[0].sampling_rate: unknown key",
        ),
        (
            'mode = "poll"\n[[devices.tags]]\nname = "t"\nnode_id = "i=1"\nqueue_size = 5\n',
            "devices[0]: tags[0] (t): queue_size only apply in mode 'subscribe'",
        ),
        (
            '[[devices.tags]]\nname = "t"\nbrowse_path = "0:Objects/bio:X"\n',
            "devices[0]: tags[0] (t).browse_path: namespace alias 'bio' is not defined",
        ),
        (
            'security_policy = "Basic256Sha256"\n[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n',
            "devices[0]: security_mode SignAndEncrypt needs a trusted server certificate",
        ),
        (
            'security_mode = "Sign"\n[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n',
            "devices[0]: security_policy 'None' and security_mode 'Sign' do not go together",
        ),
        (
            'security_policy = "Basic128Rsa15"\n[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n',
            "devices[0].security_policy: Input should be 'None', 'Basic256Sha256'",
        ),
        (
            'username = "op"\npassword = "pw"\n[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n',
            "devices[0]: a password needs a trusted server certificate",
        ),
        (
            'username = "op"\ntrust_on_first_use = true\n[[devices.tags]]\nname = "t"\n'
            'node_id = "i=1"\n',
            "devices[0]: username needs password or password_file",
        ),
        (
            'user_cert = "/x.pem"\n[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n',
            "devices[0]: user_cert and user_key go together",
        ),
        (
            'server_cert_sha256 = "abc"\n[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n',
            "devices[0].server_cert_sha256: expected 64 hex digits",
        ),
        (
            "keepalive_count = 10\nwatchdog_intervals = 5\n"
            '[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n',
            "devices[0]: watchdog_intervals (5) must exceed keepalive_count (10)",
        ),
        (
            'timestamp = "device"\n[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n',
            "devices[0].timestamp: Input should be 'source', 'server' or 'gateway'",
        ),
    ],
)
def test_config_errors_name_the_field(body: str, expected: str) -> None:
    message = errors_of(body)
    assert expected in message, message


def test_endpoint_must_be_opc_tcp() -> None:
    text = HEAD.replace("opc.tcp://", "http://") + '[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n'
    with pytest.raises(ConfigError, match=r"devices\[0\]\.endpoint"):
        parse_config(text, Path("gw.toml"), {})


def test_password_never_in_error_messages() -> None:
    message = errors_of(
        'username = "op"\npassword = "s3cret-Pa55"\nsecurity_mode = "Sign"\n'
        '[[devices.tags]]\nname = "t"\nnode_id = "i=1"\n'
    )
    assert "s3cret-Pa55" not in message


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    dev = device(username="op", password_file=str(secret), trust_on_first_use=True)
    assert dev.secret_password() == "hunter2"
    dev = device(username="op", password_file=str(tmp_path / "nope"), trust_on_first_use=True)
    with pytest.raises(ConfigError, match="password_file: cannot read"):
        dev.secret_password()


# --- values, timestamps and readings ---------------------------------------------


def test_convert_values() -> None:
    assert convert_value(1.5) == (1.5, None)
    assert convert_value(True) == (True, None)
    assert convert_value(ua.ServerState.Running) == (0, None)  # an enumeration
    assert convert_value(ua.LocalizedText("run")) == ("run", None)
    assert convert_value(b"\x01\xff") == ("01ff", None)
    assert convert_value(None) == (None, "no value")
    assert convert_value([1.0, 2.0]) == (None, "unsupported value: array of 2")
    when = datetime(2024, 6, 10, 6, 13, 20, 123456, tzinfo=UTC)
    assert convert_value(when) == (1718000000123456000, None)


def test_datetime_ns_is_exact_and_nulls_are_none() -> None:
    when = datetime(2024, 6, 10, 6, 13, 20, 123456, tzinfo=UTC)
    assert datetime_ns(when) == 1718000000123456000
    assert datetime_ns(when.replace(tzinfo=None)) == 1718000000123456000  # naive = UTC
    assert datetime_ns(datetime(1601, 1, 1, tzinfo=UTC)) is None  # OPC UA null DateTime
    assert datetime_ns(None) is None


@pytest.fixture
def data_value() -> Any:
    def make(value: Any, code: int = 0, source: datetime | None = None) -> ua.DataValue:
        fields: dict[str, Any] = {
            "Value": ua.Variant(value),
            "StatusCode": ua.StatusCode(code),
            "SourceTimestamp": source,
            "ServerTimestamp": datetime(2024, 6, 10, 6, 0, 0, tzinfo=UTC),
        }
        return ua.DataValue(**fields)

    return make


def test_readings_from_data_values(data_value: Any) -> None:
    src = datetime(2024, 6, 10, 6, 13, 20, 123456, tzinfo=UTC)
    drv = OpcUaDriver(device())
    r = drv._reading(0, data_value(36.95, 0, src))
    assert r == Reading("temp", 36.95, "good", None, 1718000000123456000)
    r = drv._reading(0, data_value(36.95, 0x408F0000, src))
    assert (r.val, r.q, r.status) == (36.95, "uncertain", 0x408F0000)
    # Bad: never the value, whatever the server sent with it.
    r = drv._reading(0, data_value(36.95, ua.StatusCodes.BadSensorFailure, src))
    assert (r.val, r.q, r.status) == (None, "bad", ua.StatusCodes.BadSensorFailure)
    r = drv._reading(0, data_value(None, 0, src))
    assert (r.val, r.q, r.status) == (None, "bad", "no value")
    assert drv._reading(0, data_value(1.0)).src_ts is None  # no SourceTimestamp given

    server_ts = OpcUaDriver(device(timestamp="server"))._reading(0, data_value(1.0, 0, src))
    assert server_ts.src_ts == 1717999200000000000
    assert (
        OpcUaDriver(device(timestamp="gateway"))._reading(0, data_value(1.0, 0, src)).src_ts is None
    )


def test_publish_callback_handles_keepalive_and_status_change(data_value: Any) -> None:
    drv = OpcUaDriver(device())
    keepalive = ua.PublishResult(1, NotificationMessage=ua.NotificationMessage(SequenceNumber=1))
    drv._on_publish(keepalive)
    assert drv._last_publish > 0 and drv._queue.empty() and drv._failure is None
    item = ua.MonitoredItemNotification(ClientHandle=0, Value=data_value(2.0))
    change = ua.DataChangeNotification(MonitoredItems=[item, ua.MonitoredItemNotification(99)])
    msg = ua.NotificationMessage(SequenceNumber=1, NotificationData=[change])
    drv._on_publish(ua.PublishResult(1, NotificationMessage=msg))
    assert drv._queue.qsize() == 1 and drv.notifications == 2  # unknown handle 99 ignored
    status = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    msg = ua.NotificationMessage(SequenceNumber=3, NotificationData=[status])
    drv._on_publish(ua.PublishResult(1, NotificationMessage=msg))
    assert drv.lost_messages == 1  # sequence number 2 never arrived
    assert drv._failure is not None and "BadTimeout" in drv._failure


# --- coalescing -------------------------------------------------------------------


def test_full_buffer_coalesces_latest_per_tag_and_says_so() -> None:
    tags = [{"name": n, "node_id": f"ns=2;s={n}"} for n in ("a", "b", "c")]
    drv = OpcUaDriver(device(buffer_size=10, tags=tags))
    for i in range(10):
        drv._push(Reading("a", float(i)))
    assert drv._queue.full()
    drv._push(Reading("b", 100.0))  # first over the limit: kept, nothing dropped yet
    for i in range(5):
        drv._push(Reading("a", 10.0 + i))  # 4 of these 5 are dropped
    drv._push(Reading("c", None, "bad", ua.StatusCodes.BadSensorFailure))
    drv._push(Reading("c", None, "bad", ua.StatusCodes.BadSensorFailure))
    out = drv._drain(None)
    assert [r.val for r in out[:10]] == [float(i) for i in range(10)]  # order kept
    tail = {r.tag: r for r in out[10:]}
    assert tail["b"] == Reading("b", 100.0)
    assert tail["a"].val == 14.0 and tail["a"].q == "uncertain"
    assert tail["a"].status == "coalesced: 4 notifications dropped"
    assert tail["c"].q == "bad" and tail["c"].val is None
    assert tail["c"].status == "coalesced: 1 notifications dropped; status 0x808C0000"
    assert drv.coalesced == 5
    # Drained: the next notification is queued normally again.
    drv._push(Reading("a", 1.0))
    assert drv._drain(None) == [Reading("a", 1.0)]


def test_coalescing_never_reorders_a_tag() -> None:
    drv = OpcUaDriver(device(buffer_size=10))
    seq = [Reading("temp", float(i)) for i in range(40)]
    for r in seq:
        drv._push(r)
    out = drv._drain(None)
    values = [r.val for r in out]
    assert values == sorted(values)
    assert out[-1].val == 39.0 and out[-1].status == "coalesced: 29 notifications dropped"


def test_coalesced_reading_keeps_string_status() -> None:
    r = coalesced(Reading("t", 1.0, "uncertain", "x"), 2)
    assert r.status == "coalesced: 2 notifications dropped; x" and r.q == "uncertain"


# --- certificates and trust ---------------------------------------------------------


def test_client_identity_is_generated_once_and_reused(tmp_path: Path) -> None:
    first = ensure_client_identity(tmp_path / "opcua")
    assert first.created and first.application_uri.startswith("urn:")
    assert (first.key_path.stat().st_mode & 0o777) == 0o600
    again = ensure_client_identity(tmp_path / "opcua")
    assert not again.created and again.sha256 == first.sha256
    first.cert_path.unlink()
    with pytest.raises(ValueError, match="only one of"):
        ensure_client_identity(tmp_path / "opcua")


def test_server_trust_by_fingerprint_file_and_tofu(tmp_path: Path) -> None:
    a = ensure_client_identity(tmp_path / "a").cert_path.read_bytes()
    b = ensure_client_identity(tmp_path / "b").cert_path.read_bytes()
    ServerTrust(ENDPOINT, server_cert_sha256=fingerprint(a)).check(a)
    with pytest.raises(UntrustedCertificate, match="is not the configured"):
        ServerTrust(ENDPOINT, server_cert_sha256=fingerprint(a)).check(b)
    ServerTrust(ENDPOINT, server_cert=tmp_path / "a" / "client_cert.der").check(a)
    with pytest.raises(UntrustedCertificate):
        ServerTrust(ENDPOINT, server_cert=tmp_path / "a" / "client_cert.der").check(b)
    pins = tmp_path / "pins"
    tofu = ServerTrust(ENDPOINT, trust_on_first_use=True, pin_dir=pins)
    tofu.check(a)
    assert tofu.pinned_now and pin_path(pins, ENDPOINT).read_bytes() == a
    again = ServerTrust(ENDPOINT, trust_on_first_use=True, pin_dir=pins)
    again.check(a)
    assert not again.pinned_now
    with pytest.raises(UntrustedCertificate, match="server certificate changed"):
        again.check(b)
    with pytest.raises(UntrustedCertificate, match="no trusted server certificate"):
        ServerTrust(ENDPOINT).check(a)


# --- browse rendering ---------------------------------------------------------------


def test_rendered_config_loads_and_addresses_by_uri() -> None:
    found = [
        BrowsedVariable(
            node_id=f"nsu={BIO};s=Bioreactor.Temperature.CurrentValue",
            browse_path=f"0:Objects/<{BIO}>:Bioreactor/<{BIO}>:Temperature/<{BIO}>:CurrentValue",
            display_name="CurrentValue",
            data_type="Double",
            unit="Cel",
            eu_display="°C",
        ),
        BrowsedVariable(
            node_id=f"nsu={BIO};s=Bioreactor.Turbidity",
            browse_path=f"0:Objects/<{BIO}>:Bioreactor/<{BIO}>:Turbidity",
            display_name='Turbidity "raw"',
            data_type="Float",
            unit="",
            eu_display="NTU",
        ),
    ]
    assert tag_name(found[0]) == "Bioreactor.Temperature.CurrentValue"
    text = render_config(found, endpoint=ENDPOINT, device_id="bio-1")
    tomllib.loads(text)
    cfg = parse_config('[gateway]\nid = "gw"\n' + text, Path("gw.toml"), {})
    dev = cfg.devices[0]
    assert isinstance(dev, OpcUaDevice)
    assert [t.unit for t in dev.tags] == ["Cel", ""]
    assert dev.tags[0].node_id == found[0].node_id
    assert '# unit: the server says "NTU"' in text


def test_discovered_units_api() -> None:
    drv = OpcUaDriver(device())
    drv.units["temp"] = "Cel"
    assert drv.discovered_units() == {"temp": "Cel"}
    assert asyncio.iscoroutinefunction(drv.connect)


def test_timedelta_helper_exactness() -> None:
    # 100 ns resolution is lost by asyncua's datetime; microseconds are kept exactly.
    base = datetime(2030, 1, 1, tzinfo=UTC)
    for us in (0, 1, 999_999):
        assert datetime_ns(base + timedelta(microseconds=us)) == 1893456000_000_000_000 + us * 1000


# --- liveness ----------------------------------------------------------------------


class _FakeUaClient:
    def __init__(self, state: Any) -> None:
        self.state = state


class _FakeClient:
    def __init__(self, state: Any) -> None:
        self.uaclient = _FakeUaClient(state)


def test_publish_watchdog_and_connection_checks() -> None:
    import time

    from asyncua.client.ua_client import UaClientState

    from gateway.errors import DriverError

    drv = OpcUaDriver(device())
    drv._client = _FakeClient(UaClientState.CONNECTED)  # type: ignore[assignment]
    drv._watchdog_s = 2.0
    drv._last_publish = time.monotonic()
    drv._check_alive()  # fresh: fine
    drv._last_publish = time.monotonic() - 2.5
    with pytest.raises(DriverError, match=r"no notification and no keep-alive for 2\.\d s"):
        drv._check_alive()
    drv._last_publish = time.monotonic()
    drv._client = _FakeClient(UaClientState.DISCONNECTED)  # type: ignore[assignment]
    with pytest.raises(DriverError, match="connection lost"):
        drv._check_alive()
    drv._failure = "connection lost: ConnectionError: transport lost"
    with pytest.raises(DriverError, match="transport lost"):
        drv._check_alive()


def test_default_watchdog_is_twice_the_keepalive() -> None:
    assert device(keepalive_count=5).watchdog == 10
    assert device(keepalive_count=5, watchdog_intervals=7).watchdog == 7


def test_shipped_example_config_loads() -> None:
    from gateway.config import load_config

    path = Path(__file__).resolve().parent.parent / "config" / "bioreactor-opcua.toml"
    cfg = load_config(path, env={})
    devices = [d for d in cfg.devices if isinstance(d, OpcUaDevice)]
    assert [d.mode for d in devices] == ["subscribe", "poll"]
    assert devices[0].endpoint == "opc.tcp://127.0.0.1:4840/bioreactor"
