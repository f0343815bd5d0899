"""OPC UA simulator: a 10 L fed-batch stirred-tank bioreactor.

A real asyncua server whose values come from
:class:`simulators.bioreactor_model.BioreactorModel`. It serves the culture on
``opc.tcp://<host>:<port>/bioreactor`` and can inject faults, restart, require
encryption and user names, and carry thousands of extra variables for scale
tests.

Address space
=============

Organised after OPC UA LADS (device -> functional units -> current value /
setpoint) without needing the LADS or DI nodesets. Every NodeId is a string
NodeId in :data:`NAMESPACE_URI` (its index is whatever the server assigns, so
:data:`NODES` uses the ``nsu=`` form)::

    Objects
      Bioreactor                      (BioreactorDeviceType; properties
        |                              Manufacturer, Model [LocalizedText],
        |                              SerialNumber, SoftwareRevision [String])
        Temperature, pH, DO           (FunctionalUnitType)
          CurrentValue, SetPoint
        Agitation
          CurrentValue, SetPoint (cascade minimum), MaxSetPoint (cascade maximum)
        Gassing
          O2Flow, AirFlow, CO2Flow
        Feed
          CurrentValue (pump rate), SetPoint (pump rate while a bolus is due),
          FeedAdded
        Analytics
          VCD, Viability, Glucose, Lactate, Volume, BaseAdded
      Scale                           (only with extra_variables=N)
        Block000 .. (100 each)        (folders, s=Scale.Block000 ...)
          V00000 .. V<N-1>            (Double, ns=<idx>;s=Scale.V00000 ...)

Each tag is a Double variable of AnalogItemType with the properties
``0:EngineeringUnits`` (a ``ua.EUInformation`` with the UNECE code in the
``http://www.opcfoundation.org/UA/units/un/cefact`` namespace) and
``0:EURange`` (``ua.Range``). Setpoints are writable (AccessLevel
CurrentRead|CurrentWrite); a write of a Double inside :data:`SETPOINT_LIMITS`
changes the model at once, a value outside answers ``BadOutOfRange``, another
type ``BadTypeMismatch``. Measured values are read-only.

Every update (each ``update_interval`` wall seconds) writes all values with
``SourceTimestamp`` = ``ServerTimestamp`` = the wall-clock UTC time of the
update.

=============  =======================================  =============  ===========
tag            NodeId (``s=``)                          unit (UNECE)   EURange
=============  =======================================  =============  ===========
temperature    Bioreactor.Temperature.CurrentValue      °C (CEL)       0 .. 50
temperature_sp Bioreactor.Temperature.SetPoint          °C (CEL)       20 .. 42
pH             Bioreactor.pH.CurrentValue               pH (Q30)       0 .. 14
pH_sp          Bioreactor.pH.SetPoint                   pH (Q30)       6.5 .. 7.8
DO             Bioreactor.DO.CurrentValue               % (P1)         0 .. 200
DO_sp          Bioreactor.DO.SetPoint                   % (P1)         5 .. 100
agitation      Bioreactor.Agitation.CurrentValue        r/min (RPM)    0 .. 500
agitation_sp   Bioreactor.Agitation.SetPoint            r/min (RPM)    50 .. 500
agitation_max  Bioreactor.Agitation.MaxSetPoint         r/min (RPM)    50 .. 500
O2_flow        Bioreactor.Gassing.O2Flow                l/min (L2)     0 .. 1
air_flow       Bioreactor.Gassing.AirFlow               l/min (L2)     0 .. 1
CO2_flow       Bioreactor.Gassing.CO2Flow               l/min (L2)     0 .. 0.5
feed_rate      Bioreactor.Feed.CurrentValue             ml/h (G55)     0 .. 2000
feed_rate_sp   Bioreactor.Feed.SetPoint                 ml/h (G55)     0 .. 2000
feed_added     Bioreactor.Feed.FeedAdded                ml (MLT)       0 .. 5000
VCD            Bioreactor.Analytics.VCD                 1e6 cells/mL   0 .. 100
                                                        (no code: -1)
viability      Bioreactor.Analytics.Viability           % (P1)         0 .. 100
glucose        Bioreactor.Analytics.Glucose             g/l (GL)       0 .. 20
lactate        Bioreactor.Analytics.Lactate             g/l (GL)       0 .. 10
volume         Bioreactor.Analytics.Volume              l (LTR)        0 .. 15
base_added     Bioreactor.Analytics.BaseAdded           ml (MLT)       0 .. 1000
=============  =======================================  =============  ===========

Security
========

``security`` lists the endpoints offered: ``"None"`` and/or
``Basic256Sha256_*``, ``Aes128Sha256RsaOaep_*``, ``Aes256Sha256RsaPss_*`` with
``_Sign`` or ``_SignAndEncrypt``. The server always has a self-signed
certificate (``cert_dir/server_cert.der`` + ``server_key.pem``, generated once
and reused) so a client can trust :attr:`BioreactorSimulator.server_certificate`
explicitly. Identity tokens offered: Anonymous when anonymous access is
allowed (default: only without ``users``), UserName when ``users`` is given,
X509 when ``trusted_client_certs`` is given. A session on an unencrypted
channel is refused (``BadUserAccessDenied``) unless ``"None"`` is among the
policies (asyncua itself lets a None channel open for endpoint discovery).
With ``trusted_client_certs`` any other client certificate is refused at
CreateSession with ``BadCertificateUntrusted``.

Faults (:meth:`BioreactorSimulator.set_fault`)
==============================================

``stall``: the tag (or every tag, the Scale variables included) stops
updating, value and SourceTimestamp frozen. ``bad_status``: each update writes
StatusCode ``BadSensorFailure`` (asyncua, per the spec, then serves a null
value: never a fake good one; :meth:`values` keeps the last good reading).
``drift``: the reading walks away from the true value by 1 % of the EURange
span per simulated hour (0.5 °C/h for temperature). ``out_of_range``: the
reading jumps above its EURange. ``drift`` and ``out_of_range`` without a tag
apply to the measured tags only (not setpoints).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from simulators import console
from simulators.bioreactor_model import SETPOINT_LIMITS, BioreactorModel, SetpointName
from simulators.console import run_until_signal

__all__ = [
    "APPLICATION_URI",
    "NAMESPACE_URI",
    "NODES",
    "SECURITY_POLICIES",
    "TAGS",
    "BioreactorSimulator",
    "FaultKind",
    "TagSpec",
    "main",
]

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:gateway:simulators:bioreactor"
APPLICATION_URI = "urn:gateway:simulators:bioreactor:server"
UNECE_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"
ENDPOINT_PATH = "/bioreactor"
HISTORY_LEN = 5000
SCALE_BLOCK = 100  # extra variables per sub-folder of "Scale"
DRIFT_SPAN_FRACTION_PER_HOUR = 0.01
SERVER_CERT_FILE = "server_cert.der"
SERVER_KEY_FILE = "server_key.pem"

FaultKind = Literal["stall", "bad_status", "drift", "out_of_range"]

#: Names accepted in ``security`` -> asyncua policy types.
SECURITY_POLICIES: dict[str, ua.SecurityPolicyType] = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    "Aes128Sha256RsaOaep_Sign": ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    "Aes128Sha256RsaOaep_SignAndEncrypt": ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    "Aes256Sha256RsaPss_Sign": ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    "Aes256Sha256RsaPss_SignAndEncrypt": ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
}


@dataclass(frozen=True)
class _Unit:
    code: str  # UNECE Rec. 20 common code, "" when there is none
    symbol: str
    description: str

    @property
    def unit_id(self) -> int:
        """OPC UA UnitId: the common code's ASCII bytes, big-endian (-1 if none)."""
        return int.from_bytes(self.code.encode("ascii"), "big") if self.code else -1

    def eu_information(self) -> ua.EUInformation:
        return ua.EUInformation(
            NamespaceUri=UNECE_NAMESPACE,
            UnitId=self.unit_id,
            DisplayName=ua.LocalizedText(self.symbol),
            Description=ua.LocalizedText(self.description),
        )


