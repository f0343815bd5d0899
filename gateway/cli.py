"""The `gateway` command: run, check, schema, browse, simulate, tail, verify."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import BrokerSection, Config, json_schema, load_config, summary
from gateway.errors import ConfigError, GatewayError
from gateway.record import Record, decode_payload
from gateway.verify import Verifier, record_from_json, record_to_json

# `gateway simulate NAME ...` -> module whose main(argv) runs that simulator.
SIMULATORS = {
    "offgas": "simulators.offgas",  # Modbus TCP off-gas analyser + MFC
    "serial": "simulators.serial_instruments",  # MT-SICS balance / streaming meter (pty)
    "modbus-rtu": "simulators.modbus_rtu",  # Modbus RTU bus with several units (pty)
    "bioreactor": "simulators.bioreactor",  # OPC UA stirred-tank bioreactor
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description=__doc__)
    p.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", "-c", type=Path, required=True)
    run.add_argument("--log-json", action="store_true", default=None, help="force JSON logs")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a config file and print a summary")
    check.add_argument("--config", "-c", type=Path, required=True)
    check.set_defaults(func=_cmd_check)

    schema = sub.add_parser("schema", help="print the config file's JSON Schema")
    schema.set_defaults(func=_cmd_schema)

    br = sub.add_parser("browse", help="list an OPC UA server's variables (or a config block)")
    br.add_argument("endpoint", help="opc.tcp://host:port/path")
    br.add_argument("--start", default="i=85", help="start node (default: Objects)")
    br.add_argument("--depth", type=int, default=10)
    br.add_argument("--toml", action="store_true", help="print a ready-to-paste [[devices]] block")
    br.add_argument("--device-id", default="opcua-1", help="device id in the --toml block")
    br.add_argument("--security-policy", default="None", help="e.g. Basic256Sha256")
    br.add_argument("--security-mode", default=None, help="Sign or SignAndEncrypt")
    br.add_argument("--username")
    br.add_argument("--password-file", type=Path)
    br.add_argument("--server-cert", type=Path, help="trust this server certificate")
    br.add_argument("--server-cert-sha256", help="trust a server certificate by fingerprint")
    br.add_argument(
        "--config", "-c", type=Path, help="reuse the gateway's client certificate (state_dir)"
    )
    br.set_defaults(func=_cmd_browse)

    sim = sub.add_parser("simulate", help="run a device simulator")
    sim.add_argument("device", choices=sorted(SIMULATORS), help="which simulator")
    sim.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="simulator options (e.g. gateway simulate offgas --help)",
    )
    sim.set_defaults(func=_cmd_simulate)

    for name, helptext in (
        ("tail", "print records from the broker as JSON lines"),
        ("verify", "check hashes, chain links and sequence numbers"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", "-c", type=Path, help="take the broker from this config")
        s.add_argument("--host", default=None)
        s.add_argument("--port", type=int, default=None)
        s.add_argument("--topic", default=None, help="default: <prefix>/+/+ (every gateway)")
        s.add_argument("--seconds", type=float, default=None, help="stop after this long")
        if name == "tail":
            s.add_argument("--format", choices=["json", "table"], default="json")
            s.set_defaults(func=_cmd_tail)
        else:
            s.add_argument("--capture", type=Path, help="verify a file of `gateway tail` lines")
            s.set_defaults(func=_cmd_verify)
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.daemon import serve

    cfg = load_config(args.config)
    logs.configure(cfg.gateway.log_level, json=args.log_json)
    return asyncio.run(serve(cfg))


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(summary(cfg))
    return 0


def _cmd_schema(_args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    module = importlib.import_module(SIMULATORS[args.device])
    code: int = module.main(args.args)
    return code


def _cmd_browse(args: argparse.Namespace) -> int:
    from drivers.opcua.browse import browse, render_config
    from drivers.opcua.driver import describe

    cert_dir = None
    if args.config is not None:
        cert_dir = load_config(args.config).gateway.state_dir / "opcua"
    try:
        found = asyncio.run(
            browse(
                args.endpoint,
                start=args.start,
                depth=args.depth,
                security_policy=args.security_policy,
                security_mode=args.security_mode,
                username=args.username,
                password_file=args.password_file,
                client_cert_dir=cert_dir,
                server_cert=args.server_cert,
                server_cert_sha256=args.server_cert_sha256,
            )
        )
    except ConfigError:
        raise
    except Exception as exc:  # asyncua raises many unrelated types; say which, once
        raise GatewayError(f"browse {args.endpoint}: {describe(exc)}") from None
    if args.toml:
        print(
            render_config(
                found,
                endpoint=args.endpoint,
                device_id=args.device_id,
                start=args.start,
                security_policy=args.security_policy,
                security_mode=args.security_mode,
                server_cert_sha256=args.server_cert_sha256,
            ),
            end="",
        )
        return 0
    print(f"{'node id':<70} {'type':<10} {'unit':<10} browse path")
    for v in found:
        print(f"{v.node_id:<70} {v.data_type:<10} {v.unit or v.eu_display:<10} {v.browse_path}")
    print(f"{len(found)} variable(s)", file=sys.stderr)
    return 0


def _broker(args: argparse.Namespace) -> tuple[BrokerSection, str]:
    base = BrokerSection()
    cfg: Config | None = None
    if args.config is not None:
        cfg = load_config(args.config)
        base = cfg.broker
    over: dict[str, Any] = {}
    if args.host is not None:
        over["host"] = args.host
    if args.port is not None:
        over["port"] = args.port
    broker = base.model_copy(update=over)
    topic = args.topic or f"{broker.topic_prefix}/{cfg.gateway.id if cfg else '+'}/+"
    return broker, topic


def _decode(topic: str, payload: bytes) -> list[Record]:
    if topic.endswith("/$status"):
        return []
    try:
        return decode_payload(payload)
    except ValueError as exc:
        print(f"warning: {topic}: {exc}", file=sys.stderr)
        return []


def _cmd_tail(args: argparse.Namespace) -> int:
    from gateway.subscribe import subscribe

    broker, topic = _broker(args)
    table = args.format == "table"
    if table:
        print(
            f"{'time (UTC)':<24} {'device':<14} {'tag':<16} {'value':>16} {'unit':<6} "
            f"{'q':<9} {'seq':>7}",
            flush=True,
        )

    def show(t: str, payload: bytes) -> None:
        for r in _decode(t, payload):
            print(_table_row(r) if table else record_to_json(r), flush=True)

    asyncio.run(subscribe(broker, topic, show, seconds=args.seconds))
    return 0


def _table_row(r: Record) -> str:
    when = datetime.fromtimestamp(r["ts"] / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
    val = r["val"]
    text = f"{val:.4f}" if isinstance(val, float) else str(val)
    if str(r["tag"]).startswith("$"):
        text = str(val)[:60]
        return f"{when:<24} {r['dev']:<14} {r['tag']:<16} {text}  seq {r['seq']}"
    status = f" status={r['status']}" if "status" in r else ""
    return (
        f"{when:<24} {r['dev']:<14} {r['tag']:<16} {text:>16} {r['unit']:<6} "
        f"{r['q']:<9} {r['seq']:>7}{status}"
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    v = Verifier()
    if args.capture is not None:
        try:
            lines = args.capture.read_text().splitlines()
        except OSError as exc:
            raise GatewayError(f"{args.capture}: cannot read: {exc}") from exc
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                v.add(record_from_json(line), f"{args.capture}:{n}")
            except ValueError as exc:
                v.malformed.append(f"{args.capture}:{n}: {exc}")
    else:
        from gateway.subscribe import subscribe

        if args.seconds is None:
            raise GatewayError("verify from a broker needs --seconds (or use --capture FILE)")
        broker, topic = _broker(args)
        asyncio.run(subscribe(broker, topic, lambda t, p: _feed(v, t, p), seconds=args.seconds))
    report = v.report()
    print(report.summary())
    return 0 if report.ok and report.streams else 1


def _feed(v: Verifier, topic: str, payload: bytes) -> None:
    if not topic.endswith("/$status"):
        v.add_payload(payload, topic)


if __name__ == "__main__":
    raise SystemExit(main())
