"""The SiLA 2 driver against a SiLA server not written here: the SiLA
interoperability test server (tests/support/sila_interop.py), with a real
Mosquitto and the gateway in-process.

What it catches that our own simulator cannot: a subscription the server ends
normally after one value (a property whose value is final), SiLA Date and
Timestamp values as another implementation sends them, and errors raised by
a server built on grpcio directly.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import Config, load_config
from gateway.record import Record
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import GatewaySpec, running
from tests.support.sila_interop import InteropServer

TAGS = {
    "answer": "UnobservablePropertyTest/v1/Property/AnswerToEverything",
    "fixed": "ObservablePropertyTest/v1/Property/FixedValue",
    "alternating": "ObservablePropertyTest/v1/Property/Alternating",
    "date": "BasicDataTypesTest/v1/Property/DateValue",
    "timestamp": "BasicDataTypesTest/v1/Property/TimestampValue",
    "error": "ErrorHandlingTest/v1/Property/RaiseDefinedExecutionErrorOnSubscribe",
}


@pytest.fixture(scope="module")
async def plain() -> AsyncIterator[InteropServer]:
    srv = await InteropServer().start()
    yield srv
    await srv.stop()


def config(tmp_path: Path, broker: Mosquitto, block: str) -> Config:
    spec = GatewaySpec(tmp_path / "state", broker.port, [])
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "gw.toml"
    path.write_text(spec.toml() + "\n" + block)
    return load_config(path)


def good(col: Collector, tag: str, after: float = 0.0) -> list[Record]:
    return [r for r in col.of("interop", tag) if r["q"] == "good" and r["ts"] / 1e9 > after]


async def test_values_errors_and_a_subscription_the_server_ends(
    plain: InteropServer, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = config(tmp_path, broker, plain.device_toml("interop", TAGS))
    async with Collector(broker.port) as col, running(cfg):
        await col.wait_for(
            lambda: all(good(col, t) for t in ("answer", "fixed", "date", "timestamp")),
            15,
            "a good value of every readable tag",
        )
        # Alternating changes every second; FixedValue's stream ends after its one value.
        await col.wait_for(lambda: len(good(col, "alternating")) >= 3, 10, "alternating values")
    assert not col.of("interop", "$offline"), col.of("interop", "$offline")
    assert [r["val"] for r in good(col, "answer")][:1] == [42]
    # A final value is recorded once, however often the stream is opened again.
    assert [r["val"] for r in col.of("interop", "fixed")] == [42]
    vals = [r["val"] for r in good(col, "alternating")]
    assert set(vals) == {True, False}
    (date,) = {r["val"] for r in good(col, "date")}
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}(Z|[+-]\d{2}:\d{2})", date), date
    ts = good(col, "timestamp")[0]["val"]
    assert isinstance(ts, int) and ts % 1000 == 0 and ts > 946_684_800 * 10**9, ts
    (err,) = col.of("interop", "error")  # reported once, not at every retry
    assert err["q"] == "bad" and err["val"] is None
    assert err["status"].startswith(
        "org.silastandard/test/ErrorHandlingTest/v1/DefinedExecutionError/TestError: "
    ), err
    report = col.verifier.report()
    assert report.ok, report.summary()


async def test_tls_and_a_server_restart(broker: Mosquitto, tmp_path: Path) -> None:
    srv = await InteropServer(cert_dir=tmp_path / "certs").start()
    tags = {k: TAGS[k] for k in ("answer", "alternating", "fixed")}
    cfg = config(tmp_path, broker, srv.device_toml("interop", tags))
    try:
        async with Collector(broker.port) as col, running(cfg):
            await col.wait_for(lambda: len(good(col, "alternating")) >= 2, 15, "values over TLS")
            t_stop = time.time()
            await srv.stop()
            await col.wait_for(lambda: col.of("interop", "$offline"), 5, "$offline")
            await srv.start()
            await col.wait_for(lambda: len(col.of("interop", "$online")) >= 2, 15, "$online")
            back = col.of("interop", "$online")[-1]["ts"] / 1e9
            await col.wait_for(lambda: good(col, "alternating", back), 10, "values after")
        offline = col.of("interop", "$offline")[0]
        assert offline["ts"] / 1e9 - t_stop < 2.0, offline
        # FixedValue's one value comes again after the reconnect (a new connection), not before.
        fixed = [r["ts"] / 1e9 for r in good(col, "fixed")]
        assert len(fixed) == 2 and fixed[0] < t_stop < back <= fixed[1] + 0.001, fixed
        report = col.verifier.report()
        assert report.ok, report.summary()
    finally:
        await srv.stop()