# Symbols and descriptions as in the OPC Foundation's UNECE_to_OPCUA.csv.
_CELSIUS = _Unit("CEL", "°C", "degree Celsius")
_PH = _Unit("Q30", "pH", "pH (potential of Hydrogen)")
_PERCENT = _Unit("P1", "%", "percent")
_RPM = _Unit("RPM", "r/min", "revolutions per minute")
_L_MIN = _Unit("L2", "l/min", "litre per minute")
_ML_H = _Unit("G55", "ml/h", "millilitre per hour")
_G_L = _Unit("GL", "g/l", "gram per litre")
_LITRE = _Unit("LTR", "l", "litre")
_ML = _Unit("MLT", "ml", "millilitre")
_VCD = _Unit("", "1e6 cells/mL", "million viable cells per millilitre (no UNECE code)")


@dataclass(frozen=True)
class TagSpec:
    """One served tag: where it lives, what it reads from the model, its unit and range."""

    name: str  # key of NODES
    path: str  # string NodeId identifier
    field: str  # BioreactorState attribute
    unit: _Unit
    eu_range: tuple[float, float]
    description: str
    setpoint: SetpointName | None = None  # writable: the model setpoint it changes

    @property
    def browse_name(self) -> str:
        return self.path.rsplit(".", 1)[1]

    @property
    def unit_name(self) -> str:
        return self.path.split(".")[1]


def _sp(name: SetpointName) -> tuple[float, float]:
    return SETPOINT_LIMITS[name]


