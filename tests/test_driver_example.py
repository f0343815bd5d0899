"""The example driver of docs/drivers.md, run for real: a line-based TCP thermometer.

The driver below is the documentation's example (same code, same config model).
The thermometer is a real asyncio TCP server in this process; the gateway runs
in-process against the session's Mosquitto, and a subscriber checks what arrives.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from gateway import registry
from gateway.config import Config, DeviceConfig, TagConfig, parse_config
from gateway.driver import PolledDriver, Reading
from gateway.errors import ConfigError, DriverError
from gateway.record import BAD
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import running

# --- the example driver (docs/drivers.md) -------------------------------------------


class ThermoTag(TagConfig):
    """One value of the answer line, found by the name before its '='."""

    symbol: str = Field("T", pattern=r"^[A-Za-z]+$", description="Name before '=' in the answer")


class ThermoDevice(DeviceConfig):
    """A thermometer that answers `READ\\n` with `T=37.02\\n`."""

    driver: Literal["thermo"]
    host: str = Field(description="Host name or IP address")
    port: int = Field(4001, ge=1, le=65535)
    timeout: float = Field(1.0, gt=0, le=60, description="Seconds to wait for each answer")
    tags: list[ThermoTag] = Field(min_length=1)


class ThermoDriver(PolledDriver[ThermoDevice]):
    """Polls one thermometer over one TCP connection."""

    config_model = ThermoDevice

    def __init__(self, config: ThermoDevice) -> None:
        super().__init__(config)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        c = self.config
        try:
            async with asyncio.timeout(c.timeout):
                self._reader, self._writer = await asyncio.open_connection(
                    c.host, c.port, limit=4096
                )
        except TimeoutError:  # before OSError: TimeoutError is one
            raise DriverError(c.id, f"cannot connect to {c.host}:{c.port}: timeout") from None
        except OSError as exc:
            raise DriverError(c.id, f"cannot connect to {c.host}:{c.port}: {exc}") from exc

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # never raises; the transport closes by itself
            self._writer = None

    async def poll(self) -> list[Reading]:
        c = self.config
        assert self._reader is not None and self._writer is not None
        try:
            async with asyncio.timeout(c.timeout):  # one bound for request and answer
                self._writer.write(b"READ\n")
                await self._writer.drain()
                line = await self._reader.readline()
        except TimeoutError:
            # A late answer would be taken for the next one: start a new connection.
            raise DriverError(c.id, f"no answer within {c.timeout:g} s") from None
        except (OSError, ValueError) as exc:  # ValueError: line longer than the limit
            raise DriverError(c.id, f"connection lost: {exc}") from exc
        if not line.endswith(b"\n"):
            raise DriverError(c.id, "connection closed by the device")
        text = line.decode("ascii", "replace").strip()
        fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
        out: list[Reading] = []
        for tag in c.tags:
            try:
                out.append(Reading(tag.name, float(fields.get(tag.symbol, ""))))
            except ValueError:  # per-tag failure: a bad reading, never the last value
                status = f"parse error: no number for {tag.symbol!r} in {text!r}"
                out.append(Reading(tag.name, None, BAD, status))
        return out


registry.register("thermo", ThermoDriver)

# --- the thermometer ----------------------------------------------------------------


class Thermometer:
    """A TCP server answering `READ\\n` with ``answer``; stop() drops every connection."""

    def __init__(self) -> None:
        self.answer = b"T=37.02\n"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                if line == b"READ\n":
                    writer.write(self.answer)
                    await writer.drain()
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        """Listen (on the same port again after stop())."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None


@pytest.fixture
async def thermometer() -> AsyncIterator[Thermometer]:
    t = Thermometer()
    await t.start()
    yield t
    await t.stop()


def thermo_config(state_dir: Path, broker_port: int, device_port: int) -> Config:
    text = f"""
[gateway]
id = "gw-thermo"
state_dir = "{state_dir}"

[broker]
port = {broker_port}
reconnect_min = 0.1
reconnect_max = 0.5

[[devices]]
id = "incubator-1"
driver = "thermo"
host = "127.0.0.1"
port = {device_port}
poll_interval = 0.05
timeout = 0.5

[[devices.tags]]
name = "temperature"
symbol = "T"
unit = "Cel"
"""
    return parse_config(text, Path("thermo.toml"), {})


DEV = "incubator-1"


def readings(col: Collector) -> list[dict[str, object]]:
    return [r for r in col.of(DEV) if not str(r["tag"]).startswith("$")]


# --- tests --------------------------------------------------------------------------


