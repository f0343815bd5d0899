"""Third-party drivers through the ``gateway.drivers`` entry-point group.

Each test installs a tiny distribution in ``tmp_path`` the way pip would leave
it: a package ``thirdparty_drv`` and a ``*.dist-info`` folder with METADATA and
entry_points.txt. With ``tmp_path`` on ``sys.path`` (or PYTHONPATH for a child
process) importlib.metadata finds it, as it would in site-packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from gateway import registry
from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.support.broker import Mosquitto
from tests.support.collector import Collector
from tests.support.gateway import running

REPO = Path(__file__).resolve().parent.parent
MODULES = ("thirdparty_drv", "thirdparty_broken")

PLUGIN = '''
"""A third-party driver: every tag reads a constant."""

from typing import Literal

from pydantic import Field

from gateway.config import DeviceConfig
from gateway.driver import PolledDriver, Reading


class ConstantDevice(DeviceConfig):
    driver: Literal["constant"]
    value: float = Field(42.0, description="What every tag reads")


class ConstantDriver(PolledDriver[ConstantDevice]):
    config_model = ConstantDevice

    async def connect(self) -> None:
        pass

    async def poll(self) -> list[Reading]:
        return [Reading(t.name, self.config.value) for t in self.config.tags]

    async def close(self) -> None:
        pass


class NotADriver:
    config_model = ConstantDevice


def make_driver():
    return ConstantDriver


class Drivers:
    Constant = ConstantDriver
'''

BROKEN = """
raise RuntimeError("thirdparty_broken needs a licence server")
"""


def install(root: Path, eps: dict[str, str], dist: str = "thirdparty_drv") -> Path:
    """Lay out the package and a dist-info declaring ``eps`` in gateway.drivers."""
    pkg = root / "thirdparty_drv"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(PLUGIN)
    (root / "thirdparty_broken.py").write_text(BROKEN)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in eps.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")
    return root


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty driver cache per test; the plugin modules are forgotten afterwards."""
    monkeypatch.setattr(registry, "_loaded", {})
    for m in MODULES:
        monkeypatch.delitem(sys.modules, m, raising=False)
    yield
    for m in MODULES:
        sys.modules.pop(m, None)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The good plugin, installed and on sys.path."""
    root = install(tmp_path / "site", {"constant": "thirdparty_drv:ConstantDriver"})
    monkeypatch.syspath_prepend(str(root))
    return root


def install_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eps: dict[str, str]) -> Path:
    root = install(tmp_path / "site", eps)
    monkeypatch.syspath_prepend(str(root))
    return root


def config_text(
    driver: str = "constant", state_dir: Path = Path("/tmp/unused"), **extra: Any
) -> str:
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    return (
        f'[gateway]\nid = "gw-plugin"\nstate_dir = "{state_dir}"\n\n'
        f'[[devices]]\nid = "tank-1"\ndriver = "{driver}"\npoll_interval = 0.05\n{keys}'
        '[[devices.tags]]\nname = "level"\nunit = "%"\n'
    )


def gateway_cli(*args: str, pythonpath: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


# -- discovery and loading ----------------------------------------------------------------


def test_known_names_include_the_entry_point(plugin: Path) -> None:
    assert [ep.name for ep in entry_points(group=registry.ENTRY_POINT_GROUP)] == ["constant"]
    assert registry.known_names() == sorted({"constant", *registry.BUILTIN})


def test_known_names_without_the_plugin_are_the_builtins() -> None:
    assert "constant" not in registry.known_names()
    assert "modbus" in registry.known_names()


def test_a_config_using_the_third_party_driver_loads(plugin: Path) -> None:
    cfg = parse_config(config_text(value=7.5), Path("plant.toml"), {})
    dev = cfg.devices[0]
    cls = registry.driver_class("constant")
    assert type(dev) is cls.config_model
    assert type(dev).__module__ == "thirdparty_drv" and type(dev).__name__ == "ConstantDevice"
    assert (dev.driver, dev.value, dev.tags[0].name) == ("constant", 7.5, "level")
    assert cls.__module__ == "thirdparty_drv" and cls.__name__ == "ConstantDriver"
    assert registry._loaded["constant"] is cls

    # The plugin's own model validates its keys, with the usual field paths.
    with pytest.raises(ConfigError) as err:
        parse_config(config_text(value="lots", colour="red"), Path("plant.toml"), {})
    assert "devices[0].value" in str(err.value)
    assert "devices[0].colour: unknown key" in str(err.value)


async def test_the_third_party_driver_acquires_and_its_records_verify(
    plugin: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    text = config_text(value=7.5, state_dir=tmp_path / "state").replace(
        "[[devices]]", f"[broker]\nport = {broker.port}\nreconnect_min = 0.1\n\n[[devices]]"
    )
    cfg = parse_config(text, tmp_path / "plant.toml", {})
    async with Collector(broker.port, "plant/gw-plugin/#") as col:
        async with running(cfg):
            await col.wait_for(lambda: len(col.of("tank-1", "level")) >= 5, what="5 polls")
        await col.wait_for(lambda: col.of("tank-1", "$stop"), what="the stop event")
    levels = col.of("tank-1", "level")
    assert all(r["val"] == 7.5 and r["unit"] == "%" and r["q"] == "good" for r in levels)
    report = col.verifier.report()
    assert report.ok and report.streams[0].first_seq == 1, report.summary()


def test_gateway_schema_and_check_include_the_driver_on_pythonpath(tmp_path: Path) -> None:
    root = install(tmp_path / "site", {"constant": "thirdparty_drv:ConstantDriver"})

    def device_models(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Driver name -> the device model's schema (its `driver` is a single Literal)."""
        out = {}
        for model in schema.get("$defs", {}).values():
            drv = model.get("properties", {}).get("driver", {})
            for name in [drv["const"]] if "const" in drv else drv.get("enum", []):
                out[name] = model
        return out

    out = gateway_cli("schema", pythonpath=root)
    assert out.returncode == 0, out.stderr
    models = device_models(json.loads(out.stdout))
    assert {"constant", "modbus"} <= set(models)
    assert models["constant"]["properties"]["value"]["description"] == "What every tag reads"

    plain = gateway_cli("schema", pythonpath=None)
    assert plain.returncode == 0, plain.stderr
    assert "constant" not in device_models(json.loads(plain.stdout))

    config = tmp_path / "plant.toml"
    config.write_text(config_text(state_dir=tmp_path / "state"))
    check = gateway_cli("check", "--config", str(config), pythonpath=root)
    assert check.returncode == 0, check.stderr
    assert "tank-1: driver constant, 1 tag(s)" in check.stdout
    unknown = gateway_cli("check", "--config", str(config), pythonpath=None)
    assert unknown.returncode == 2 and "unknown driver 'constant'" in unknown.stderr


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("thirdparty_missing:GhostDriver", "No module named 'thirdparty_missing'"),
        ("thirdparty_drv:ConstantDrvier", "ConstantDrvier"),
    ],
    ids=["missing-module", "missing-attribute"],
)
def test_an_entry_point_that_cannot_be_imported_is_a_config_error_naming_driver_and_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, why: str
) -> None:
    install_on_path(tmp_path, monkeypatch, {"ghost": target})
    assert "ghost" in registry.known_names()
    with pytest.raises(ConfigError) as err:
        registry.driver_class("ghost")
    msg = str(err.value)
    assert "driver 'ghost'" in msg and target in msg and "cannot be loaded" in msg
    assert why in msg
    assert "ghost" not in registry._loaded

    with pytest.raises(ConfigError) as err:
        parse_config(config_text("ghost"), Path("plant.toml"), {})
    assert "devices[0].driver" in str(err.value) and target in str(err.value)


