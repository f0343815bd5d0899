"""Configuration models of the OPC UA driver, and the address syntaxes they accept.

Addresses (see docs/drivers/opcua.md):

* ``node_id``: the OPC UA string form ``ns=2;s=Tank.Level`` or, better, with the
  namespace URI instead of its index, ``nsu=urn:vendor:plant;s=Tank.Level``
  (indices may change when a server is reconfigured; URIs do not). Identifier
  types ``i=`` (numeric), ``s=`` (string), ``g=`` (GUID), ``b=`` (base64 bytes).
* ``browse_path``: browse names from the device's ``browse_start`` node
  (default the Root folder, ``i=84``) separated by ``/``, each qualified by its
  namespace: ``0:Objects/2:Bioreactor/2:Temperature``. The qualifier is a
  namespace index, a URI in angle brackets (``<urn:vendor:plant>:Bioreactor``)
  or an alias from the device's ``namespaces`` table (``bio:Bioreactor``).
  ``&`` escapes the next character of a name (``&/`` for a slash in a name).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config import DeviceConfig, StrictModel, TagConfig, resolve_secret

SecurityPolicy = Literal["None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]
Timestamp = Literal["source", "server", "gateway"]
Trigger = Literal["status", "status_value", "status_value_timestamp"]
DeadbandType = Literal["none", "absolute", "percent"]

_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{2}(:?[0-9a-fA-F]{2}){31}$")
ROOT_FOLDER = "i=84"
OBJECTS_FOLDER = "i=85"

# Settings a tag may only give in subscribe mode (they configure a monitored item).
_SUBSCRIBE_ONLY = (
    "sampling_interval",
    "queue_size",
    "discard_oldest",
    "trigger",
    "deadband_type",
    "deadband_value",
)


# --- NodeId strings ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A parsed NodeId string: namespace by index (int) or by URI (str)."""

    namespace: int | str
    kind: Literal["i", "s", "g", "b"]
    identifier: int | str | bytes | uuid.UUID

    def text(self) -> str:
        """The canonical string form (``nsu=`` first when the namespace is a URI)."""
        return format_node_id(self.namespace, self.kind, self.identifier)


def parse_node_id(text: str) -> NodeRef:
    """Parse ``[ns=<index>;|nsu=<uri>;]<i|s|g|b>=<identifier>``; ValueError if malformed."""
    rest = text.strip()
    namespace: int | str = 0
    if rest.startswith("nsu="):
        uri, sep, rest = rest[4:].partition(";")
        if not sep or not uri:
            raise ValueError("nsu=<namespace URI> must be followed by ';' and the identifier")
        namespace = uri
    elif rest.startswith("ns="):
        index, sep, rest = rest[3:].partition(";")
        if not sep or not index.isdigit() or int(index) > 65535:
            raise ValueError("ns=<index> needs an index 0..65535 followed by ';'")
        namespace = int(index)
    kind, sep, ident = rest.partition("=")
    if not sep or kind not in ("i", "s", "g", "b"):
        raise ValueError(
            "expected an identifier i=<number>, s=<string>, g=<guid> or b=<base64>, "
            "optionally after ns=<index>; or nsu=<uri>;"
        )
    if kind == "i":
        if not ident.isdigit() or int(ident) > 0xFFFFFFFF:
            raise ValueError(f"numeric identifier must be 0..4294967295, not {ident!r}")
        return NodeRef(namespace, "i", int(ident))
    if kind == "s":
        if not ident:
            raise ValueError("string identifier is empty")
        return NodeRef(namespace, "s", ident)
    if kind == "g":
        try:
            return NodeRef(namespace, "g", uuid.UUID(ident))
        except ValueError:
            raise ValueError(f"not a GUID: {ident!r}") from None
    try:
        return NodeRef(namespace, "b", base64.b64decode(ident, validate=True))
    except (binascii.Error, ValueError):
        raise ValueError(f"not base64: {ident!r}") from None


