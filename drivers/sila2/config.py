"""Configuration of a SiLA 2 device: where the server is, how to trust it, which properties."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from uuid import UUID

from pydantic import Field, field_validator, model_validator

from gateway.config import DeviceConfig, StrictModel, TagConfig

# originator/category/Feature/vN[/Property]/Identifier (SiLA 2 Part A, fully
# qualified identifiers; originator and category are lower-case, dotted).
_PROPERTY = re.compile(
    r"^(?P<feature>[a-z][a-z.]*/[a-z][a-z.]*/[A-Z][a-zA-Z0-9]*/v\d+)"
    r"/(?:Property/)?(?P<prop>[A-Z][a-zA-Z0-9]*)$"
)


@dataclass(frozen=True, slots=True)
class PropertyRef:
    feature: str  # fully qualified feature identifier, e.g. org.x/examples/CellAnalyser/v1
    identifier: str  # property identifier, e.g. ViableCellDensity

    @property
    def qualified(self) -> str:
        return f"{self.feature}/Property/{self.identifier}"

    @property
    def feature_name(self) -> str:
        return self.feature.split("/")[2]


def parse_property(text: str) -> PropertyRef:
    """``org.x/examples/CellAnalyser/v1[/Property]/Glucose``; ValueError if malformed."""
    m = _PROPERTY.match(text.strip())
    if m is None:
        raise ValueError(
            f"{text!r} is not a fully qualified property identifier "
            "(originator/category/Feature/vN/Property/Identifier, e.g. "
            "'org.equipmentgateway/examples/CellAnalyser/v1/Property/Glucose')"
        )
    return PropertyRef(m["feature"], m["prop"])


class Sila2Tag(TagConfig):
    """One feature property of the server."""

    property: str = Field(
        description="Fully qualified property identifier, "
        "e.g. 'org.equipmentgateway/examples/CellAnalyser/v1/Property/Glucose' "
        "(the '/Property' level may be left out)"
    )
    mode: Literal["auto", "subscribe", "poll"] = Field(
        "auto",
        description="auto: subscribe to observable properties, poll unobservable ones; "
        "poll: read an observable property every poll_interval instead; "
        "subscribe: the same as auto",
    )

    @field_validator("property")
    @classmethod
    def _property(cls, v: str) -> str:
        parse_property(v)
        return v.strip()

    def ref(self) -> PropertyRef:
        """The parsed ``property`` (a method: the field shadows the builtin here)."""
        return parse_property(self.property)


class Sila2Connection(StrictModel):
    """Where the SiLA 2 server is and how to talk to it (shared by devices and discovery)."""

    host: str | None = Field(None, min_length=1, description="Server host or IP address")
    port: int | None = Field(None, ge=1, le=65535, description="Server port")
    insecure: bool = Field(
        False, description="Plain-text gRPC, no TLS (only for test benches; SiLA requires TLS)"
    )
    ca: Path | None = Field(
        None,
        description="PEM CA (or the server's self-signed certificate) to trust; "
        "default: the system's CAs",
    )
    client_cert: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    client_key: Path | None = Field(None, description="PEM key of client_cert")
    tls_server_name: str | None = Field(
        None,
        min_length=1,
        description="Name to check the server certificate against, when not the host",
    )
    server_uuid: UUID | None = Field(
        None, description="Refuse a server whose SiLAService ServerUUID differs"
    )
    discovery: bool = Field(
        False, description="Find host and port by SiLA Server Discovery (mDNS) instead"
    )
    server_name: str | None = Field(
        None, min_length=1, description="With discovery: the server's SiLA server name"
    )
    timeout: float = Field(5.0, gt=0, le=300, description="Seconds to wait for each answer")

    @model_validator(mode="after")
    def _where_and_trust(self) -> Sila2Connection:
        if self.discovery:
            if self.server_uuid is None and self.server_name is None:
                raise ValueError("discovery needs server_uuid or server_name to pick the server")
        elif self.host is None or self.port is None:
            raise ValueError("give host and port (or discovery = true with server_uuid)")
        if self.insecure and (
            self.ca is not None or self.client_cert is not None or self.tls_server_name
        ):
            raise ValueError(
                "insecure = true cannot be combined with ca, client_cert or tls_server_name"
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self


class Sila2Device(DeviceConfig, Sila2Connection):
    """One SiLA 2 server: observable properties subscribed, the others polled."""

    driver: Literal["sila2"]
    liveness_interval: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="Seconds between SiLAService checks that the server still answers",
    )
    resubscribe_delay: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Seconds before re-subscribing a property whose subscription ended "
        "with a SiLA error, or ended normally while the server still answers (doubling, "
        "up to 60 s, while each new subscription ends after one value)",
    )
    buffer_size: int = Field(
        10_000, ge=10, le=10_000_000, description="Values buffered before the streams wait"
    )
    tags: list[Sila2Tag] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_properties(self) -> Sila2Device:
        seen: dict[str, str] = {}
        for t in self.tags:
            q = t.ref().qualified
            if q in seen:
                raise ValueError(f"tags {seen[q]!r} and {t.name!r} read the same property {q}")
            seen[q] = t.name
        return self
