"""The Modbus server of workloads M, D and the outage: one pymodbus TCP server process.

``--registers N`` holding registers (unit id 1) holding ``i & 0xFFFF`` at
address ``i``. The gateway's devices and the Node-RED peer read blocks of it
over their own connections. Prints ``port <n>`` once listening; runs until
SIGTERM. The harness measures this process's CPU to show whether the server,
rather than the client under test, is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import cast

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


async def serve(port: int, registers: int) -> None:
    values = [i & 0xFFFF for i in range(registers)]
    device = SimDevice(id=1, simdata=[SimData(0, values=values, datatype=DataType.REGISTERS)])
    server = ModbusTcpServer([device], address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    listener = cast(asyncio.Server, server.transport)
    print(f"port {listener.sockets[0].getsockname()[1]}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.shutdown()  # type: ignore[no-untyped-call]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--registers", type=int, default=10_000)
    a = ap.parse_args()
    # A request pymodbus cannot serve is logged per request: keep the log readable.
    logging.disable(logging.WARNING)
    asyncio.run(serve(a.port, a.registers))


if __name__ == "__main__":
    main()
