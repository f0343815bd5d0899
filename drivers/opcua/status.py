"""OPC UA StatusCode -> record quality.

The two top bits of a StatusCode are its severity (Part 4, 7.39): ``00`` Good,
``01`` Uncertain, ``10`` Bad, ``11`` reserved and treated as Bad. The record
carries the severity as ``q`` and the full 32-bit code as ``status`` whenever
it is not plain Good (0) -- Good codes with info bits set (e.g. the overflow
bit of a monitored item's queue, ``0x00000480``) are reported too.
"""

from __future__ import annotations

from typing import Final

from gateway.record import BAD, GOOD, UNCERTAIN

SEVERITY_MASK: Final = 0xC0000000
OVERFLOW_BITS: Final = 0x00000480  # InfoType DataValue + Overflow (Part 4, 7.39)


def quality(code: int) -> str:
    """``good``, ``uncertain`` or ``bad`` for a StatusCode value."""
    severity = code & SEVERITY_MASK
    if severity == 0:
        return GOOD
    if severity == 0x40000000:
        return UNCERTAIN
    return BAD


def record_status(code: int) -> int | None:
    """The record's ``status`` for a StatusCode: None for plain Good, else the code."""
    return None if code == 0 else code


def status_name(code: int) -> str:
    """Symbolic name of a StatusCode (``BadSensorFailure``) or its hex form."""
    from asyncua.ua import status_codes  # local: keeps this module importable cheaply

    try:
        name, _ = status_codes.get_name_and_doc(code & 0xFFFF0000)
    except Exception:  # unknown codes raise in some asyncua versions
        name = ""
    base = name or f"0x{code & 0xFFFF0000:08X}"
    return base if code & 0xFFFF == 0 else f"{base} (0x{code:08X})"


def is_overflow(code: int) -> bool:
    """True when the server's monitored-item queue overflowed (values were lost)."""
    return code & OVERFLOW_BITS == OVERFLOW_BITS
