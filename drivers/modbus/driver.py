"""Modbus driver (pymodbus), TCP or RTU: coalesced reads, decoded per tag.

Every exception response and unanswered request becomes a ``q=bad`` reading
with the reason in ``status`` (the Modbus exception code, or "timeout"); a
value is never re-reported as good after a failed read. After ``fail_after``
unanswered requests in a row the connection is treated as dead and the
supervisor reconnects.

Over TCP each device has its own connection. Over RTU the device is one unit
on a serial bus shared with the other devices naming the same port
(:mod:`drivers.modbus.bus`): ``connect`` takes a reference on the bus and
checks that the unit answers, ``close`` drops the reference, and a failing unit
(``fail_after``) reconnects alone while the bus stays open for the others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.modbus import bus as rtu
from drivers.modbus.config import ModbusDevice
from drivers.modbus.decode import DecodeError, Decoder, make_decoder
from drivers.modbus.plan import ReadRequest, TagAddress, plan_reads
from gateway.driver import PolledDriver, Reading
from gateway.errors import DriverError
from gateway.record import BAD

TIMEOUT = "timeout"
_FUNCTION_CODES = {"holding": 3, "input": 4, "coil": 1, "discrete": 2}
_READ_METHODS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


def _bool(bits: Any) -> bool:
    return bool(bits[0])


class ModbusDriver(PolledDriver[ModbusDevice]):
    """Polls one Modbus unit: over its own TCP connection or on a shared RTU bus."""

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
        # A uint16 in a single register without byte swap is the register
        # itself (pymodbus already made it an int 0..65535): no struct round trip.
        self._direct = [
            t.data_type == "uint16" and t.byte_order in ("ABCD", "CDAB") and t.count == 1
            for t in tags
        ]
        self._client: AsyncModbusTcpClient | None = None
        self._readers: dict[str, Callable[..., Awaitable[Any]]] | None = None
        self._bus: rtu.RtuBus | None = None
        self._unanswered = 0
        self._failing: int | str | None = None  # status of the last failing request
        self.requests = 0

    async def connect(self) -> None:
        c = self.config
        if c.transport == "rtu":
            await self._connect_rtu()
            return
        assert c.host is not None  # the config requires it for tcp
        # pymodbus' own reconnect and retries are off: the supervisor owns
        # reconnection, and a retry would hide a timeout inside a poll.
        client = AsyncModbusTcpClient(
            c.host, port=c.port, timeout=c.timeout, retries=0, reconnect_delay=0
        )
        self._client = client
        # The client's read method of each table, looked up once, not per request.
        self._readers = {t: getattr(client, m) for t, m in _READ_METHODS.items()}
        if not await client.connect():
            raise DriverError(c.id, f"cannot connect to {c.host}:{c.port}")
        self._unanswered = 0

    async def _connect_rtu(self) -> None:
        c = self.config
        assert c.serial_port is not None  # the config requires it for rtu
        settings = rtu.SerialSettings(c.baudrate, c.bytesize, c.parity, c.stopbits)
        try:
            self._bus = await rtu.acquire(c.serial_port, settings, c.id)
        except rtu.BusError as exc:
            raise DriverError(c.id, exc.reason) from exc
        self._unanswered = 0
        # A unit on a bus has no connection of its own: it is online once it
        # answers (an exception response is an answer). Without this probe a
        # dead unit would flap $online/$offline on every reconnect.
        self.requests += 1
        try:
            await self._read(self.plan[0])
        except rtu.BusError as exc:
            raise DriverError(c.id, exc.reason) from exc
        except ConnectionException as exc:
            raise DriverError(c.id, f"connection lost: {exc}") from exc
        except (ModbusIOException, TimeoutError) as exc:
            raise DriverError(
                c.id,
                f"unit {c.unit_id} on {self._bus.label} does not answer (timeout {c.timeout:g} s)",
            ) from exc
        except ModbusException:
            pass  # it answered, with something poll() will report per tag

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._readers = None
        if self._bus is not None:
            rtu.release(self._bus, self.config.id)
            self._bus = None

    async def _read(self, req: ReadRequest) -> Any:
        c = self.config
        if self._bus is None:
            assert self._readers is not None
            read = self._readers[req.table]
            return await read(req.address, count=req.count, device_id=c.unit_id)
        method = _READ_METHODS[req.table]

        def call(client: Any) -> Awaitable[Any]:
            reader: Callable[..., Awaitable[Any]] = getattr(client, method)
            return reader(req.address, count=req.count, device_id=c.unit_id)

        return await self._bus.transact(c.id, call, c.timeout)

    def _check_link(self, *, after_poll: bool) -> None:
        """Raise DriverError when the connection (TCP) or the bus (RTU) is gone."""
        if self._bus is not None:
            if (reason := self._bus.dead) is not None:
                raise DriverError(self.config.id, reason)
            return
        client = self._client
        if client is None or not client.connected:
            what = "connection closed by the device" if after_poll else "connection lost"
            raise DriverError(self.config.id, what)

    async def poll(self) -> list[Reading]:
        self._check_link(after_poll=False)
        out: list[Reading] = []
        for req in self.plan:
            self.requests += 1
            try:
                rr = await self._read(req)
            except rtu.BusError as exc:
                raise DriverError(self.config.id, exc.reason) from exc
            except ConnectionException as exc:
                raise DriverError(self.config.id, f"connection lost: {exc}") from exc
            except (ModbusIOException, TimeoutError):
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
            if self._bus is not None and (mismatch := _mismatch(req, rr)) is not None:
                self._bad(out, req, f"error: {mismatch}")
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
        self._check_link(after_poll=True)
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
        names, counts, decoders, direct = self._names, self._counts, self._decoders, self._direct
        for index, offset in req.members:
            try:
                if direct[index]:
                    out.append(Reading(names[index], values[offset]))
                    continue
                val = decoders[index](values[offset : offset + counts[index]])
            except (DecodeError, IndexError, ValueError) as exc:
                out.append(Reading(names[index], None, BAD, f"decode error: {exc}"))
                continue
            out.append(Reading(names[index], val))

    def _bad(self, out: list[Reading], req: ReadRequest, status: int | str) -> None:
        names = self._names
        out.extend(Reading(names[i], None, BAD, status) for i, _ in req.members)


def _mismatch(req: ReadRequest, rr: Any) -> str | None:
    """Why an RTU answer cannot be the answer to ``req`` (None when it can).

    RTU frames carry no transaction id: a unit answering after its timeout
    could have its late answer taken for the next request's. Function code and
    size catch most such mix-ups; a late answer to an identical request is
    indistinguishable (and then carries the same registers).
    """
    expected = _FUNCTION_CODES[req.table]
    code = getattr(rr, "function_code", None)
    if code != expected:
        return f"answer with function code {code} to a request with {expected}"
    if req.table in ("coil", "discrete"):
        n = len(rr.bits)
        if not req.count <= n < req.count + 8:  # bits come padded to whole bytes
            return f"answer holds {n} bits for {req.count} requested"
    elif (n := len(rr.registers)) != req.count:
        return f"answer holds {n} registers for {req.count} requested"
    return None
