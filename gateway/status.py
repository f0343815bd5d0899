"""`gateway status`: the health endpoint's /readyz and /metrics, for a person.

Exit status: 0 ready, 1 running but not ready, 3 unreachable (as with
``systemctl status``: 3 means not running).
"""

from __future__ import annotations

import json
import tomllib
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from gateway.config import HealthSection
from gateway.errors import ConfigError

EXIT_READY, EXIT_NOT_READY, EXIT_UNREACHABLE = 0, 1, 3


DEFAULT_URL = f"http://127.0.0.1:{HealthSection().port}"


def health_section(path: Path) -> HealthSection:
    """Only ``[health]`` of a config file.

    The rest is not validated: it may reference ``${CREDENTIALS_DIRECTORY}`` or
    other variables that only the service's environment has.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return HealthSection.model_validate(data.get("health", {}))
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid [health] section: {exc}") from None


def url_from_config(path: Path) -> str:
    """Where the gateway run with this config answers (a wildcard bind is asked on loopback)."""
    h = health_section(path)
    if not h.enabled:
        raise ConfigError(f"{path}: [health] enabled = false: nothing to ask")
    if h.port == 0:
        raise ConfigError(f"{path}: [health] port = 0 (random): give --url")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(h.listen, h.listen)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{h.port}"


def fetch(url: str, timeout: float) -> tuple[int, bytes]:
    """GET ``url``: (HTTP status, body); raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


def status(base: str, timeout: float = 5.0) -> tuple[int, str]:
    """(exit status, text) for the gateway answering at ``base``."""
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"{base}: the health endpoint is an http:// URL")
    try:
        code, body = fetch(f"{base}/readyz", timeout)
        mcode, mbody = fetch(f"{base}/metrics", timeout)
    except OSError as exc:
        return EXIT_UNREACHABLE, f"gateway at {base}: unreachable ({exc})"
    if code not in (200, 503) or mcode != 200:
        return EXIT_UNREACHABLE, f"gateway at {base}: unexpected answer ({code}, {mcode})"
    try:
        ready = json.loads(body)
        text = render(ready, mbody.decode(), base=base)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # Something else answers on that port (another service, a proxy page).
        return EXIT_UNREACHABLE, f"gateway at {base}: not a gateway health endpoint ({exc})"
    return (EXIT_READY if code == 200 else EXIT_NOT_READY), text


def _samples(text: str) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, str]]:
    """Scalars by name, per-label values by name, and the build info labels."""
    scalars: dict[str, float] = {}
    labelled: dict[str, dict[str, float]] = defaultdict(dict)
    info: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            if s.name == "gateway_build_info":
                info = dict(s.labels)
            elif s.labels:
                labelled[s.name][next(iter(s.labels.values()))] = s.value
            else:
                scalars[s.name] = s.value
    return scalars, labelled, info


def render(ready: dict[str, Any], metrics: str, *, base: str = "") -> str:
    m, per, info = _samples(metrics)
    gw = info.get("gateway", "?")
    head = "READY" if ready.get("ready") else "NOT READY"
    lines = [f"gateway {gw} (version {info.get('version', '?')}) at {base}: {head}"]
    lines += [f"  ! {r}" for r in ready.get("reasons", [])]
    broker = ready.get("broker", {})
    state = "connected" if broker.get("connected") else "DISCONNECTED"
    lines.append(
        f"broker   {state}; published {_n(m, 'gateway_publisher_published_total')}, "
        f"acked {_n(m, 'gateway_publisher_acked_total')}, "
        f"in flight {_n(m, 'gateway_publisher_inflight')}, "
        f"reconnects {_n(m, 'gateway_broker_reconnects_total')}"
    )
    oldest = m.get("gateway_outbox_oldest_age_seconds")
    quota = m.get("gateway_outbox_max_bytes") or 0
    used = m.get("gateway_outbox_bytes", 0.0)
    lines.append(
        f"outbox   {_n(m, 'gateway_outbox_messages')} messages, {_bytes(used)} of "
        f"{_bytes(quota)} ({100 * used / quota if quota else 0:.1f} %), "
        f"oldest {'-' if oldest is None else _age(oldest)}, "
        f"dropped {_n(m, 'gateway_outbox_dropped_records_total')} records"
    )
    devices = ready.get("devices", {})
    if devices:
        lines.append(
            f"{'device':<20} {'state':<11} {'reads':>9} {'errors':>8} {'records':>10} "
            f"{'last good':>10} {'seq':>10}"
        )
    ages = per.get("gateway_device_last_good_read_age_seconds", {})
    for dev, d in devices.items():
        age = ages.get(dev)
        lines.append(
            f"{dev:<20} {d['state']:<11} "
            f"{_i(per, 'gateway_device_reads_total', dev):>9} "
            f"{_i(per, 'gateway_device_errors_total', dev):>8} "
            f"{_i(per, 'gateway_device_records_total', dev):>10} "
            f"{'-' if age is None else _age(age):>10} "
            f"{_i(per, 'gateway_chain_seq', dev):>10}"
            + ("" if d["state"] == "acquiring" else f"  {d['detail']}")
        )
    rss = m.get("process_resident_memory_bytes")
    if rss is not None:
        lines.append(f"process  RSS {_bytes(rss)}, open fds {_n(m, 'process_open_fds')}")
    return "\n".join(lines)


def _n(m: dict[str, float], name: str) -> str:
    v = m.get(name)
    return "-" if v is None else f"{v:.0f}"


def _i(per: dict[str, dict[str, float]], name: str, key: str) -> str:
    v = per.get(name, {}).get(key)
    return "-" if v is None else f"{v:.0f}"


def _age(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
