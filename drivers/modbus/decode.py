"""Modbus register decoding and encoding (pure functions, no I/O).

A Modbus register is an unsigned 16-bit value (0..65535). Wider values span
consecutive registers; devices disagree on how bytes are laid out, so each tag
names a byte order. For a 32-bit value whose bytes are ``A`` (most significant)
``B C D``:

======  ==============  ====================================
order   registers       meaning
======  ==============  ====================================
ABCD    ``[AB, CD]``    big-endian (the Modbus default)
CDAB    ``[CD, AB]``    word swap
BADC    ``[BA, DC]``    byte swap inside each word
DCBA    ``[DC, BA]``    little-endian
======  ==============  ====================================

64-bit values generalise the same way: ABCD is big-endian; CDAB puts the
registers in reverse order, bytes big-endian inside each; BADC keeps the
registers in order with the bytes swapped inside each; DCBA is fully
little-endian. 16-bit values: ABCD and CDAB read the high byte first, BADC and
DCBA swap the two bytes.

Other types:

* ``string``: ``length`` registers, two characters per register, high byte
  first for ABCD/CDAB and swapped for BADC/DCBA; registers are always in order.
  Decoding strips trailing NUL characters and spaces; encoding pads with NUL.
* ``bit``: one register; ``bit`` is the bit index 0..15, 0 = least significant,
  of the register's 16-bit value decoded with the tag's byte order (so BADC and
  DCBA swap the bytes first, as for ``uint16``). Decodes to ``bool``.
* ``bool``: one coil or discrete-input value (0/1 or a bool); byte order does
  not apply. Decodes to ``bool``.

Floats decode to Python ``float`` (float32 is widened exactly).

:func:`make_decoder` returns a closure specialised for one tag for the driver's
hot path; :func:`decode` goes through the same (cached) closures.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from typing import Final, Literal, get_args

__all__ = [
    "BYTE_ORDERS",
    "DATA_TYPES",
    "ByteOrder",
    "DataType",
    "DecodeError",
    "Decoder",
    "Value",
    "decode",
    "encode",
    "make_decoder",
    "register_count",
]

DataType = Literal[
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "bool",
    "bit",
    "string",
]
ByteOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Value = int | float | bool | str
Decoder = Callable[[Sequence[int]], Value]

DATA_TYPES: Final[frozenset[str]] = frozenset(get_args(DataType))
BYTE_ORDERS: Final[frozenset[str]] = frozenset(get_args(ByteOrder))


class DecodeError(ValueError):
    """Registers or a value that cannot be decoded/encoded as the tag says."""


# data type -> (struct code, registers)
_NUMERIC: Final[dict[str, tuple[str, int]]] = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),
    "float32": ("f", 2),
    "float64": ("d", 4),
}
_INT_RANGE: Final[dict[str, tuple[int, int]]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
# Byte order -> (endianness registers are packed with, endianness the value is
# read with). Choosing both lets one pack + one unpack do any of the four
# layouts with no register reordering: e.g. CDAB packs each word little-endian,
# which reverses the whole byte string, then reads it little-endian.
_ENDIAN: Final[dict[str, tuple[str, str]]] = {
    "ABCD": (">", ">"),
    "CDAB": ("<", "<"),
    "BADC": ("<", ">"),
    "DCBA": (">", "<"),
}
_SWAPPED: Final = frozenset({"BADC", "DCBA"})


def _check_type(data_type: str, byte_order: str) -> None:
    if data_type not in DATA_TYPES:
        raise DecodeError(f"unknown data_type {data_type!r}; expected one of {sorted(DATA_TYPES)}")
    if byte_order not in BYTE_ORDERS:
        raise DecodeError(
            f"unknown byte order {byte_order!r} for {data_type}; "
            f"expected one of {sorted(BYTE_ORDERS)}"
        )


def register_count(data_type: DataType, length: int | None = None) -> int:
    """Number of registers (one bit for ``bool``) a value of ``data_type`` occupies.

    ``length`` is required for ``string`` (registers, >= 1); for other types it
    may be given but must then equal the type's own width.
    """
    if data_type == "string":
        if length is None or isinstance(length, bool) or length < 1:
            raise DecodeError(f"string needs a length >= 1 (registers), got {length!r}")
        return length
    if data_type in _NUMERIC:
        count = _NUMERIC[data_type][1]
    elif data_type in ("bool", "bit"):
        count = 1
    else:
        raise DecodeError(f"unknown data_type {data_type!r}; expected one of {sorted(DATA_TYPES)}")
    if length is not None and length != count:
        raise DecodeError(f"{data_type} occupies {count} register(s), not length={length}")
    return count


def _bad_registers(
    registers: Sequence[int], data_type: str, byte_order: str, n: int
) -> DecodeError:
    """Explain why ``registers`` were rejected (slow path only)."""
    what = f"{data_type} (byte order {byte_order})"
    if n and len(registers) != n:
        return DecodeError(f"{what} needs {n} register(s), got {len(registers)}")
    if not registers:
        return DecodeError(f"{what} needs at least 1 register, got 0")
    for i, reg in enumerate(registers):
        if not isinstance(reg, int) or not 0 <= reg <= 0xFFFF:
            return DecodeError(f"{what}: register {i} = {reg!r} is not in 0..65535")
    return DecodeError(f"{what}: cannot decode registers {list(registers)!r}")


@cache
def _numeric_structs(data_type: str, byte_order: str) -> tuple[struct.Struct, struct.Struct]:
    code, n = _NUMERIC[data_type]
    word_endian, value_endian = _ENDIAN[byte_order]
    return struct.Struct(word_endian + "H" * n), struct.Struct(value_endian + code)


@lru_cache(maxsize=256)
def _string_struct(length: int, byte_order: str) -> struct.Struct:
    return struct.Struct(("<" if byte_order in _SWAPPED else ">") + "H" * length)


def _numeric_decoder(data_type: str, byte_order: str) -> Decoder:
    words, value = _numeric_structs(data_type, byte_order)
    pack = words.pack
    unpack = value.unpack
    n = words.size // 2

    def decode_numeric(registers: Sequence[int]) -> Value:
        try:
            result: Value = unpack(pack(*registers))[0]
        except struct.error:
            # struct already rejects wrong counts and out-of-range words, so the
            # fast path does no checking of its own.
            raise _bad_registers(registers, data_type, byte_order, n) from None
        return result

    return decode_numeric


def _bit_decoder(byte_order: str, bit: int | None) -> Decoder:
    if bit is None or isinstance(bit, bool) or not 0 <= bit <= 15:
        raise DecodeError(f"bit (byte order {byte_order}) needs a bit index 0..15, got {bit!r}")
    words, value = _numeric_structs("uint16", byte_order)
    pack = words.pack
    unpack = value.unpack
    mask = 1 << bit

    def decode_bit(registers: Sequence[int]) -> Value:
        try:
            return bool(unpack(pack(*registers))[0] & mask)
        except struct.error:
            raise _bad_registers(registers, "bit", byte_order, 1) from None

    return decode_bit


def _bool_decoder(byte_order: str) -> Decoder:
    def decode_bool(registers: Sequence[int]) -> Value:
        if len(registers) == 1:
            value = registers[0]
            # 0 == False and 1 == True, so this accepts ints and bools alike.
            if value == 1 or value == 0:
                return bool(value)
            raise DecodeError(f"bool: coil value {value!r} is not 0/1")
        raise _bad_registers(registers, "bool", byte_order, 1)

    return decode_bool


def _string_decoder(byte_order: str, encoding: str) -> Decoder:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DecodeError(f"string: unknown encoding {encoding!r}") from None

    def decode_string(registers: Sequence[int]) -> Value:
        try:
            raw = _string_struct(len(registers), byte_order).pack(*registers)
        except struct.error:
            raise _bad_registers(registers, "string", byte_order, 0) from None
        if not raw:
            raise _bad_registers(registers, "string", byte_order, 0)
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DecodeError(
                f"string (byte order {byte_order}): bytes {raw!r} are not valid {encoding}: "
                f"{exc.reason} at byte {exc.start}"
            ) from None
        # Strip after decoding so multi-byte encodings keep their last character.
        return text.rstrip("\x00 ")

    return decode_string


def make_decoder(
    data_type: DataType, byte_order: ByteOrder, *, bit: int | None = None, encoding: str = "ascii"
) -> Decoder:
    """A function decoding one tag's registers (built once per tag and cached).

    ``bit`` (0..15) is required for, and only allowed with, ``bit``;
    ``encoding`` applies to ``string`` only. Bad arguments raise
    :class:`DecodeError` here, not on each call.
    """
    return _decoder(data_type, byte_order, bit, encoding)


@lru_cache(maxsize=1024)
def _decoder(data_type: str, byte_order: str, bit: int | None, encoding: str) -> Decoder:
    _check_type(data_type, byte_order)
    if bit is not None and data_type != "bit":
        raise DecodeError(f"{data_type} (byte order {byte_order}): bit index applies to 'bit' only")
    if data_type in _NUMERIC:
        return _numeric_decoder(data_type, byte_order)
    if data_type == "bit":
        return _bit_decoder(byte_order, bit)
    if data_type == "bool":
        return _bool_decoder(byte_order)
    return _string_decoder(byte_order, encoding)


def decode(
    registers: Sequence[int],
    data_type: DataType,
    byte_order: ByteOrder = "ABCD",
    *,
    bit: int | None = None,
    encoding: str = "ascii",
) -> Value:
    """Decode ``registers`` as one value of ``data_type``; see the module docstring."""
    return _decoder(data_type, byte_order, bit, encoding)(registers)


def encode(
    value: Value,
    data_type: DataType,
    byte_order: ByteOrder = "ABCD",
    *,
    length: int | None = None,
    bit: int | None = None,
    encoding: str = "ascii",
) -> list[int]:
    """Registers (for ``bool``: the one coil value) that decode back to ``value``.

    ``length`` is a string's size in registers (default: just enough for the
    encoded bytes). For ``bit``, ``bit`` (0..15) is required and the result is
    a register with only that bit set, or 0; writing one bit of a live register
    needs a read-modify-write (or mask write) by the caller.
    """
    _check_type(data_type, byte_order)
    what = f"{data_type} (byte order {byte_order})"
    if bit is not None and data_type != "bit":
        raise DecodeError(f"{what}: bit index applies to 'bit' only")
    if data_type in _NUMERIC:
        register_count(data_type, length)
        words, packer = _numeric_structs(data_type, byte_order)
        if data_type in _INT_RANGE:
            if not isinstance(value, int) or isinstance(value, bool):
                raise DecodeError(f"{what}: expected an int, got {value!r}")
            lo, hi = _INT_RANGE[data_type]
            if not lo <= value <= hi:
                raise DecodeError(f"{what}: value {value} out of range {lo}..{hi}")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise DecodeError(f"{what}: expected a float, got {value!r}")
        try:
            return list(words.unpack(packer.pack(value)))
        except (struct.error, OverflowError) as exc:
            raise DecodeError(f"{what}: value {value!r} out of range: {exc}") from None
    if data_type in ("bool", "bit"):
        register_count(data_type, length)
        if isinstance(value, str | float) or value not in (0, 1):
            raise DecodeError(f"{what}: expected a bool or 0/1, got {value!r}")
        if data_type == "bool":
            return [int(value)]
        if bit is None or isinstance(bit, bool) or not 0 <= bit <= 15:
            raise DecodeError(f"{what}: needs a bit index 0..15, got {bit!r}")
        return encode(int(value) << bit, "uint16", byte_order)
    if not isinstance(value, str):
        raise DecodeError(f"{what}: expected a str, got {value!r}")
    try:
        raw = value.encode(encoding)
    except UnicodeEncodeError as exc:
        raise DecodeError(
            f"{what}: {value!r} is not encodable as {encoding}: {exc.reason}"
        ) from None
    except LookupError:
        raise DecodeError(f"{what}: unknown encoding {encoding!r}") from None
    n = register_count("string", length if length is not None else max(1, (len(raw) + 1) // 2))
    if len(raw) > 2 * n:
        raise DecodeError(f"{what}: {value!r} needs {len(raw)} bytes, more than {n} register(s)")
    return list(_string_struct(n, byte_order).unpack(raw.ljust(2 * n, b"\x00")))
