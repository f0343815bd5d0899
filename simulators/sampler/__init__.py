"""At-line sampler / cell analyser simulator: a SiLA 2 server (``gateway simulate sampler``).

Prints ``sampler simulator listening on HOST:PORT`` (and the CA file with TLS)
once it serves, then reads commands on stdin: ``stall`` / ``stall off``,
``error defined|undefined|off``, ``restart [downtime_s]``, ``sample``,
``values``, ``help``. SIGTERM/SIGINT stop it within about a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from simulators import console

_HELP = (
    "commands: stall | stall off | error defined|undefined|off | restart [downtime_s] | "
    "sample | values | help"
)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gateway simulate sampler",
        description="SiLA 2 at-line sampler / cell analyser simulator. " + _HELP + " (on stdin)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50052, help="0 picks a free port")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain-text gRPC (no TLS)")
    tls.add_argument(
        "--cert-dir",
        type=Path,
        default=Path("sampler-certs"),
        help="CA and server certificate (generated once, reused); clients trust ca.crt",
    )
    p.add_argument("--discovery", action="store_true", help="announce via mDNS (off by default)")
    p.add_argument(
        "--time-scale", type=float, default=60.0, help="simulated seconds per wall second"
    )
    p.add_argument("--sample-interval", type=float, default=10.0, help="wall seconds")
    p.add_argument("--analysis-time", type=float, default=1.0, help="wall seconds per sample")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--uuid", default=None, help="server UUID (default: random)")
    p.add_argument("--name", default="At-line sampler", help="SiLA server name")
    p.add_argument(
        "--bioreactor",
        metavar="URL",
        help="draw samples from a running bioreactor simulator (opc.tcp://host:port/bioreactor)",
    )
    return p.parse_args(argv)


async def _handle(sim: object, line: str) -> None:
    from simulators.sampler.server import ErrorMode, SampleFailed, SamplerSimulator

    assert isinstance(sim, SamplerSimulator)
    words = line.split()
    if not words:
        return
    try:
        if words == ["values"]:
            print(json.dumps(sim.values()), flush=True)
        elif words == ["stall"]:
            sim.stall(True)
            print("ok: stall", flush=True)
        elif words == ["stall", "off"]:
            sim.stall(False)
            print("ok: stall off", flush=True)
        elif words[0] == "error" and len(words) == 2:
            mode = None if words[1] == "off" else words[1]
            sim.set_error(cast(ErrorMode | None, mode))
            print(f"ok: {line.strip()}", flush=True)
        elif words[0] == "restart" and len(words) <= 2:
            await asyncio.to_thread(sim.restart, float(words[1]) if len(words) == 2 else 1.0)
            print(f"ok: {line.strip()}", flush=True)
        elif words == ["sample"]:
            n = await asyncio.to_thread(sim.take_sample)
            print(f"ok: sample {n}" if n is not None else "error: sampler busy", flush=True)
        else:
            print(_HELP, flush=True)
    except (ValueError, SampleFailed) as exc:
        print(f"error: {exc}; {_HELP}", flush=True)


async def _serve(args: argparse.Namespace) -> int:
    from uuid import UUID

    from simulators.sampler.server import SamplerSimulator

    sim = SamplerSimulator(
        host=args.host,
        port=args.port,
        insecure=args.insecure,
        cert_dir=None if args.insecure else args.cert_dir,
        discovery=args.discovery,
        time_scale=args.time_scale,
        sample_interval=args.sample_interval,
        analysis_time=args.analysis_time,
        seed=args.seed,
        server_uuid=UUID(args.uuid) if args.uuid else None,
        name=args.name,
        bioreactor=args.bioreactor,
    )
    try:
        await asyncio.to_thread(sim.start)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"sampler simulator: cannot listen on {sim.address}: {exc}", file=sys.stderr)
        return 1
    print(f"sampler simulator listening on {sim.address}", flush=True)
    if sim.certificates is not None:
        print(f"CA certificate: {sim.certificates.ca}", flush=True)
    else:
        print("insecure: plain-text gRPC", flush=True)
    print(f"server uuid: {sim.server_uuid}", flush=True)

    async def stop() -> None:
        await asyncio.to_thread(sim.stop)

    return await console.run_until_signal(lambda line: _handle(sim, line), stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the process exit code."""
    return console.run(_serve(_parse_args(argv)))
