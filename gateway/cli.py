"""The `gateway` command: run and reload the gateway, check its config, read its records."""

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

from pydantic import ValidationError

from gateway import __version__
from gateway.config import BrokerSection, Config, json_schema, load_config, summary
from gateway.errors import ConfigError, GatewayError
from gateway.record import Record
from gateway.verify import Verifier, record_from_json, record_to_json

# `gateway simulate NAME ...` -> module whose main(argv) runs that simulator.
SIMULATORS = {
    "offgas": "simulators.offgas",  # Modbus TCP off-gas analyser + MFC
    "serial": "simulators.serial_instruments",  # MT-SICS balance / streaming meter (pty)
    "modbus-rtu": "simulators.modbus_rtu",  # Modbus RTU bus with several units (pty)
    "bioreactor": "simulators.bioreactor",  # OPC UA stirred-tank bioreactor
    "sampler": "simulators.sampler",  # SiLA 2 at-line sampler / cell analyser
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
    run.add_argument("--config", "-c", type=Path, required=True, help="the config file")
    run.add_argument("--log-json", action="store_true", default=None, help="force JSON logs")
    run.set_defaults(func=_cmd_run)

    rl = sub.add_parser(
        "reload",
        help="make the running gateway re-read its config (recorded in the audit trail)",
    )
    rl.add_argument("--config", "-c", type=Path, required=True, help="the running config file")
    rl.add_argument("--reason", help="why (recorded in the $reload audit event)")
    rl.add_argument("--user", help="who asks (default: $SUDO_USER or the login name)")
    rl.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer")
    rl.set_defaults(func=_cmd_reload)

    check = sub.add_parser("check", help="validate a config file and print a summary")
    check.add_argument("--config", "-c", type=Path, required=True, help="the config file")
    check.set_defaults(func=_cmd_check)

    st = sub.add_parser(
        "status", help="ask a running gateway how it is (exit 0 ready, 1 not ready, 3 unreachable)"
    )
    where = st.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", type=Path, help="find the endpoint in [health]")
    where.add_argument("--url", help="the health endpoint (default http://127.0.0.1:9108)")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    st.set_defaults(func=_cmd_status)

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

    dc = sub.add_parser("discover", help="list servers found by mDNS (sila: SiLA 2 servers)")
    dc.add_argument("protocol", choices=["sila"], help="which discovery")
    dc.add_argument("--timeout", type=float, default=5.0, help="seconds to listen")
    dc.add_argument("--insecure", action="store_true", help="list features over plain text")
    dc.add_argument("--ca", type=Path, help="CA to trust when listing features (TLS)")
    dc.add_argument("--json", action="store_true", help="print JSON")
    dc.set_defaults(func=_cmd_discover)

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
        _subscriber_options(s)
        if name == "tail":
            s.add_argument(
                "--format",
                choices=["json", "table"],
                default="json",
                help="json: JSON lines, what verify --capture reads (default); table: to read",
            )
            s.set_defaults(func=_cmd_tail)
        else:
            src = s.add_mutually_exclusive_group()
            src.add_argument("--capture", type=Path, help="verify a file of `gateway tail` lines")
            src.add_argument("--archive", type=Path, help="verify a `gateway archive` file")
            s.set_defaults(func=_cmd_verify)

    kg = sub.add_parser("keygen", help="create the Ed25519 key pair that signs checkpoints")
    kg_where = kg.add_mutually_exclusive_group()
    kg_where.add_argument("--config", "-c", type=Path, help="key file and name from this config")
    kg_where.add_argument(
        "--out", type=Path, metavar="DIR", help="write checkpoint.key/.pub into this directory"
    )
    kg.add_argument("--name", help="key name (default: the gateway id)")
    kg.add_argument("--force", action="store_true", help="replace an existing key")
    kg.add_argument(
        "--export-public",
        type=Path,
        metavar="FILE",
        help="write the public key of the existing private key to FILE (no new key)",
    )
    kg.set_defaults(func=_cmd_keygen)

    ar = sub.add_parser(
        "archive",
        help="subscribe, verify and store records in SQLite; `archive export` to CSV",
        epilog="gateway archive -c CONFIG --db DB: archive until SIGTERM/Ctrl-C (or --seconds). "
        "gateway archive export --db DB --csv FILE: write the archive as CSV.",
    )
    ar.add_argument("action", nargs="?", choices=["export"], help="export: write --db as CSV")
    ar.add_argument("--db", type=Path, required=True, help="the archive's SQLite file")
    ar.add_argument("--csv", type=Path, help="export: the CSV file to write ('-': stdout)")
    _subscriber_options(ar)
    ar.add_argument("--client-id", help="MQTT client id (default: derived from --db)")
    ar.set_defaults(func=_cmd_archive)
    return p


def _subscriber_options(s: argparse.ArgumentParser) -> None:
    """Where tail, verify and archive subscribe, and the keys they check signatures with."""
    s.add_argument("--config", "-c", type=Path, help="take the broker from this config")
    s.add_argument("--host", default=None, help="broker host (overrides --config)")
    s.add_argument("--port", type=int, default=None, help="broker port (overrides --config)")
    s.add_argument("--topic", default=None, help="default: <prefix>/+/+ (every gateway)")
    s.add_argument("--seconds", type=float, default=None, help="stop after this long")
    s.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="check checkpoint signatures with this key (repeat for several keys)",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.daemon import serve
    from gateway.reload import block_sighup

    # Before any thread exists, so that every thread inherits the mask and
    # only the daemon's SIGHUP thread takes the signal (with its sender).
    block_sighup()
    cfg = load_config(args.config)
    logs.configure(cfg.gateway.log_level, json=args.log_json)
    return asyncio.run(serve(cfg))


def _cmd_reload(args: argparse.Namespace) -> int:
    import getpass
    import os

    from gateway.reload import request_reload

    # Validated here first so the person sees the error at once; the daemon
    # validates again (the file may change in between) and records the outcome.
    cfg = load_config(args.config)
    user = args.user or os.environ.get("SUDO_USER") or getpass.getuser()
    ok, message = request_reload(
        cfg.gateway.state_dir, reason=args.reason, user=user, timeout=args.timeout
    )
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(summary(cfg))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from gateway.status import DEFAULT_URL, status, url_from_config

    url = args.url or (url_from_config(args.config) if args.config else DEFAULT_URL)
    code, text = status(url, args.timeout)
    print(text, file=sys.stdout if code != 3 else sys.stderr)
    return code


def _cmd_schema(_args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    module = importlib.import_module(SIMULATORS[args.device])
    code: int = module.main(args.args)
    return code


def _cmd_discover(args: argparse.Namespace) -> int:
    from drivers.sila2.discover import as_dicts, discover_command, render

    servers = discover_command(args.timeout, insecure=args.insecure, ca=args.ca)
    print(json.dumps(as_dicts(servers), indent=2) if args.json else render(servers), end="")
    print(f"{len(servers)} SiLA server(s)", file=sys.stderr)
    return 0


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
    # Validated again: a --host that is not loopback gets TLS by default.
    try:
        broker = BrokerSection.model_validate(
            {**{k: getattr(base, k) for k in base.model_fields_set}, **over}
        )
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"--host/--port: {problems}") from None
    topic = args.topic or f"{broker.topic_prefix}/{cfg.gateway.id if cfg else '+'}/+"
    return broker, topic


def _cmd_tail(args: argparse.Namespace) -> int:
    from gateway.consumer import Consumer
    from gateway.subscribe import subscribe

    broker, topic = _broker(args)
    consumer = Consumer(_keys(args))
    table = args.format == "table"
    if table:
        print(
            f"{'time (UTC)':<24} {'device':<14} {'tag':<16} {'value':>16} {'unit':<6} "
            f"{'q':<9} {'seq':>7}",
            flush=True,
        )

    def show(records: list[Record]) -> None:
        for r in records:
            print(_table_row(r) if table else record_to_json(r), flush=True)

    asyncio.run(
        subscribe(broker, topic, lambda t, p: show(consumer.feed(t, p)), seconds=args.seconds)
    )
    show(consumer.flush())
    report = consumer.report()
    if not report.ok:
        print(report.summary(), file=sys.stderr)
    return 0


def _keys(args: argparse.Namespace) -> list[Any]:
    from gateway.signing import load_public

    return load_public(args.public_key) if args.public_key else []


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
    v = Verifier(_keys(args))
    if args.capture is not None:
        try:
            lines = args.capture.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{args.capture}: cannot read: {exc.strerror or exc}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                v.add(record_from_json(line), f"{args.capture}:{n}")
            except ValueError as exc:
                v.malformed.append(f"{args.capture}:{n}: {exc}")
    elif args.archive is not None:
        from gateway.archive import read_records

        _need_archive(args.archive)
        for r in read_records(args.archive):
            v.add(r, f"{args.archive}")
    else:
        from gateway.subscribe import subscribe

        if args.seconds is None:
            raise ConfigError("verify from a broker needs --seconds (or --capture/--archive)")
        broker, topic = _broker(args)

        def feed(t: str, payload: bytes) -> None:
            v.consumer.feed(t, payload)  # held until report(): nothing is released before

        asyncio.run(subscribe(broker, topic, feed, seconds=args.seconds))
    report = v.report()
    print(report.summary())
    return 0 if report.ok and report.streams else 1


def _need_archive(db: Path) -> None:
    if not db.is_file():
        raise ConfigError(f"{db}: no such archive (`gateway archive --db {db}` writes one)")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from gateway.signing import SignerKey, load_private, write_private, write_public

    if args.config is not None:
        cfg = load_config(args.config)
        key_path, name = cfg.key_path, args.name or cfg.gateway.id
    elif args.out is not None:
        if not args.name and args.export_public is None:
            raise ConfigError("keygen --out DIR needs --name (the gateway id)")
        key_path, name = args.out / "checkpoint.key", args.name
    else:
        raise ConfigError("keygen needs --config CONFIG or --out DIR")
    pub_path = key_path.with_suffix(".pub")
    if args.export_public is not None:
        key = load_private(key_path, "checkpoints.key_file" if args.config else "--out").verifier
        write_public(args.export_public, key)
        print(
            f"public key {key.vkey}\nfingerprint {key.fingerprint}\nwritten to {args.export_public}"
        )
        return 0
    signer = SignerKey.generate(name)
    write_private(key_path, signer, force=args.force)
    write_public(pub_path, signer.verifier)
    print(
        f"private key {key_path} (mode 0600: keep it secret, back it up)\n"
        f"public key  {pub_path}\n"
        f"            {signer.verifier.vkey}\n"
        f"fingerprint {signer.verifier.fingerprint}\n"
        "Give the public key file to whoever verifies (gateway verify --public-key FILE) and "
        "set [checkpoints] enabled = true."
    )
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    import signal

    from gateway.archive import export_csv, run_archive

    if args.action == "export":
        if args.csv is None:
            raise ConfigError("archive export needs --csv FILE (or --csv - for stdout)")
        _need_archive(args.db)  # before the CSV file is created
        if str(args.csv) == "-":
            n = export_csv(args.db, sys.stdout)
        else:
            with args.csv.open("w", newline="", encoding="utf-8") as f:
                n = export_csv(args.db, f)
        print(f"{n} records exported from {args.db}", file=sys.stderr)
        return 0
    if args.csv is not None:
        raise ConfigError("--csv goes with `gateway archive export` (nothing was archived)")
    broker, topic = _broker(args)
    keys = _keys(args)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        report, archive = await run_archive(
            broker, topic, args.db, keys, seconds=args.seconds, stop=stop, client_id=args.client_id
        )
        print(report.summary())
        print(f"{archive.stored} records stored in {args.db}")
        for gw, dev, seq in archive.conflicts:
            print(f"CONFLICT {gw}/{dev} seq {seq}: differs from the archived record")
        return 0 if report.ok and not archive.conflicts else 1

    return asyncio.run(main())


if __name__ == "__main__":
    raise SystemExit(main())