TAGS: tuple[TagSpec, ...] = (
    TagSpec("temperature", "Bioreactor.Temperature.CurrentValue", "temperature", _CELSIUS,
            (0.0, 50.0), "Broth temperature"),
    TagSpec("temperature_sp", "Bioreactor.Temperature.SetPoint", "temperature_sp", _CELSIUS,
            _sp("temperature"), "Temperature setpoint", "temperature"),
    TagSpec("pH", "Bioreactor.pH.CurrentValue", "ph", _PH, (0.0, 14.0), "Broth pH"),
    TagSpec("pH_sp", "Bioreactor.pH.SetPoint", "ph_sp", _PH, _sp("ph"),
            "pH setpoint (CO2 above, base below, +-0.05 deadband)", "ph"),
    TagSpec("DO", "Bioreactor.DO.CurrentValue", "dissolved_oxygen", _PERCENT, (0.0, 200.0),
            "Dissolved oxygen, % of air saturation"),
    TagSpec("DO_sp", "Bioreactor.DO.SetPoint", "do_sp", _PERCENT, _sp("do"),
            "Dissolved oxygen setpoint, % of air saturation", "do"),
    TagSpec("agitation", "Bioreactor.Agitation.CurrentValue", "agitation", _RPM, (0.0, 500.0),
            "Impeller speed"),
    TagSpec("agitation_sp", "Bioreactor.Agitation.SetPoint", "agitation_sp", _RPM,
            _sp("agitation"), "Agitation setpoint (DO cascade minimum)", "agitation"),
    TagSpec("agitation_max", "Bioreactor.Agitation.MaxSetPoint", "agitation_max", _RPM,
            _sp("agitation_max"), "Agitation limit (DO cascade maximum)", "agitation_max"),
    TagSpec("O2_flow", "Bioreactor.Gassing.O2Flow", "o2_flow", _L_MIN, (0.0, 1.0),
            "Oxygen sparge flow"),
    TagSpec("air_flow", "Bioreactor.Gassing.AirFlow", "air_flow", _L_MIN, (0.0, 1.0),
            "Air sparge flow"),
    TagSpec("CO2_flow", "Bioreactor.Gassing.CO2Flow", "co2_flow", _L_MIN, (0.0, 0.5),
            "CO2 gassing flow (pH control)"),
    TagSpec("feed_rate", "Bioreactor.Feed.CurrentValue", "feed_rate", _ML_H, (0.0, 2000.0),
            "Feed pump rate"),
    TagSpec("feed_rate_sp", "Bioreactor.Feed.SetPoint", "feed_rate_sp", _ML_H,
            _sp("feed_rate"), "Feed pump rate while a daily bolus is due", "feed_rate"),
    TagSpec("feed_added", "Bioreactor.Feed.FeedAdded", "feed_added", _ML, (0.0, 5000.0),
            "Feed added since inoculation"),
    TagSpec("VCD", "Bioreactor.Analytics.VCD", "vcd", _VCD, (0.0, 100.0),
            "Viable cell density"),
    TagSpec("viability", "Bioreactor.Analytics.Viability", "viability", _PERCENT, (0.0, 100.0),
            "Cell viability"),
    TagSpec("glucose", "Bioreactor.Analytics.Glucose", "glucose", _G_L, (0.0, 20.0),
            "Glucose concentration"),
    TagSpec("lactate", "Bioreactor.Analytics.Lactate", "lactate", _G_L, (0.0, 10.0),
            "Lactate concentration"),
    TagSpec("volume", "Bioreactor.Analytics.Volume", "volume", _LITRE, (0.0, 15.0),
            "Working volume"),
    TagSpec("base_added", "Bioreactor.Analytics.BaseAdded", "base_added", _ML, (0.0, 1000.0),
            "1 M base added since inoculation"),
)  # fmt: skip

#: Tag name -> NodeId string in namespace-URI form.
NODES: dict[str, str] = {t.name: f"nsu={NAMESPACE_URI};s={t.path}" for t in TAGS}

_TAG_BY_NAME = {t.name: t for t in TAGS}
_FUNCTIONAL_UNITS = ("Temperature", "pH", "DO", "Agitation", "Gassing", "Feed", "Analytics")
_DEVICE_PROPERTIES: tuple[tuple[str, Any], ...] = (
    ("Manufacturer", ua.LocalizedText("Equipment Gateway Simulators")),
    ("Model", ua.LocalizedText("SimBio STR-10 (10 L stirred tank)")),
    ("SerialNumber", "STR10-000001"),
    ("SoftwareRevision", "1.0.0"),
)
_GOOD = ua.StatusCode(ua.StatusCodes.Good)
_BAD_SENSOR = ua.StatusCode(ua.StatusCodes.BadSensorFailure)


# ----------------------------------------------------------------- security
class _UserManager:
    """asyncua user manager: user names, anonymous access, trusted certificates."""

    def __init__(
        self,
        users: Mapping[str, str],
        allow_anonymous: bool,
        allow_unencrypted: bool,
        trusted_certs: frozenset[bytes],
    ) -> None:
        self._users = {name: pw.encode() for name, pw in users.items()}
        self._allow_anonymous = allow_anonymous
        self._allow_unencrypted = allow_unencrypted
        self._trusted = trusted_certs

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: bytes | None = None,
    ) -> User | None:
        """Return the session's user, or None to refuse with BadUserAccessDenied.

        ``certificate`` is the X509 token's certificate, else the secure
        channel's client certificate (``b""`` on an unsecured channel; with a
        trust list, channel certificates were already checked at CreateSession).
        """
        del iserver
        if not certificate and not self._allow_unencrypted:
            return None  # a None channel was opened (discovery) but None is not offered
        if certificate and self._trusted and certificate not in self._trusted:
            return None  # an X509 token with an untrusted certificate
        if username is not None:
            expected = self._users.get(username)
            given = (password or "").encode()
            if expected is None or not hmac.compare_digest(expected, given):
                return None
            return User(role=UserRole.User, name=username)
        # Anonymous or X509 token (asyncua already refused token types not offered).
        if self._allow_anonymous:
            return User(role=UserRole.User, name="anonymous")
        if certificate and certificate in self._trusted:
            return User(role=UserRole.User, name="certificate")
        return None


