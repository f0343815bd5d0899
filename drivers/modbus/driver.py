"""Modbus TCP driver (pymodbus): coalesced reads, decoded per tag.

Every exception response and unanswered request becomes a ``q=bad`` reading
with the reason in ``status`` (the Modbus exception code, or "timeout"); a
value is never re-reported as good after a failed read. After ``fail_after``
unanswered requests in a row the connection is treated as dead and the
supervisor reconnects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.modbus.config import ModbusDevice
from drivers.modbus.decode import DecodeError, Decoder, make_decoder
from drivers.modbus.plan import ReadRequest, TagAddress, plan_reads
from gateway.driver import PolledDriver, Reading
from gateway.errors import DriverError
from gateway.record import BAD

TIMEOUT = "timeout"


def _bool(bits: Any) -> bool:
    return bool(bits[0])


class ModbusDriver(PolledDriver[ModbusDevice]):
    """Polls one Modbus TCP unit."""

    config_model = ModbusDevice

    def __init__(self, config: ModbusDevice) -> None:
        super().__init__(config)
        tags = config.tags
        self.plan: list[ReadRequest] = plan_reads(
            [TagAddress(t.table, t.address, t.count) for t in tags],
            max_registers=config.max_registers,
            max_gap=config.max_gap,
        )
        self._names = [t.name for t in tags]
        self._counts = [t.count for t in tags]
        self._decoders: list[Decoder] = [
            _bool
            if t.data_type == "bool"
            else make_decoder(t.data_type, t.byte_order, bit=t.bit, encoding=t.encoding)
            for t in tags
        ]
        self._client: AsyncModbusTcpClient | None = None
        self._unanswered = 0
        self._failing: int | str | None = None  # status of the last failing request
        self.requests = 0

    async def connect(self) -> None:
        c = self.config
        # pymodbus' own reconnect and retries are off: the supervisor owns
        # reconnection, and a retry would hide a timeout inside a poll.
        client = AsyncModbusTcpClient(
            c.host, port=c.port, timeout=c.timeout, retries=0, reconnect_delay=0
        )
        self._client = client
        if not await client.connect():
            raise DriverError(c.id, f"cannot connect to {c.host}:{c.port}")
        self._unanswered = 0

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _reader(self, req: ReadRequest) -> Callable[..., Awaitable[Any]]:
        assert self._client is not None
        client = self._client
        return {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }[req.table]

    async def poll(self) -> list[Reading]:
        client = self._client
        if client is None or not client.connected:
            raise DriverError(self.config.id, "connection lost")
        out: list[Reading] = []
        for req in self.plan:
            self.requests += 1
            try:
                rr = await self._reader(req)(
                    req.address, count=req.count, device_id=self.config.unit_id
                )
            except ConnectionException as exc:
                raise DriverError(self.config.id, f"connection lost: {exc}") from exc
            except ModbusIOException:
                self._unanswered += 1
                self._bad(out, req, TIMEOUT)
                continue
            except ModbusException as exc:
                self._bad(out, req, f"error: {exc}")
                continue
            self._unanswered = 0
            if rr.isError():
                self._bad(out, req, int(rr.exception_code))
                continue
            values = rr.bits if req.table in ("coil", "discrete") else rr.registers
            self._decode(out, req, values)
        self._log_transition(out)
        if self._unanswered >= self.config.fail_after:
            raise DriverError(
                self.config.id,
                f"no answer to {self._unanswered} requests in a row "
                f"(timeout {self.config.timeout:g} s each)",
            )
        if not client.connected:
            raise DriverError(self.config.id, "connection closed by the device")
        return out

    def _log_transition(self, out: list[Reading]) -> None:
        # One line when requests start failing and one when they recover, not
        # one per poll: the records carry the per-poll detail.
        failing = next((r.status for r in out if r.q == BAD), None)
        if failing is not None and self._failing is None:
            bad = sum(1 for r in out if r.q == BAD)
            self.log.warning("modbus reads failing", status=failing, bad_tags=bad)
        elif failing is None and self._failing is not None:
            self.log.info("modbus reads recovered")
        self._failing = failing

    def _decode(self, out: list[Reading], req: ReadRequest, values: Any) -> None:
        names, counts, decoders = self._names, self._counts, self._decoders
        for index, offset in req.members:
            try:
                val = decoders[index](values[offset : offset + counts[index]])
            except (DecodeError, IndexError, ValueError) as exc:
                out.append(Reading(names[index], None, BAD, f"decode error: {exc}"))
                continue
            out.append(Reading(names[index], val))

    def _bad(self, out: list[Reading], req: ReadRequest, status: int | str) -> None:
        names = self._names
        out.extend(Reading(names[i], None, BAD, status) for i, _ in req.members)
