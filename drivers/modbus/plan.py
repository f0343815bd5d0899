"""Coalescing Modbus tags into as few read requests as possible (pure logic).

Each Modbus request costs a round trip, often tens of milliseconds on serial
lines, so tags close to each other in the same table are read together. Tags
are grouped by table, sorted by address, and merged greedily while their spans
touch, overlap or are separated by at most ``max_gap`` unused registers/bits
and the read stays within the protocol limit (125 registers for holding/input
registers, 2000 bits for coils/discrete inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["TABLES", "ReadRequest", "Table", "TagAddress", "plan_reads"]

Table = Literal["holding", "input", "coil", "discrete"]

# Output order of the tables; the bit tables come after the register tables.
TABLES: Final[tuple[Table, ...]] = ("holding", "input", "coil", "discrete")
_BIT_TABLES: Final = frozenset({"coil", "discrete"})
_ADDRESS_SPACE: Final = 0x10000


@dataclass(frozen=True, slots=True)
class TagAddress:
    """Where one tag lives: ``count`` registers (or bits, for coil/discrete)."""

    table: Table
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read; ``members`` are (tag index in the input, offset inside the read)."""

    table: Table
    address: int
    count: int
    members: tuple[tuple[int, int], ...]


def plan_reads(
    tags: Sequence[TagAddress],
    *,
    max_registers: int = 125,
    max_bits: int = 2000,
    max_gap: int = 0,
) -> list[ReadRequest]:
    """Group ``tags`` into reads, ordered by table then address.

    Every tag index appears in exactly one request, wholly inside it. Raises
    ``ValueError`` for a tag with a bad table/address/count or wider than the
    limit of its table.
    """
    if max_registers < 1 or max_bits < 1:
        raise ValueError(f"max_registers ({max_registers}) and max_bits ({max_bits}) must be >= 1")
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")

    by_table: dict[str, list[int]] = {table: [] for table in TABLES}
    for index, tag in enumerate(tags):
        if tag.table not in by_table:
            raise ValueError(f"tag {index} ({tag}): unknown table {tag.table!r}")
        limit = max_bits if tag.table in _BIT_TABLES else max_registers
        if tag.count < 1:
            raise ValueError(f"tag {index} ({tag}): count must be >= 1")
        if tag.address < 0 or tag.address + tag.count > _ADDRESS_SPACE:
            raise ValueError(f"tag {index} ({tag}): span outside addresses 0..65535")
        if tag.count > limit:
            unit = "bits" if tag.table in _BIT_TABLES else "registers"
            raise ValueError(
                f"tag {index} ({tag}): {tag.count} {unit} is wider than one read ({limit} {unit})"
            )
        by_table[tag.table].append(index)

    reads: list[ReadRequest] = []
    for table in TABLES:
        indices = by_table[table]
        if not indices:
            continue
        limit = max_bits if table in _BIT_TABLES else max_registers
        indices.sort(key=lambda i: (tags[i].address, i))
        start = end = -1
        group: list[int] = []
        for i in indices:
            tag = tags[i]
            tag_end = tag.address + tag.count
            if group and tag.address - end <= max_gap and max(end, tag_end) - start <= limit:
                end = max(end, tag_end)
                group.append(i)
                continue
            if group:
                reads.append(_request(table, start, end, group, tags))
            start, end, group = tag.address, tag_end, [i]
        reads.append(_request(table, start, end, group, tags))
    return reads


def _request(
    table: Table, start: int, end: int, group: list[int], tags: Sequence[TagAddress]
) -> ReadRequest:
    members = tuple((i, tags[i].address - start) for i in group)
    return ReadRequest(table=table, address=start, count=end - start, members=members)