def format_node_id(namespace: int | str, kind: str, identifier: object) -> str:
    """String form of a NodeId; a URI namespace is written ``nsu=<uri>;``."""
    if kind == "b" and isinstance(identifier, bytes):
        ident = base64.b64encode(identifier).decode("ascii")
    else:
        ident = str(identifier)
    if isinstance(namespace, str):
        return f"nsu={namespace};{kind}={ident}"
    if namespace:
        return f"ns={namespace};{kind}={ident}"
    return f"{kind}={ident}"


# --- browse paths -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathSegment:
    """One element of a browse path: namespace (index, URI or alias) and browse name."""

    namespace: int | str
    name: str
    alias: bool = False  # namespace is an alias still to be looked up


def parse_browse_path(text: str) -> list[PathSegment]:
    """Split ``0:Objects/<urn:x>:Tank/x:Level`` into segments; ValueError if malformed."""
    segments: list[PathSegment] = []
    i, n = 0, len(text)
    if not text:
        raise ValueError("browse path is empty")
    while True:
        start = i
        alias = False
        namespace: int | str
        if i < n and text[i] == "<":
            end = text.find(">", i)
            if end < 0:
                raise ValueError(f"unclosed '<' at character {i + 1}")
            namespace = text[i + 1 : end]
            if not namespace:
                raise ValueError(f"empty namespace URI at character {i + 1}")
            i = end + 1
            if i >= n or text[i] != ":":
                raise ValueError(f"expected ':' after the namespace URI at character {i + 1}")
        else:
            colon = text.find(":", i)
            slash = text.find("/", i)
            if colon < 0 or (0 <= slash < colon):
                seg = text[i : slash if slash >= 0 else n]
                raise ValueError(
                    f"segment {seg!r} has no namespace: write <index>:{seg}, "
                    f"<namespace URI>:{seg} or <alias>:{seg}"
                )
            prefix = text[i:colon]
            if prefix.isdigit():
                namespace = int(prefix)
            elif _ALIAS.match(prefix):
                namespace, alias = prefix, True
            else:
                raise ValueError(f"bad namespace qualifier {prefix!r} at character {i + 1}")
            i = colon
        i += 1  # the ':'
        name: list[str] = []
        while i < n and text[i] != "/":
            ch = text[i]
            if ch == "&":
                i += 1
                if i >= n:
                    raise ValueError("'&' at the end of the path escapes nothing")
                ch = text[i]
            name.append(ch)
            i += 1
        if not name:
            raise ValueError(f"empty browse name at character {start + 1}")
        segments.append(PathSegment(namespace, "".join(name), alias))
        if i >= n:
            return segments
        i += 1  # the '/'
        if i >= n:
            raise ValueError("browse path ends with '/'")


def escape_browse_name(name: str) -> str:
    """A browse name as written in a browse path (``/`` and ``&`` escaped)."""
    return name.replace("&", "&&").replace("/", "&/")


def format_browse_path(segments: list[tuple[int | str, str]]) -> str:
    """``[(0, "Objects"), ("urn:x", "Tank")]`` -> ``0:Objects/<urn:x>:Tank``."""
    parts = []
    for ns, name in segments:
        prefix = f"<{ns}>" if isinstance(ns, str) else str(ns)
        parts.append(f"{prefix}:{escape_browse_name(name)}")
    return "/".join(parts)


# --- models -----------------------------------------------------------------