def _ensure_certificate(cert_dir: Path, host: str) -> tuple[Path, Path]:
    """Self-signed server certificate (DER) + key (PEM) in ``cert_dir``, made once, reused."""
    cert_path, key_path = cert_dir / SERVER_CERT_FILE, cert_dir / SERVER_KEY_FILE
    if cert_path.is_file() and key_path.is_file():
        try:
            cert = x509.load_der_x509_certificate(cert_path.read_bytes())
            key = cast(Any, load_pem_private_key(key_path.read_bytes(), None))
            spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            same_key = cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
            if same_key and cert.not_valid_after_utc > dt.datetime.now(dt.UTC):
                return cert_path, key_path
        except (ValueError, TypeError, AttributeError):
            log.warning("unusable certificate in %s, generating a new one", cert_dir)
    cert_dir.mkdir(parents=True, exist_ok=True)
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(APPLICATION_URI),
        x509.DNSName(socket.gethostname()),
        x509.DNSName("localhost"),
    ]
    with contextlib.suppress(ValueError):
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        "Bioreactor Simulator",
        {"organizationName": "Equipment Gateway Simulators"},
        names,
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=3650,
    )
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    return cert_path, key_path


def _load_der(path: Path) -> bytes:
    data = Path(path).read_bytes()
    cert = (
        x509.load_pem_x509_certificate(data)
        if data.lstrip().startswith(b"-----BEGIN")
        else x509.load_der_x509_certificate(data)
    )
    return cert.public_bytes(Encoding.DER)


# ----------------------------------------------------------- address space
def _variable_item(
    nodeid: ua.NodeId,
    parent: ua.NodeId,
    name: str,
    value: float,
    *,
    type_definition: int,
    writable: bool = False,
    description: str = "",
) -> ua.AddNodesItem:
    access = ua.AccessLevel.CurrentRead.mask
    if writable:
        access |= ua.AccessLevel.CurrentWrite.mask
    attrs = ua.VariableAttributes(
        DisplayName=ua.LocalizedText(name),
        Description=ua.LocalizedText(description or name),
        Value=ua.Variant(value, ua.VariantType.Double),
        DataType=ua.NodeId(ua.ObjectIds.Double),
        ValueRank=ua.ValueRank.Scalar,
        AccessLevel=access,
        UserAccessLevel=access,
        WriteMask=0,
        UserWriteMask=0,
        Historizing=False,
    )
    return ua.AddNodesItem(
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
        RequestedNewNodeId=nodeid,
        BrowseName=ua.QualifiedName(name, nodeid.NamespaceIndex),
        NodeClass=ua.NodeClass.Variable,
        NodeAttributes=attrs,
        TypeDefinition=ua.NodeId(type_definition),
    )


def _property_item(
    nodeid: ua.NodeId, parent: ua.NodeId, qname: ua.QualifiedName, value: Any, datatype: int
) -> ua.AddNodesItem:
    attrs = ua.VariableAttributes(
        DisplayName=ua.LocalizedText(qname.Name),
        Description=ua.LocalizedText(qname.Name),
        Value=ua.Variant(value),
        DataType=ua.NodeId(datatype),
        ValueRank=ua.ValueRank.Scalar,
        AccessLevel=ua.AccessLevel.CurrentRead.mask,
        UserAccessLevel=ua.AccessLevel.CurrentRead.mask,
        WriteMask=0,
        UserWriteMask=0,
        Historizing=False,
    )
    return ua.AddNodesItem(
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasProperty),
        RequestedNewNodeId=nodeid,
        BrowseName=qname,
        NodeClass=ua.NodeClass.Variable,
        NodeAttributes=attrs,
        TypeDefinition=ua.NodeId(ua.ObjectIds.PropertyType),
    )


def _object_item(
    nodeid: ua.NodeId, parent: ua.NodeId, name: str, type_definition: ua.NodeId, *, organizes: bool
) -> ua.AddNodesItem:
    reference = ua.ObjectIds.Organizes if organizes else ua.ObjectIds.HasComponent
    return ua.AddNodesItem(
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(reference),
        RequestedNewNodeId=nodeid,
        BrowseName=ua.QualifiedName(name, nodeid.NamespaceIndex),
        NodeClass=ua.NodeClass.Object,
        NodeAttributes=ua.ObjectAttributes(
            DisplayName=ua.LocalizedText(name),
            Description=ua.LocalizedText(name),
            EventNotifier=0,
            WriteMask=0,
            UserWriteMask=0,
        ),
        TypeDefinition=type_definition,
    )


async def _add_nodes(server: Server, items: list[ua.AddNodesItem]) -> None:
    for result in await server.iserver.isession.add_nodes(items):
        result.StatusCode.check()


def _scale_value(i: int, elapsed_s: float) -> float:
    """Deterministic, always-moving value of extra variable ``i``."""
    return i + 0.5 * math.sin(2 * math.pi * elapsed_s / 3600.0 + i)