@pytest.mark.parametrize(
    "target",
    ["thirdparty_drv:NotADriver", "thirdparty_drv:make_driver", "thirdparty_drv:ConstantDevice"],
    ids=["plain-class", "function", "config-model"],
)
def test_an_entry_point_to_something_that_is_not_a_driver_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    install_on_path(tmp_path, monkeypatch, {"bogus": target})
    with pytest.raises(ConfigError) as err:
        registry.driver_class("bogus")
    msg = str(err.value)
    assert f"driver 'bogus' ({target}) is not a gateway.driver.Driver subclass" in msg
    assert "bogus" not in registry._loaded
    with pytest.raises(ConfigError, match=r"devices\[0\]\.driver"):
        parse_config(config_text("bogus"), Path("plant.toml"), {})


def test_an_unknown_driver_name_lists_the_known_ones(plugin: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config_text("constnat"), Path("plant.toml"), {})
    msg = str(err.value)
    assert msg.startswith("plant.toml: invalid configuration:")
    assert "devices[0].driver: unknown driver 'constnat'; known drivers: constant, modbus" in msg
    with pytest.raises(ConfigError, match="known drivers: constant, modbus"):
        registry.driver_class("constnat")


def test_a_broken_plugin_makes_gateway_schema_fail_clearly(tmp_path: Path) -> None:
    """`gateway schema` covers every known driver, so it names the one that cannot load."""
    root = install(
        tmp_path / "site",
        {"constant": "thirdparty_drv:ConstantDriver", "ghost": "thirdparty_missing:Ghost"},
    )
    out = gateway_cli("schema", pythonpath=root)
    assert out.returncode == 2
    assert "driver 'ghost' (thirdparty_missing:Ghost) cannot be loaded" in out.stderr
    assert "Traceback" not in out.stderr


# -- loading edge cases ------------------------------------------------------------------


def test_an_entry_point_with_a_dotted_attribute_path_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_on_path(tmp_path, monkeypatch, {"constant": "thirdparty_drv:Drivers.Constant"})
    (ep,) = entry_points(group=registry.ENTRY_POINT_GROUP, name="constant")
    loaded = ep.load()  # the standard loader accepts it
    assert registry.driver_class("constant") is loaded


def test_a_plugin_that_fails_on_import_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_on_path(tmp_path, monkeypatch, {"licensed": "thirdparty_broken:Driver"})
    with pytest.raises(ConfigError) as err:
        parse_config(config_text("licensed"), Path("plant.toml"), {})
    assert "driver 'licensed' (thirdparty_broken:Driver)" in str(err.value)