class OpcUaTag(TagConfig):
    """One variable of the server, by NodeId or by browse path."""

    node_id: str | None = Field(
        None, description="NodeId, e.g. 'nsu=urn:vendor:plant;s=Tank.Level' or 'ns=2;i=1042'"
    )
    browse_path: str | None = Field(
        None, description="Browse path from browse_start, e.g. '0:Objects/2:Tank/2:Level'"
    )
    sampling_interval: float | None = Field(
        None, ge=0, le=3600, description="Seconds; default: the publishing interval (subscribe)"
    )
    queue_size: int = Field(1, ge=1, le=100_000, description="Server-side queue (subscribe)")
    discard_oldest: bool = Field(True, description="Which value a full server queue drops")
    trigger: Trigger = Field("status_value", description="Data change trigger (subscribe)")
    deadband_type: DeadbandType = Field("none", description="Server-side deadband (subscribe)")
    deadband_value: float = Field(
        0.0, ge=0, description="Absolute (engineering units) or percent of the EURange"
    )

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str | None) -> str | None:
        if v is not None:
            parse_node_id(v)
        return v

    @field_validator("browse_path")
    @classmethod
    def _browse_path(cls, v: str | None) -> str | None:
        if v is not None:
            parse_browse_path(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaTag:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("give exactly one of node_id and browse_path")
        if self.deadband_type == "none" and self.deadband_value != 0:
            raise ValueError("deadband_value needs deadband_type 'absolute' or 'percent'")
        if self.deadband_type != "none" and self.deadband_value <= 0:
            raise ValueError(f"deadband_type {self.deadband_type!r} needs deadband_value > 0")
        if self.deadband_type == "percent" and self.deadband_value > 100:
            raise ValueError("a percent deadband_value is 0..100 (of the EURange)")
        if self.deadband_type != "none" and self.trigger == "status":
            raise ValueError("a deadband needs trigger 'status_value' or 'status_value_timestamp'")
        return self

    def segments(self, aliases: dict[str, str]) -> list[PathSegment]:
        """The browse path with aliases replaced by their namespace URIs."""
        assert self.browse_path is not None
        out = []
        for seg in parse_browse_path(self.browse_path):
            if seg.alias:
                assert isinstance(seg.namespace, str)
                out.append(PathSegment(aliases[seg.namespace], seg.name))
            else:
                out.append(seg)
        return out


class OpcUaConnection(StrictModel):
    """Where the server is and how to talk to it (shared by devices and `gateway browse`)."""

    endpoint: str = Field(
        pattern=r"^opc\.tcp://[^/\s]+", description="Server endpoint, opc.tcp://host:port/path"
    )
    security_policy: SecurityPolicy = Field(
        "None", description="None, Basic256Sha256, Aes128Sha256RsaOaep, Aes256Sha256RsaPss"
    )
    security_mode: SecurityMode | None = Field(
        None, description="None, Sign or SignAndEncrypt; default SignAndEncrypt with a policy"
    )
    username: str | None = Field(None, min_length=1, description="UserName token")
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="File holding the password")
    user_cert: Path | None = Field(None, description="X.509 user token certificate (PEM/DER)")
    user_key: Path | None = Field(None, description="Private key of user_cert (PEM/DER)")
    client_cert_dir: Path | None = Field(
        None, description="Gateway's client certificate; default <state_dir>/opcua"
    )
    server_cert: Path | None = Field(None, description="Trust exactly this server certificate")
    server_cert_sha256: str | None = Field(
        None, description="Trust the server certificate with this SHA-256 fingerprint (hex)"
    )
    trust_on_first_use: bool = Field(
        False, description="Pin the server certificate seen first into the state directory"
    )
    timeout: float = Field(5.0, gt=0, le=300, description="Seconds to wait for each answer")
    session_timeout: float = Field(
        60.0, ge=10, le=86400, description="Seconds the server keeps a silent session"
    )

    @field_validator("server_cert_sha256")
    @classmethod
    def _fingerprint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _SHA256.match(v.strip()):
            raise ValueError("expected 64 hex digits (colons between bytes allowed)")
        return v.strip().replace(":", "").lower()

    @model_validator(mode="after")
    def _security(self) -> OpcUaConnection:
        mode = self.effective_mode
        if (self.security_policy == "None") != (mode == "None"):
            raise ValueError(
                f"security_policy {self.security_policy!r} and security_mode {mode!r} do not go "
                "together: both None, or a policy with Sign/SignAndEncrypt"
            )
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        has_password = self.password is not None or self.password_file is not None
        if has_password and self.username is None:
            raise ValueError("password needs username")
        if self.username is not None and not has_password:
            raise ValueError("username needs password or password_file")
        if (self.user_cert is None) != (self.user_key is None):
            raise ValueError("user_cert and user_key go together")
        if self.username is not None and self.user_cert is not None:
            raise ValueError("give username or user_cert (one user token), not both")
        pins = sum(x is not None for x in (self.server_cert, self.server_cert_sha256))
        if pins > 1:
            raise ValueError("give server_cert or server_cert_sha256, not both")
        if pins and self.trust_on_first_use:
            raise ValueError("trust_on_first_use is for servers without server_cert/_sha256")
        if (mode != "None" or self.username is not None) and not (pins or self.trust_on_first_use):
            why = f"security_mode {mode}" if mode != "None" else "a password"
            raise ValueError(
                f"{why} needs a trusted server certificate: set server_cert, "
                "server_cert_sha256 or trust_on_first_use = true"
            )
        return self

    @property
    def effective_mode(self) -> SecurityMode:
        if self.security_mode is not None:
            return self.security_mode
        return "None" if self.security_policy == "None" else "SignAndEncrypt"

    def secret_password(self) -> str | None:
        """The password, read from password_file when one is given."""
        return resolve_secret(self.password, self.password_file, "password_file")