async def test_readings_arrive_with_value_and_unit_and_verify(
    thermometer: Thermometer, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = thermo_config(tmp_path / "state", broker.port, thermometer.port)
    async with Collector(broker.port) as col:
        async with running(cfg):
            await col.wait_for(lambda: len(readings(col)) >= 5, what="5 polls")
        await col.wait_for(lambda: col.of(DEV, "$stop"), what="stop event")

    rs = readings(col)
    assert all(r["tag"] == "temperature" for r in rs)
    assert all(r["q"] == "good" and r["unit"] == "Cel" for r in rs), rs[:3]
    assert all(r["val"] == 37.02 and isinstance(r["val"], float) for r in rs)
    assert all("status" not in r for r in rs)
    events = [r["tag"] for r in col.of(DEV) if str(r["tag"]).startswith("$")]
    assert events[:2] == ["$start", "$online"] and events[-1] == "$stop"
    report = col.verifier.report()
    assert report.ok, report.summary()
    assert [(s.gw, s.dev, s.first_seq) for s in report.streams] == [
        ("gw-thermo", "$gateway", 1),  # the gateway's audit stream
        ("gw-thermo", DEV, 1),
    ]


async def test_garbage_answer_is_a_bad_reading_naming_the_parse_error(
    thermometer: Thermometer, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = thermo_config(tmp_path / "state", broker.port, thermometer.port)
    async with Collector(broker.port) as col:
        async with running(cfg):
            await col.wait_for(lambda: readings(col), what="a first good reading")
            thermometer.answer = b"T=abc\n"
            await col.wait_for(
                lambda: any(r["q"] == "bad" for r in readings(col)), what="a bad reading"
            )
            thermometer.answer = b"T=36.5\n"
            await col.wait_for(
                lambda: any(r["val"] == 36.5 for r in readings(col)), what="good again"
            )
        await col.wait_for(lambda: col.of(DEV, "$stop"), what="stop event")

    bad = [r for r in readings(col) if r["q"] == "bad"]
    assert bad and all(r["val"] is None for r in bad), "a bad reading never carries a value"
    assert all(r["status"] == "parse error: no number for 'T' in 'T=abc'" for r in bad), bad[0]
    # Garbage is a per-tag failure, not a lost connection: no $offline.
    assert not col.of(DEV, "$offline")
    vals = [r["val"] for r in readings(col)]
    first_bad = vals.index(None)
    assert set(vals[:first_bad]) == {37.02}
    assert 36.5 in vals[first_bad:] and 37.02 not in vals[first_bad:], "no stale value re-sent"
    report = col.verifier.report()
    assert report.ok, report.summary()


async def test_device_closing_is_offline_then_online_when_back(
    thermometer: Thermometer, broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = thermo_config(tmp_path / "state", broker.port, thermometer.port)
    async with Collector(broker.port) as col:
        async with running(cfg) as gw:
            await col.wait_for(lambda: readings(col), what="a first good reading")
            await thermometer.stop()
            await col.wait_for(lambda: col.of(DEV, "$offline"), what="$offline")
            await asyncio.sleep(0.8)  # the first reconnect (after 0.5 s) is refused
            thermometer.answer = b"T=38.1\n"
            await thermometer.start()
            await col.wait_for(
                lambda: any(r["val"] == 38.1 for r in readings(col)), what="values after return"
            )
            assert gw.supervisors[DEV].online
        await col.wait_for(lambda: col.of(DEV, "$stop"), what="stop event")

    offline = col.of(DEV, "$offline")
    online = col.of(DEV, "$online")
    assert len(offline) == 1 and offline[0]["q"] == "bad"
    # EOF, or a reset if the close crossed a request: both say the connection is gone.
    reason = offline[0]["val"]
    assert reason == "connection closed by the device" or reason.startswith("connection lost")
    assert len(online) == 2 and online[0]["seq"] < offline[0]["seq"] < online[1]["seq"]
    # Between $offline and the second $online: every reading bad, val nil, with the reason.
    between = [r for r in readings(col) if offline[0]["seq"] < r["seq"] < online[1]["seq"]]
    assert between and all(r["q"] == "bad" and r["val"] is None for r in between)
    assert between[0]["status"] == reason
    assert any("cannot connect" in str(r["status"]) for r in between), "a refused reconnect"
    after = [r for r in readings(col) if r["seq"] > online[1]["seq"]]
    assert after and all(r["q"] == "good" and r["val"] == 38.1 for r in after)
    report = col.verifier.report()
    assert report.ok, report.summary()


def test_unknown_key_is_a_config_error(tmp_path: Path) -> None:
    text = (
        f'[gateway]\nid = "gw-thermo"\nstate_dir = "{tmp_path}"\n'
        '[[devices]]\nid = "incubator-1"\ndriver = "thermo"\nhost = "10.0.0.5"\ntimout = 2\n'
        '[[devices.tags]]\nname = "temperature"\nsymbol = "t1"\n'
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, Path("gateway.toml"), {})
    assert str(err.value) == (
        "gateway.toml: invalid configuration:\n"
        "  devices[0].tags[0].symbol: String should match pattern '^[A-Za-z]+$' (got 't1')\n"
        "  devices[0].timout: unknown key (check the spelling; see `gateway schema`)"
    )


def test_the_documented_example_is_this_driver() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "drivers.md").read_text()
    for cls in (ThermoTag, ThermoDevice, ThermoDriver):
        assert inspect.getsource(cls) in doc, f"docs/drivers.md is out of date: {cls.__name__}"
