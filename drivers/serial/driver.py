"""Serial driver: request/response or streaming line protocols described by a profile.

Request mode polls: every ``poll_interval`` it sends the commands the tags
need, one at a time, and takes the first line that comes back (within
``timeout``) as the reply. Stream mode listens: every line the instrument sends
is one acquisition cycle.

Whatever a line holds, it never becomes a wrong value: a line that does not
match, fails its checksum, is cut short, runs past ``max_line`` or reports an
unexpected unit becomes ``q="bad"`` readings whose ``status`` names the
problem, is counted in ``counters`` and logged (at most once per 10 s per
kind). The port vanishing or failing raises ``DriverError``: the supervisor
records the device offline and reopens the port with backoff, so acquisition
resumes when the path (e.g. /dev/serial/by-id/...) comes back. So does
``fail_after`` requests in a row without an answer (or, streaming,
``fail_after`` silent timeouts).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from drivers.serial.config import SerialDevice, TagPlan
from drivers.serial.parse import (
    ConversionError,
    LineFramer,
    LineParser,
    Overflow,
    Parsed,
    convert,
    preview,
    to_ucum,
)
from drivers.serial.port import SerialPort, SerialPortError
from gateway.driver import Emit, PolledDriver, Reading
from gateway.errors import DriverError
from gateway.record import BAD

TIMEOUT = "timeout"
LOG_INTERVAL = 10.0  # seconds between two log lines about the same kind of problem


@dataclass(frozen=True, slots=True)
class _Request:
    """A command of request mode and the tags its reply feeds."""

    name: str
    data: bytes  # encoded, terminator included
    timeout: float
    tags: list[TagPlan]


class _Throttle:
    """Rate-limits warnings per kind: the first at once, then one per interval with a count."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, kind: str) -> int | None:
        """None to stay silent, else how many were suppressed since the last line."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] += 1
            return None
        self._last[kind] = now
        return self._suppressed.pop(kind, 0)


class SerialDriver(PolledDriver[SerialDevice]):
    """One instrument on one serial port, in request or stream mode."""

    config_model = SerialDevice

    def __init__(self, config: SerialDevice) -> None:
        super().__init__(config)
        prof = config.resolved_profile
        self.mode = config.effective_mode
        self.timeout = config.effective_timeout
        self._enc = config.effective_encoding
        self._term = config.effective_terminator.encode(self._enc)
        self._parser = LineParser(
            prof, encoding=self._enc, require_checksum=config.require_checksum
        )
        self._decimal = prof.decimal
        self._plans = config.tag_plans
        # Request mode: the commands the tags need, in profile order, with their tags.
        self._commands: list[_Request] = []
        for cmd in prof.commands:
            tags = [p for p in self._plans if p.command == cmd.name]
            if tags:
                data = cmd.send.encode(self._enc) + self._term
                timeout = cmd.timeout if cmd.timeout is not None else self.timeout
                self._commands.append(_Request(cmd.name, data, timeout, tags))
        self._port: SerialPort | None = None
        self._unanswered = 0
        self._dropped_seen = 0
        self._throttle = _Throttle()
        #: Problems and traffic since this instance connected (a fresh instance per
        #: connection): lines, replies, timeout, parse_error, checksum_mismatch,
        #: checksum_missing, line_too_long, error_reply, unit_mismatch, ignored,
        #: stale (input discarded before a command), dropped (lines the driver
        #: fell behind on).
        self.counters: Counter[str] = Counter()

    # --- connection -------------------------------------------------------------------

    async def connect(self) -> None:
        c = self.config
        port = SerialPort(c.port_settings(), LineFramer(self._term, c.max_line))
        self._port = port
        try:
            await port.open()
            loop = asyncio.get_running_loop()
            for command in c.effective_on_connect:
                data = command.encode(self._enc) + self._term
                await port.write(data, loop.time() + self.timeout)
        except SerialPortError as exc:
            raise DriverError(c.id, str(exc)) from None
        self._unanswered = 0
        self.log.info("serial port open", path=c.port, tty=port.device, mode=self.mode)

    async def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            self._count_dropped(port)
            await port.close()

    def _live_port(self) -> SerialPort:
        port = self._port
        if port is None:
            raise DriverError(self.config.id, "port not open")
        return port

    def _lost(self, exc: SerialPortError) -> DriverError:
        self.log.warning("serial port lost", reason=str(exc), counters=dict(self.counters))
        return DriverError(self.config.id, str(exc))

    async def run(self, emit: Emit) -> None:
        if self.mode == "stream":
            await self._stream(emit)
        else:
            await super().run(emit)  # PolledDriver: poll() every poll_interval

    # --- request mode -----------------------------------------------------------------

    async def poll(self) -> list[Reading]:
        out: list[Reading] = []
        for req in self._commands:
            result = await self._exchange(req)
            if isinstance(result, str):
                out.extend(_bad(req.tags, result))
            else:
                out.extend(self._readings(result, req.tags))
        if self._unanswered >= self.config.fail_after:
            raise DriverError(
                self.config.id,
                f"no answer to {self._unanswered} requests in a row "
                f"(timeout {max(r.timeout for r in self._commands):g} s each)",
            )
        return out

    async def _exchange(self, req: _Request) -> Parsed | str:
        """Send one command and return its reply, or a status saying why there is none."""
        port = self._live_port()
        loop = asyncio.get_running_loop()
        # A late reply to an earlier command, or anything unsolicited, must not be
        # taken for this command's reply: drop what is already here.
        lines, partial = port.discard_input()
        if lines or partial:
            self.counters["stale"] += lines + bool(partial)
            self._warn(
                "stale",
                "serial input discarded before a command",
                lines=lines,
                partial=preview(partial) if partial else None,
                command=req.name,
            )
        deadline = loop.time() + req.timeout
        try:
            await port.write(req.data, deadline)
            while True:
                event = await port.next_event(deadline)
                if event is None:
                    # Half a reply is a device that talks: bad readings, not a dead link.
                    self._unanswered = 0 if port.framer.pending else self._unanswered + 1
                    return self._timeout(port, req.name, req.timeout)
                self.counters["lines"] += 1
                if isinstance(event, Overflow):
                    self._unanswered = 0
                    return self._too_long(event, req.name)
                parsed = self._parser.parse(event.data)
                if parsed.kind in ("blank", "ignored"):
                    self.counters[parsed.kind] += 1
                    continue
                self._unanswered = 0
                self.counters["replies"] += 1
                return parsed
        except SerialPortError as exc:
            raise self._lost(exc) from None

    # --- stream mode ------------------------------------------------------------------

    async def _stream(self, emit: Emit) -> None:
        port = self._live_port()
        loop = asyncio.get_running_loop()
        tags = list(self._plans)
        silent = 0
        deadline = loop.time() + self.timeout
        while True:
            try:
                event = await port.next_event(deadline)
            except SerialPortError as exc:
                raise self._lost(exc) from None
            if event is None:
                silent += 1
                if silent >= self.config.fail_after:
                    raise DriverError(
                        self.config.id,
                        f"no data for {silent * self.timeout:g} s "
                        f"({silent} timeouts of {self.timeout:g} s)",
                    )
                await emit(_bad(tags, self._timeout(port, None, self.timeout)))
                deadline = loop.time() + self.timeout
                continue
            self.counters["lines"] += 1
            self._count_dropped(port)
            if isinstance(event, Overflow):
                readings = _bad(tags, self._too_long(event, None))
            else:
                parsed = self._parser.parse(event.data)
                if parsed.kind in ("blank", "ignored"):
                    self.counters[parsed.kind] += 1
                    continue  # not data: the silence deadline stands
                due = (
                    tags if parsed.fields is None else [p for p in tags if p.field in parsed.fields]
                )
                readings = self._readings(parsed, due)
            silent = 0
            deadline = loop.time() + self.timeout
            if readings:
                await emit(readings)

    # --- readings -----------------------------------------------------------------------

    def _readings(self, parsed: Parsed, tags: list[TagPlan]) -> list[Reading]:
        """One reading per tag due from this line: a value, or bad with the reason."""
        if parsed.kind == "failure":
            problem = parsed.problem or "parse_error"
            status = parsed.status or "parse error"
            self.counters[problem] += 1
            self._warn(problem, f"serial {problem.replace('_', ' ')}", status=status)
            return _bad(tags, status)
        if parsed.kind == "error":
            status = parsed.status or "error reply"
            self.counters["error_reply"] += 1
            self._warn(
                "error_reply",
                "serial instrument reports an error",
                status=status,
                message=parsed.message,
            )
            return _bad(tags, status)
        out: list[Reading] = []
        q_status = parsed.status if parsed.q != "good" else None
        for plan in tags:
            ft = parsed.values.get(plan.field)
            if ft is None:
                bad = f"parse error: no value {plan.field!r} in the line"
                self.counters["parse_error"] += 1
                self._warn("parse_error", "serial parse error", status=bad, tag=plan.name)
                out.append(Reading(plan.name, None, BAD, bad))
                continue
            if plan.expect_unit and ft.reported and ft.unit != to_ucum(plan.expect_unit):
                bad = f"unit mismatch: line has {ft.unit!r}, expected {plan.expect_unit!r}"
                self.counters["unit_mismatch"] += 1
                self._warn("unit_mismatch", "serial unit mismatch", status=bad, tag=plan.name)
                out.append(Reading(plan.name, None, BAD, bad))
                continue
            try:
                val = convert(ft.text, plan.data_type, self._decimal)
            except ConversionError as exc:
                bad = f"parse error: {exc}"
                self.counters["parse_error"] += 1
                self._warn("parse_error", "serial parse error", status=bad, tag=plan.name)
                out.append(Reading(plan.name, None, BAD, bad))
                continue
            out.append(Reading(plan.name, val, parsed.q, q_status, unit=ft.unit or None))
        return out

    def _timeout(self, port: SerialPort, command: str | None, timeout: float) -> str:
        self.counters[TIMEOUT] += 1
        partial = port.framer.pending
        status = f"timeout: incomplete line {preview(partial)}" if partial else TIMEOUT
        self._warn(TIMEOUT, "serial timeout", status=status, command=command, timeout=timeout)
        return status

    def _too_long(self, event: Overflow, command: str | None) -> str:
        self.counters["line_too_long"] += 1
        status = f"line too long (over {self.config.max_line} bytes)"
        self._warn(
            "line_too_long",
            "serial line too long, discarded",
            status=status,
            head=preview(event.head),
            command=command,
        )
        return status

    def _count_dropped(self, port: SerialPort) -> None:
        new = port.dropped - self._dropped_seen
        if new:
            self._dropped_seen = port.dropped
            self.counters["dropped"] += new
            self._warn("dropped", "serial lines dropped: acquisition fell behind", lines=new)

    def _warn(self, kind: str, event: str, **fields: Any) -> None:
        suppressed = self._throttle.allow(kind)
        if suppressed is None:
            return
        if suppressed:
            fields["suppressed"] = suppressed  # since the last line about this kind
        fields["count"] = self.counters[kind] or None
        self.log.warning(event, **{k: v for k, v in fields.items() if v is not None})


def _bad(tags: list[TagPlan], status: str) -> list[Reading]:
    return [Reading(p.name, None, BAD, status) for p in tags]