class OpcUaDevice(DeviceConfig, OpcUaConnection):
    """One OPC UA server session (subscribe or poll)."""

    driver: Literal["opcua"]
    mode: Literal["subscribe", "poll"] = Field(
        "subscribe", description="subscribe: monitored items; poll: Read every poll_interval"
    )
    publishing_interval: float = Field(
        1.0, gt=0, le=3600, description="Seconds between notification messages (subscribe)"
    )
    keepalive_count: int = Field(
        10, ge=1, le=10_000, description="Empty publishing intervals before a keep-alive"
    )
    watchdog_intervals: int | None = Field(
        None,
        ge=2,
        le=100_000,
        description="Publishing intervals with no data and no keep-alive before reconnecting; "
        "default 2 x keepalive_count",
    )
    health_check_interval: float = Field(
        5.0, gt=0, le=600, description="Seconds between reads of the server state (both modes)"
    )
    timestamp: Timestamp = Field(
        "source", description="src_ts from the SourceTimestamp, the ServerTimestamp, or none"
    )
    namespaces: dict[str, str] = Field(
        default_factory=dict, description="Aliases for namespace URIs used in browse paths"
    )
    browse_start: str = Field(ROOT_FOLDER, description="Node browse paths start from")
    max_items_per_call: int = Field(
        500, ge=1, le=10_000, description="Monitored items created per request"
    )
    max_nodes_per_read: int = Field(1000, ge=1, le=100_000, description="Nodes per Read request")
    buffer_size: int = Field(
        10_000, ge=10, le=10_000_000, description="Notifications buffered before coalescing"
    )
    tags: list[OpcUaTag] = Field(min_length=1)

    @field_validator("browse_start")
    @classmethod
    def _start(cls, v: str) -> str:
        parse_node_id(v)
        return v

    @field_validator("namespaces")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        for alias, uri in v.items():
            if not _ALIAS.match(alias) or alias.isdigit():
                raise ValueError(f"alias {alias!r} must start with a letter or '_'")
            if not uri:
                raise ValueError(f"alias {alias!r} has an empty namespace URI")
        return v

    @model_validator(mode="after")
    def _device(self) -> OpcUaDevice:
        problems = []
        for i, t in enumerate(self.tags):
            where = f"tags[{i}] ({t.name})"
            if self.mode == "poll":
                given = [k for k in _SUBSCRIBE_ONLY if k in t.model_fields_set]
                if given:
                    problems.append(
                        f"{where}: {', '.join(given)} only apply in mode 'subscribe' "
                        "(for a gateway-side deadband in poll mode use `deadband`)"
                    )
            if t.browse_path is not None:
                for seg in parse_browse_path(t.browse_path):
                    if seg.alias and seg.namespace not in self.namespaces:
                        problems.append(
                            f"{where}.browse_path: namespace alias {seg.namespace!r} is not "
                            "defined in this device's `namespaces` table"
                        )
        if self.watchdog_intervals is not None and self.watchdog_intervals <= self.keepalive_count:
            problems.append(
                f"watchdog_intervals ({self.watchdog_intervals}) must exceed keepalive_count "
                f"({self.keepalive_count}): the server may legitimately stay silent that long"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def watchdog(self) -> int:
        """Publishing intervals without any Publish response before the session is dead."""
        return self.watchdog_intervals or 2 * self.keepalive_count