# ---------------------------------------------------------------- simulator
class BioreactorSimulator:
    """Fed-batch bioreactor served by a real asyncua OPC UA server."""

    NODES: dict[str, str] = NODES

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        time_scale: float = 1.0,
        seed: int = 1,
        update_interval: float = 0.2,
        security: Sequence[str] = ("None",),
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool | None = None,
        cert_dir: Path | None = None,
        trusted_client_certs: Sequence[Path] = (),
        extra_variables: int = 0,
    ) -> None:
        """Configure; nothing is bound until :meth:`start`."""
        if time_scale < 0 or not update_interval > 0:
            raise ValueError("time_scale must be >= 0 and update_interval > 0")
        if not 0 <= port <= 65535 or extra_variables < 0:
            raise ValueError("port must be 0..65535 and extra_variables >= 0")
        if isinstance(security, str):
            security = (security,)
        unknown = [name for name in security if name not in SECURITY_POLICIES]
        if not security or unknown:
            raise ValueError(f"security must be some of {sorted(SECURITY_POLICIES)}, got {unknown}")
        self.host = host
        self.time_scale = time_scale
        self.update_interval = update_interval
        self.security: tuple[str, ...] = tuple(dict.fromkeys(security))
        self.users: dict[str, str] = dict(users or {})
        self.allow_anonymous = (users is None) if allow_anonymous is None else allow_anonymous
        self.trusted_client_certs = tuple(Path(p) for p in trusted_client_certs)
        self.extra_variables = extra_variables
        if not (self.allow_anonymous or self.users or self.trusted_client_certs):
            raise ValueError("no way to log in: allow anonymous, give users or trusted certs")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if cert_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bioreactor-sim-")
            cert_dir = Path(self._tmp.name)
        self.cert_dir = Path(cert_dir)
        self._requested_port = port
        self._port: int | None = None
        self._model = BioreactorModel(seed=seed)
        self._server: Server | None = None
        self._listening = False
        self._ns = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_tick: float | None = None
        self._faults: dict[str, FaultKind] = {}
        self._fault_since: dict[str, float] = {}  # tag -> simulated time the fault began
        self._scale_fault: FaultKind | None = None
        self._nodeids: dict[str, ua.NodeId] = {}
        self._tag_by_nodeid: dict[ua.NodeId, TagSpec] = {}
        self._scale_nodeids: list[ua.NodeId] = []
        self._rejected: dict[int, set[int]] = {}  # id(WriteParameters) -> item indices
        self._values: dict[str, float] = {}
        #: (time.time(), values()) snapshot at every update.
        self.history: deque[tuple[float, dict[str, float]]] = deque(maxlen=HISTORY_LEN)
        self._compute_values()

    # ----------------------------------------------------------- properties
    @property
    def port(self) -> int:
        """Port actually bound (the requested one before the first start)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def endpoint(self) -> str:
        """``opc.tcp://<host>:<port>/bioreactor``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"opc.tcp://{host}:{self.port}{ENDPOINT_PATH}"

    @property
    def server_certificate(self) -> Path:
        """DER file of the server certificate (exists once :meth:`start` has run)."""
        return self.cert_dir / SERVER_CERT_FILE

    @property
    def model(self) -> BioreactorModel:
        """The process model (true state, setpoints)."""
        return self._model

    @property
    def namespace_index(self) -> int:
        """Index of :data:`NAMESPACE_URI` on the server (0 before the first start)."""
        return self._ns

    @property
    def scale_nodes(self) -> list[str]:
        """NodeIds (``nsu=`` form) of the extra Scale variables, in index order."""
        return [f"nsu={NAMESPACE_URI};s=Scale.V{i:05d}" for i in range(self.extra_variables)]

    @property
    def faults(self) -> dict[str, FaultKind]:
        """Active faults by tag."""
        return dict(self._faults)

    def values(self) -> dict[str, float]:
        """Engineering values currently served, by tag (faults applied)."""
        return dict(self._values)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Listen (the same port again after :meth:`stop`) and start updating.

        The first start builds the server (a couple of seconds: asyncua loads
        the standard address space); later starts only reopen the listener.
        The culture does not pause while stopped: the first update after a
        restart catches up on the wall time that passed.
        """
        if self._listening:
            raise RuntimeError("simulator already started")
        if self._server is None:
            await self._build_and_start()
        else:
            assert self._server.bserver is not None
            await self.tick()  # catch up on the downtime before anyone can read
            await self._server.bserver.start()
            now = dt.datetime.now(dt.UTC)
            await self._server.write_attribute_value(
                ua.NodeId(ua.ObjectIds.Server_ServerStatus_StartTime),
                ua.DataValue(ua.Variant(now, ua.VariantType.DateTime), SourceTimestamp=now),
            )
        self._listening = True
        if self._last_tick is None:
            self._last_tick = time.monotonic()
        self._wake = asyncio.Event()  # bound to the running loop on first wait
        self._task = asyncio.create_task(self._run_updates(), name="bioreactor-model")

    async def stop(self) -> None:
        """Close the listener, every connection and every session; stop updating."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is None or not self._listening:
            return
        self._listening = False
        bserver = self._server.bserver
        assert bserver is not None
        await bserver.stop()  # closes the listening socket and each connection
        await asyncio.sleep(0)  # let connection_lost run and queue its clean-up
        await asyncio.gather(*bserver.closing_tasks, return_exceptions=True)
        bserver.closing_tasks.clear()
        # Sessions with subscriptions outlive their connection in asyncua (so a
        # client could re-activate them); a device restart loses them all.
        sessions = getattr(self._server.iserver, "_external_sessions", {})
        for session in list(sessions.values()):
            await session.close_session(True)

    async def restart(self, downtime: float = 1.0) -> None:
        """Stop, stay down ``downtime`` wall seconds, start again on the same port."""
        await self.stop()
        await asyncio.sleep(downtime)
        await self.start()

    async def _build_and_start(self) -> None:
        cert_path, key_path = await asyncio.to_thread(_ensure_certificate, self.cert_dir, self.host)
        trusted = frozenset(
            [await asyncio.to_thread(_load_der, p) for p in self.trusted_client_certs]
        )
        user_manager = _UserManager(
            self.users, self.allow_anonymous, "None" in self.security, trusted
        )
        server = Server(user_manager=cast(Any, user_manager))
        await server.init()
        server.disable_clock()  # our update task keeps ServerStatus.CurrentTime instead
        server.set_server_name("Bioreactor Simulator")
        server.manufacturer_name = "Equipment Gateway Simulators"
        server.product_uri = "urn:gateway:simulators"
        server.application_type = ua.ApplicationType.Server
        await server.set_application_uri(APPLICATION_URI)
        port = self._port if self._port is not None else self._requested_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        server.set_endpoint(f"opc.tcp://{host}:{port}{ENDPOINT_PATH}")
        server.set_security_policy([SECURITY_POLICIES[name] for name in self.security])
        tokens: list[type] = []
        if self.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        if self.users:
            tokens.append(ua.UserNameIdentityToken)
        if trusted:
            tokens.append(ua.X509IdentityToken)

            async def validate(cert: x509.Certificate, _app: ua.ApplicationDescription) -> None:
                if cert.public_bytes(Encoding.DER) not in trusted:
                    raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

            server.set_certificate_validator(validate)
        server.set_identity_tokens(tokens)
        await server.load_certificate(str(cert_path))
        await server.load_private_key(str(key_path))
        self._ns = await server.register_namespace(NAMESPACE_URI)
        await self._build_address_space(server)
        server.subscribe_server_callback(CallbackType.PreWrite, self._pre_write)
        server.subscribe_server_callback(CallbackType.PostWrite, self._post_write)
        self._server = server
        await self._publish()
        try:
            await server.start()
        except BaseException:
            self._server = None
            raise
        assert server.bserver is not None
        bound = cast(asyncio.Server | None, server.bserver._server)
        self._port = int(bound.sockets[0].getsockname()[1]) if bound else int(server.bserver.port)
        server.bserver.port = self._port  # several sockets (e.g. "localhost"): keep the first
        # Endpoint descriptions were built before binding: give them the real port.
        url = self.endpoint
        server.set_endpoint(url)
        for endpoint in server.iserver.endpoints:
            endpoint.EndpointUrl = url
            endpoint.Server.DiscoveryUrls = [url]

    async def _build_address_space(self, server: Server) -> None:
        ns = self._ns
        self._nodeids.clear()
        self._tag_by_nodeid.clear()
        self._scale_nodeids.clear()
        types = server.nodes.base_object_type
        device_type = await types.add_object_type(
            ua.NodeId("BioreactorDeviceType", ns), ua.QualifiedName("BioreactorDeviceType", ns)
        )
        unit_type = await types.add_object_type(
            ua.NodeId("FunctionalUnitType", ns), ua.QualifiedName("FunctionalUnitType", ns)
        )
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        root = ua.NodeId("Bioreactor", ns)
        items = [_object_item(root, objects, "Bioreactor", device_type.nodeid, organizes=True)]
        for name, value in _DEVICE_PROPERTIES:
            datatype = (
                ua.ObjectIds.LocalizedText
                if isinstance(value, ua.LocalizedText)
                else ua.ObjectIds.String
            )
            items.append(
                _property_item(
                    ua.NodeId(f"Bioreactor.{name}", ns),
                    root,
                    ua.QualifiedName(name, ns),
                    value,
                    datatype,
                )
            )
        for unit in _FUNCTIONAL_UNITS:
            items.append(
                _object_item(
                    ua.NodeId(f"Bioreactor.{unit}", ns),
                    root,
                    unit,
                    unit_type.nodeid,
                    organizes=False,
                )
            )
        state = self._model.state
        for tag in TAGS:
            nodeid = ua.NodeId(tag.path, ns)
            parent = ua.NodeId(f"Bioreactor.{tag.unit_name}", ns)
            items.append(
                _variable_item(
                    nodeid,
                    parent,
                    tag.browse_name,
                    float(getattr(state, tag.field)),
                    type_definition=ua.ObjectIds.AnalogItemType,
                    writable=tag.setpoint is not None,
                    description=tag.description,
                )
            )
            lo, hi = tag.eu_range
            items.append(
                _property_item(
                    ua.NodeId(f"{tag.path}.EngineeringUnits", ns),
                    nodeid,
                    ua.QualifiedName("EngineeringUnits", 0),
                    tag.unit.eu_information(),
                    ua.ObjectIds.EUInformation,
                )
            )
            items.append(
                _property_item(
                    ua.NodeId(f"{tag.path}.EURange", ns),
                    nodeid,
                    ua.QualifiedName("EURange", 0),
                    ua.Range(Low=lo, High=hi),
                    ua.ObjectIds.Range,
                )
            )
            self._nodeids[tag.name] = nodeid
            self._tag_by_nodeid[nodeid] = tag
        if self.extra_variables:
            folder_type = ua.NodeId(ua.ObjectIds.FolderType)
            scale = ua.NodeId("Scale", ns)
            items.append(_object_item(scale, objects, "Scale", folder_type, organizes=True))
            # asyncua checks each new child against all its siblings: 5,000 in one
            # folder take ~25 s to add, in blocks of 100 well under a second.
            for i in range(self.extra_variables):
                block_name = f"Block{i // SCALE_BLOCK:03d}"
                block = ua.NodeId(f"Scale.{block_name}", ns)
                if i % SCALE_BLOCK == 0:
                    items.append(
                        _object_item(block, scale, block_name, folder_type, organizes=True)
                    )
                nodeid = ua.NodeId(f"Scale.V{i:05d}", ns)
                items.append(
                    _variable_item(
                        nodeid,
                        block,
                        f"V{i:05d}",
                        _scale_value(i, 0.0),
                        type_definition=ua.ObjectIds.BaseDataVariableType,
                    )
                )
                self._scale_nodeids.append(nodeid)
        await _add_nodes(server, items)

    # --------------------------------------------------------------- writes
    def _setpoint_items(
        self, params: ua.WriteParameters
    ) -> list[tuple[int, ua.WriteValue, TagSpec]]:
        out = []
        for i, item in enumerate(params.NodesToWrite):
            tag = self._tag_by_nodeid.get(item.NodeId)
            if (
                tag is not None
                and tag.setpoint is not None
                and item.AttributeId == ua.AttributeIds.Value
            ):
                out.append((i, item, tag))
        return out

    async def _pre_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        """Refuse out-of-range setpoints before asyncua stores them."""
        if not event.is_external:
            return
        params = cast(ua.WriteParameters, event.request_params)
        rejected: set[int] = set()
        for i, item, tag in self._setpoint_items(params):
            variant = item.Value.Value if item.Value is not None else None
            if variant is None or variant.VariantType != ua.VariantType.Double:
                continue  # asyncua answers BadTypeMismatch itself
            lo, hi = SETPOINT_LIMITS[cast(str, tag.setpoint)]
            if not lo <= float(variant.Value) <= hi:  # NaN too
                rejected.add(i)
                # asyncua has no hook to refuse one item: aim it at an attribute
                # the node lacks, so nothing is stored and no subscriber notified;
                # _post_write then answers BadOutOfRange for it.
                item.AttributeId = ua.AttributeIds.Executable
        if rejected:
            self._rejected[id(params)] = rejected

    async def _post_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        """Apply accepted setpoint writes to the model and re-serve them at once."""
        if not event.is_external:
            return
        params = cast(ua.WriteParameters, event.request_params)
        results = cast(list[ua.StatusCode], event.response_params)
        for i in self._rejected.pop(id(params), set()):
            params.NodesToWrite[i].AttributeId = ua.AttributeIds.Value
            results[i] = ua.StatusCode(ua.StatusCodes.BadOutOfRange)
        changed: dict[str, FaultKind | None] = {}
        for i, item, tag in self._setpoint_items(params):
            if results[i].is_good() and item.Value is not None and item.Value.Value is not None:
                value = float(item.Value.Value.Value)
                self._model.set_setpoint(cast(SetpointName, tag.setpoint), value)
                fault = self._faults.get(tag.name)
                if fault == "stall":
                    continue  # a stalled device keeps serving what the client wrote
                if fault != "bad_status":
                    self._values[tag.name] = value
                changed[tag.name] = fault
        if changed:
            # The client's DataValue carries no SourceTimestamp: stamp it now
            # rather than at the next update.
            await self._write_tags(changed, dt.datetime.now(dt.UTC))

    # --------------------------------------------------------------- faults
    def set_fault(self, fault: FaultKind | None, tag: str | None = None) -> None:
        """Inject ``fault`` on ``tag`` (every tag if None); ``fault=None`` clears.

        Without a tag a fault replaces all others; ``stall`` and ``bad_status``
        then cover the Scale variables too, ``drift`` and ``out_of_range`` only
        the measured (non-setpoint) tags. Takes effect at the next update,
        which it triggers at once.
        """
        if fault is not None and fault not in get_args(FaultKind):
            raise ValueError(f"unknown fault {fault!r}; one of {get_args(FaultKind)} or None")
        if tag is not None and tag not in _TAG_BY_NAME:
            raise ValueError(f"unknown tag {tag!r}")
        now = self._model.state.elapsed_s
        if tag is None:
            self._faults.clear()
            self._fault_since.clear()
            self._scale_fault = fault if fault in ("stall", "bad_status") else None
            if fault is not None:
                for spec in TAGS:
                    if fault in ("stall", "bad_status") or spec.setpoint is None:
                        self._faults[spec.name] = fault
                        self._fault_since[spec.name] = now
        elif fault is None:
            self._faults.pop(tag, None)
            self._fault_since.pop(tag, None)
        else:
            self._faults[tag] = fault
            self._fault_since[tag] = now
        self._wake.set()

    def _reading(self, tag: TagSpec, true_value: float, fault: FaultKind | None) -> float:
        lo, hi = tag.eu_range
        span = hi - lo
        if fault == "drift":
            hours = (self._model.state.elapsed_s - self._fault_since[tag.name]) / 3600.0
            return true_value + DRIFT_SPAN_FRACTION_PER_HOUR * span * hours
        if fault == "out_of_range":
            return hi + 0.25 * span + max(0.0, true_value - lo)
        return true_value

    # -------------------------------------------------------------- updates
    def _compute_values(self) -> dict[str, FaultKind | None]:
        """Refresh :meth:`values` from the model; return the fault of each tag updated."""
        state = self._model.state
        updated: dict[str, FaultKind | None] = {}
        for tag in TAGS:
            fault = self._faults.get(tag.name)
            if fault == "stall":
                continue
            updated[tag.name] = fault
            if fault != "bad_status" or tag.name not in self._values:
                self._values[tag.name] = self._reading(tag, float(getattr(state, tag.field)), fault)
        return updated

    async def tick(self, wall_seconds: float | None = None) -> None:
        """Advance the model (by ``wall_seconds`` x time_scale if given) and publish now."""
        now = time.monotonic()
        if wall_seconds is None:
            last = self._last_tick if self._last_tick is not None else now
            wall_seconds = now - last
        self._last_tick = now
        self._model.step(max(0.0, wall_seconds) * self.time_scale)
        await self._publish()

    async def _publish(self) -> None:
        updated = self._compute_values()
        wall = time.time()
        self.history.append((wall, dict(self._values)))
        server = self._server
        if server is None:
            return
        stamp = dt.datetime.fromtimestamp(wall, dt.UTC)
        await self._write_tags(updated, stamp)
        if self._scale_nodeids and self._scale_fault != "stall":
            elapsed = self._model.state.elapsed_s
            status = _BAD_SENSOR if self._scale_fault == "bad_status" else _GOOD
            for i, nodeid in enumerate(self._scale_nodeids):
                value = ua.Variant(_scale_value(i, elapsed), ua.VariantType.Double)
                await server.write_attribute_value(
                    nodeid,
                    ua.DataValue(
                        value, StatusCode=status, SourceTimestamp=stamp, ServerTimestamp=stamp
                    ),
                )
        await server.write_attribute_value(
            ua.NodeId(ua.ObjectIds.Server_ServerStatus_CurrentTime),
            ua.DataValue(
                ua.Variant(stamp, ua.VariantType.DateTime),
                SourceTimestamp=stamp,
                ServerTimestamp=stamp,
            ),
        )

    async def _write_tags(self, tags: Mapping[str, FaultKind | None], stamp: dt.datetime) -> None:
        """Serve :meth:`values` of ``tags`` (BadSensorFailure where that fault is set)."""
        if self._server is None:
            return
        for name, fault in tags.items():
            status = _BAD_SENSOR if fault == "bad_status" else _GOOD
            value = ua.Variant(self._values[name], ua.VariantType.Double)
            await self._server.write_attribute_value(
                self._nodeids[name],
                ua.DataValue(
                    value, StatusCode=status, SourceTimestamp=stamp, ServerTimestamp=stamp
                ),
            )

    async def _run_updates(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancel that races the wake-up, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.update_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # keep serving even if one update misbehaves
                log.exception("bioreactor model update failed")


# ---------------------------------------------------------------- CLI runner
_HELP = (
    "commands: fault stall|bad_status|drift|out_of_range [tag] | fault off [tag] | "
    "values | restart [downtime_s] | help"
)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def user(text: str) -> tuple[str, str]:
        name, sep, password = text.partition(":")
        if not sep or not name:
            raise argparse.ArgumentTypeError("expected NAME:PASSWORD")
        return name, password

    parser = argparse.ArgumentParser(
        prog="gateway simulate bioreactor",
        description="OPC UA fed-batch bioreactor simulator. " + _HELP + " (on stdin)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4840, help="0 picks a free port")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="simulated seconds per wall second"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--update-interval", type=float, default=0.2, help="wall seconds")
    parser.add_argument(
        "--security",
        action="append",
        choices=sorted(SECURITY_POLICIES),
        help="repeatable; default None",
    )
    parser.add_argument(
        "--user", type=user, action="append", default=[], help="NAME:PASSWORD, repeatable"
    )
    parser.add_argument(
        "--allow-anonymous", action="store_true", help="also allow anonymous with --user"
    )
    parser.add_argument("--cert-dir", type=Path, help="server certificate directory (reused)")
    parser.add_argument(
        "--trust-client-cert", type=Path, action="append", default=[], help="repeatable"
    )
    parser.add_argument("--extra-variables", type=int, default=0)
    return parser.parse_args(argv)


async def _handle_command(sim: BioreactorSimulator, line: str) -> None:
    """Run one stdin command, answering on stdout."""
    words = line.split()
    if not words:
        return
    try:
        if words == ["values"]:
            print(json.dumps(sim.values()), flush=True)
        elif words[0] == "fault" and 2 <= len(words) <= 3:
            kind = None if words[1] == "off" else words[1]
            if kind is not None and kind not in get_args(FaultKind):
                raise ValueError(f"bad fault {words[1]!r}")
            sim.set_fault(cast(FaultKind | None, kind), words[2] if len(words) == 3 else None)
            print(f"ok: {line.strip()}", flush=True)
        elif words[0] == "restart" and len(words) <= 2:
            await sim.restart(float(words[1]) if len(words) == 2 else 1.0)
            print(f"ok: {line.strip()}", flush=True)
        else:
            print(_HELP, flush=True)
    except ValueError as exc:
        print(f"error: {exc}; {_HELP}", flush=True)


async def _serve(args: argparse.Namespace) -> int:
    sim = BioreactorSimulator(
        host=args.host,
        port=args.port,
        time_scale=args.time_scale,
        seed=args.seed,
        update_interval=args.update_interval,
        security=args.security or ("None",),
        users=dict(args.user) if args.user else None,
        allow_anonymous=True if args.allow_anonymous else None,
        cert_dir=args.cert_dir,
        trusted_client_certs=args.trust_client_cert,
        extra_variables=args.extra_variables,
    )
    try:
        await sim.start()
    except (OSError, RuntimeError) as exc:
        print(f"bioreactor simulator: cannot listen on {sim.endpoint}: {exc}", file=sys.stderr)
        return 1
    print(f"bioreactor simulator listening on {sim.endpoint}", flush=True)
    print(f"server certificate: {sim.server_certificate}", flush=True)

    return await run_until_signal(lambda line: _handle_command(sim, line), sim.stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the process exit code."""
    return console.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
