"""Hot reload against real parts: a gateway process, Mosquitto and the off-gas simulator.

One acquisition runs through three reloads: a SIGHUP that changes one device
and adds another, a SIGHUP with a broken config (refused, acquisition goes
on), and `gateway reload --reason --user` that removes a device. Every stream
must verify with contiguous seqs, the unchanged device must never stop, and
each reload must be a chained `$reload` event on the `$gateway` stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.record import Record
from gateway.reload import GATEWAY_STREAM, diff_configs
from simulators.offgas import OffGasSimulator
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import Device, GatewaySpec, kill, spawn

REPO = Path(__file__).resolve().parent.parent
GATEWAY_RELOAD = [sys.executable, "-m", "gateway", "reload", "-c"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unique_seqs(records: list[Record], dev: str) -> list[int]:
    return sorted({r["seq"] for r in records if r["dev"] == dev})


def reloads(col: Collector) -> list[Record]:
    return col.of(GATEWAY_STREAM, "$reload")


async def test_reload_restarts_only_what_changed_and_loses_nothing(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    a = Device("offgas-a", sim.port, 1, poll_interval=0.1)
    b = Device("offgas-b", sim.port, 2, poll_interval=0.1)
    c = Device("offgas-c", sim.port, 3, poll_interval=0.1)
    spec = GatewaySpec(tmp_path / "state", broker.port, [a, b], gateway_id="gw-reload")
    config = spec.write()
    first_sha = sha256(config)
    log = tmp_path / "gw.log"
    async with Collector(broker.port, "plant/gw-reload/#") as col:
        proc = spawn(config, log)
        try:
            await col.wait_for(lambda: len(col.of("offgas-b", "O2")) >= 10, what="first polls")

            # 1. SIGHUP: offgas-b changed (poll interval), offgas-c added, offgas-a as it was.
            spec.devices = [a, Device("offgas-b", sim.port, 2, poll_interval=0.05), c]
            spec.write()
            proc.send_signal(signal.SIGHUP)
            await col.wait_for(lambda: reloads(col), what="the $reload event")
            await col.wait_for(lambda: len(col.of("offgas-c", "O2")) >= 10, what="new device")
            a_at_bad = len(col.of("offgas-a", "O2"))

            # 2. SIGHUP with a broken config: refused, nothing changes, acquisition goes on.
            good_text = config.read_text()
            config.write_text(good_text.replace("poll_interval = 0.05", "poll_interval = 0"))
            bad_sha = sha256(config)
            proc.send_signal(signal.SIGHUP)
            await col.wait_for(lambda: len(reloads(col)) >= 2, what="the refusal event")
            await col.wait_for(
                lambda: len(col.of("offgas-a", "O2")) >= a_at_bad + 10, what="polls after refusal"
            )

            # 3. `gateway reload --reason --user`: offgas-c removed.
            spec.devices = [a, Device("offgas-b", sim.port, 2, poll_interval=0.05)]
            spec.write()
            third_sha = sha256(config)
            out = await asyncio.to_thread(
                subprocess.run,
                [*GATEWAY_RELOAD, str(config), "--reason", "CR-1234 remove", "--user", "alice"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
            )
            assert out.returncode == 0, out.stderr
            assert "removed offgas-c" in out.stdout
            await col.wait_for(lambda: col.of("offgas-c", "$stop"), what="offgas-c stopped")
            b_polls = len(col.of("offgas-b", "O2"))
            await col.wait_for(
                lambda: len(col.of("offgas-b", "O2")) >= b_polls + 10, what="polls after reload"
            )
        finally:
            code = kill(proc, signal.SIGTERM)
        assert code == 0, log.read_text()[-3000:]
        await col.wait_for(lambda: col.of(GATEWAY_STREAM, "$stop"), what="the gateway's $stop")

    # Every stream verifies, no seq missing, no record lost, none issued twice.
    report = col.verifier.report()
    assert report.ok, report.summary()
    assert {s.dev for s in report.streams} == {"offgas-a", "offgas-b", "offgas-c", GATEWAY_STREAM}
    for s in report.streams:
        assert s.first_seq == 1 and not s.explained and not s.unexplained, s
        assert unique_seqs(col.records, s.dev) == list(range(1, s.last_seq + 1)), s.dev

    # The unchanged device was never interrupted: one $start, one $stop (the final one).
    assert len(col.of("offgas-a", "$start")) == 1
    assert [r["val"] for r in col.of("offgas-a", "$stop")] == ["acquisition stopped (shutdown)"]
    a_ts = [r["ts"] for r in col.of("offgas-a", "O2")]
    assert max(t1 - t0 for t0, t1 in itertools.pairwise(a_ts)) < 2e9

    # The changed device's chain continues through the reload: $stop, then $start.
    b_stop, _ = col.of("offgas-b", "$stop")
    b_start = col.of("offgas-b", "$start")[1]
    assert b_stop["val"] == "acquisition stopped (config reload)"
    assert b_start["seq"] == b_stop["seq"] + 1
    assert b_start["info"]["previous_seq"] == b_stop["seq"]

    # The audit trail: start with the first config's hash, then the three reloads.
    (start,) = col.of(GATEWAY_STREAM, "$start")
    assert start["info"]["config_sha256"] == first_sha
    assert start["info"]["config_file"] == str(config)
    applied, refused, requested = reloads(col)
    assert applied["q"] == "good"
    assert applied["info"]["changed"] == ["offgas-b"]
    assert applied["info"]["added"] == ["offgas-c"]
    assert applied["info"]["removed"] == []
    assert applied["info"]["unchanged"] == ["offgas-a"]
    assert applied["info"]["previous_sha256"] == first_sha
    assert applied["info"]["sender"]["uid"] == os.getuid()
    assert applied["info"]["sender"]["pid"] == os.getpid()
    assert "request" not in applied["info"]

    assert refused["q"] == "bad"
    assert refused["info"]["config_sha256"] == bad_sha
    assert "devices[1].poll_interval" in refused["info"]["error"]
    assert str(config) in refused["info"]["error"]
    assert refused["info"]["sender"]["uid"] == os.getuid()

    assert requested["q"] == "good"
    assert requested["info"]["removed"] == ["offgas-c"]
    assert requested["info"]["config_sha256"] == third_sha
    assert requested["info"]["request"]["user"] == "alice"
    assert requested["info"]["request"]["reason"] == "CR-1234 remove"
    assert requested["info"]["request"]["file_uid"] == os.getuid()
    assert requested["info"]["sender"]["uid"] == os.getuid()
    assert "alice" in requested["val"]

    text = log.read_text()
    assert "config reload refused" in text and "devices[1].poll_interval" in text
    assert not list((tmp_path / "state").glob("reload-*")), "request/result files left behind"
    assert not (tmp_path / "state" / "gateway.pid").exists()


async def test_reload_of_settings_that_need_a_restart_is_refused(
    sim: OffGasSimulator, broker: Mosquitto, tmp_path: Path
) -> None:
    spec = GatewaySpec(
        tmp_path / "state", broker.port, [Device("offgas", sim.port)], gateway_id="gw-restart"
    )
    config = spec.write()
    async with Collector(broker.port, "plant/gw-restart/#") as col:
        proc = spawn(config, tmp_path / "gw.log")
        try:
            await col.wait_for(lambda: len(col.of("offgas", "O2")) >= 3, what="first polls")
            config.write_text(
                config.read_text().replace("[outbox]", '[outbox]\npolicy = "drop_newest"')
            )
            out = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "gateway", "reload", "-c", str(config), "--user", "bob"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
            )
        finally:
            assert kill(proc, signal.SIGTERM) == 0
        await col.wait_for(lambda: col.of(GATEWAY_STREAM, "$stop"), what="the gateway's $stop")
    assert out.returncode == 1
    assert "outbox.policy" in out.stderr and "restart" in out.stderr
    (refused,) = reloads(col)
    assert refused["q"] == "bad" and refused["info"]["request"]["user"] == "bob"
    assert len(col.of("offgas", "$start")) == 1 and len(col.of("offgas", "$stop")) == 1
    assert col.verifier.report().ok


def test_reload_without_a_running_gateway_says_so(tmp_path: Path) -> None:
    spec = GatewaySpec(tmp_path / "state", 1883, [Device("offgas", 1502)], gateway_id="gw-none")
    config = spec.write()
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "reload", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 1
    assert "gateway.pid" in out.stderr and "no running gateway" in out.stderr


def test_diff_names_devices_and_settings(tmp_path: Path) -> None:
    spec = GatewaySpec(tmp_path / "state", 1883, [Device("a", 1502), Device("b", 1503)])
    old = spec.config()
    spec.devices = [Device("a", 1502), Device("b", 1504), Device("c", 1505)]
    spec.outbox = 'policy = "drop_newest"'
    new = spec.config()
    d = diff_configs(old, new)
    assert (d.added, d.removed, d.changed) == (["c"], [], ["b"])
    assert d.sections == ["outbox.policy"] and d.restart_needed == ["outbox.policy"]
    assert diff_configs(new, new).empty


def test_device_ids_cannot_collide_with_the_gateway_stream(tmp_path: Path) -> None:
    spec = GatewaySpec(tmp_path / "state", 1883, [Device(GATEWAY_STREAM, 1502)])
    with pytest.raises(ConfigError, match=r"devices\[0\]\.id"):
        load_config(spec.write())
