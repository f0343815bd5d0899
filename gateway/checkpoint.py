"""Signed checkpoints: when a stream's head is signed, and the ``$checkpoint`` record.

A checkpoint is an event record chained in its stream like any other. Its
``info.note`` is a C2SP signed note whose text is a tlog-checkpoint body::

    <gw>/<dev>                  origin: the stream
    <seq>                       "tree size": the seq of the record it covers
    <base64 hash>               "root hash": that record's hash

    — <gw> <base64(key id || Ed25519 signature)>

It always covers the record sealed just before it, so its own ``prev`` equals
the signed hash. A checkpoint is written once a stream has advanced
``every_records`` records since the last one (checked once per sealed message:
one subtraction and one comparison), after ``every_seconds`` if the stream
advanced at all, and after every ``$stop``. Signing happens once per checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from gateway.errors import GatewayError
from gateway.record import EV_CHECKPOINT, EV_STOP, FORMAT_VERSION, GOOD, Record
from gateway.signing import SignerKey, checkpoint_text, sign_note

log = structlog.get_logger("gateway.checkpoint")

Head = Callable[[str], tuple[int, bytes]]
Submit = Callable[[str, list[Record]], Awaitable[bool]]


@dataclass(slots=True)
class _State:
    covered: int  # seq the last checkpoint covers (at start: the head found on disk)
    own: int  # seq of the last checkpoint record itself (0: none in this run)
    last: int  # last seq sealed
    at: float  # monotonic time of the last checkpoint (or of the start)


class Checkpointer:
    """Decides when each stream is checkpointed and builds the signed record."""

    def __init__(
        self, gateway_id: str, signer: SignerKey, *, every_records: int, every_seconds: float
    ) -> None:
        self.gw = gateway_id
        self.signer = signer
        self.every_records = every_records
        self.every_seconds = every_seconds
        self._state: dict[str, _State] = {}
        self.written = 0
        self.sign_seconds = 0.0  # total time spent signing (for the figures)

    def status_payload(self) -> bytes:
        """The retained ``$status/key`` message: the public key and its fingerprint."""
        v = self.signer.verifier
        doc = {"key": v.vkey, "fingerprint": v.fingerprint, "algorithm": "ed25519"}
        return json.dumps(doc, sort_keys=True).encode()

    def after_seal(self, stream: str, records: list[Record]) -> Record | None:
        """Outbox hook, once per sealed message: a checkpoint to seal next, or None."""
        last = records[-1]
        seq = last["seq"]
        st = self._state.get(stream)
        if st is None:
            # First message of this run: count from the head it found on disk.
            st = self._state[stream] = _State(records[0]["seq"] - 1, 0, seq, time.monotonic())
        st.last = seq
        if last["tag"] == EV_CHECKPOINT:
            st.own = seq
            return None
        if seq - st.covered >= self.every_records or last["tag"] == EV_STOP:
            return self.record(stream, seq, last["hash"])
        return None

    def due(self, now: float) -> list[str]:
        """Streams that advanced past their last checkpoint, made ``every_seconds`` ago."""
        return [
            s
            for s, st in self._state.items()
            if now - st.at >= self.every_seconds and st.last > max(st.covered, st.own)
        ]

    async def run(self, head: Head, submit: Submit) -> None:
        """The time-based checkpoints: ``head`` reads a chain head, ``submit`` queues."""
        tick = min(1.0, self.every_seconds / 4)
        while True:
            await asyncio.sleep(tick)
            for stream in self.due(time.monotonic()):
                # Read the head and build the record without awaiting in between;
                # submit seals it next unless back-pressure makes it wait.
                seq, digest = head(stream)
                try:
                    accepted = await submit(stream, [self.record(stream, seq, digest)])
                except GatewayError as exc:  # the outbox failed: the gateway is stopping
                    log.error("checkpoint not written", stream=stream, seq=seq, error=str(exc))
                    return
                if not accepted:
                    # drop_newest at the quota: counted in the stream's next $gap.
                    log.warning("checkpoint refused by the outbox quota", stream=stream, seq=seq)

    def record(self, stream: str, seq: int, digest: bytes) -> Record:
        """The unsealed ``$checkpoint`` record covering ``(seq, digest)`` of ``stream``."""
        t0 = time.perf_counter()
        note = sign_note(checkpoint_text(f"{self.gw}/{stream}", seq, digest), self.signer)
        self.sign_seconds += time.perf_counter() - t0
        st = self._state.get(stream)
        if st is None:
            st = self._state[stream] = _State(seq, 0, seq, time.monotonic())
        st.covered, st.at = seq, time.monotonic()
        self.written += 1
        return {
            "v": FORMAT_VERSION,
            "gw": self.gw,
            "dev": stream,
            "tag": EV_CHECKPOINT,
            "val": f"checkpoint of seq {seq} signed by {self.signer.name}+"
            f"{self.signer.key_id.hex()}",
            "unit": "",
            "q": GOOD,
            "ts": time.time_ns(),
            "info": {"note": note},
        }
