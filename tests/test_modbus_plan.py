"""Coalescing tags into Modbus reads."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.plan import ReadRequest, Table, TagAddress, plan_reads

BIT_TABLES = {"coil", "discrete"}
TABLE_ORDER: dict[str, int] = {"holding": 0, "input": 1, "coil": 2, "discrete": 3}


def H(address: int, count: int = 1) -> TagAddress:
    return TagAddress("holding", address, count)


def spans(reads: list[ReadRequest]) -> list[tuple[str, int, int]]:
    return [(r.table, r.address, r.count) for r in reads]


def test_empty() -> None:
    assert plan_reads([]) == []


def test_single_tag() -> None:
    assert plan_reads([H(10, 2)]) == [ReadRequest("holding", 10, 2, ((0, 0),))]


def test_adjacent_tags_merge() -> None:
    reads = plan_reads([H(0, 2), H(2, 2), H(4, 1)])
    assert reads == [ReadRequest("holding", 0, 5, ((0, 0), (1, 2), (2, 4)))]


def test_unsorted_input_is_sorted_and_indices_kept() -> None:
    reads = plan_reads([H(4, 1), H(0, 2), H(2, 2)])
    assert reads == [ReadRequest("holding", 0, 5, ((1, 0), (2, 2), (0, 4)))]


def test_gap_splits_by_default() -> None:
    assert spans(plan_reads([H(0, 2), H(3, 1)])) == [("holding", 0, 2), ("holding", 3, 1)]


@pytest.mark.parametrize(
    ("max_gap", "expected"),
    [
        (0, [("holding", 0, 2), ("holding", 5, 1)]),
        (2, [("holding", 0, 2), ("holding", 5, 1)]),
        (3, [("holding", 0, 6)]),  # 3 unused registers (2, 3, 4) are allowed
        (100, [("holding", 0, 6)]),
    ],
)
def test_gap_respects_max_gap(max_gap: int, expected: list[tuple[str, int, int]]) -> None:
    reads = plan_reads([H(0, 2), H(5, 1)], max_gap=max_gap)
    assert spans(reads) == expected


def test_gap_merged_offsets() -> None:
    reads = plan_reads([H(100, 2), H(110, 4)], max_gap=8)
    assert reads == [ReadRequest("holding", 100, 14, ((0, 0), (1, 10)))]


def test_register_limit_splits() -> None:
    # 130 consecutive single registers: 125 + 5
    reads = plan_reads([H(a) for a in range(130)])
    assert spans(reads) == [("holding", 0, 125), ("holding", 125, 5)]
    assert reads[1].members[0] == (125, 0)


def test_limit_exact_fit_not_split() -> None:
    reads = plan_reads([H(0, 123), H(123, 2)])
    assert spans(reads) == [("holding", 0, 125)]
    reads = plan_reads([H(0, 123), H(123, 3)])
    assert spans(reads) == [("holding", 0, 123), ("holding", 123, 3)]


def test_custom_register_limit() -> None:
    reads = plan_reads([H(a, 2) for a in range(0, 20, 2)], max_registers=8)
    assert spans(reads) == [("holding", 0, 8), ("holding", 8, 8), ("holding", 16, 4)]


def test_gap_never_pushes_read_over_limit() -> None:
    reads = plan_reads([H(0, 100), H(120, 10)], max_gap=50)
    assert spans(reads) == [("holding", 0, 100), ("holding", 120, 10)]


def test_tables_never_mix_and_are_ordered() -> None:
    tags = [
        TagAddress("discrete", 0, 1),
        TagAddress("coil", 0, 1),
        TagAddress("input", 0, 1),
        TagAddress("holding", 0, 1),
        TagAddress("input", 1, 1),
        TagAddress("holding", 1, 1),
    ]
    reads = plan_reads(tags)
    assert reads == [
        ReadRequest("holding", 0, 2, ((3, 0), (5, 1))),
        ReadRequest("input", 0, 2, ((2, 0), (4, 1))),
        ReadRequest("coil", 0, 1, ((1, 0),)),
        ReadRequest("discrete", 0, 1, ((0, 0),)),
    ]


def test_shared_address_bit_tags_share_a_read() -> None:
    # three "bit" tags in register 7 plus an int32 at 8
    reads = plan_reads([H(7), H(7), H(8, 2), H(7)])
    assert reads == [ReadRequest("holding", 7, 3, ((0, 0), (1, 0), (3, 0), (2, 1)))]


def test_overlapping_tags_merge() -> None:
    # a uint64 at 10 and a uint32 view of its low half, plus one inside it
    reads = plan_reads([H(10, 4), H(12, 2), H(11, 1)])
    assert reads == [ReadRequest("holding", 10, 4, ((0, 0), (2, 1), (1, 2)))]


def test_overlap_extending_past_limit_starts_new_read() -> None:
    reads = plan_reads([H(0, 100), H(50, 100)])
    assert spans(reads) == [("holding", 0, 100), ("holding", 50, 100)]


def test_bits_limit() -> None:
    coils = [TagAddress("coil", a, 1) for a in range(2100)]
    reads = plan_reads(coils)
    assert spans(reads) == [("coil", 0, 2000), ("coil", 2000, 100)]
    # the register limit does not apply to bit tables, and vice versa
    assert len(plan_reads([TagAddress("discrete", 0, 1000)], max_registers=10)) == 1
    with pytest.raises(ValueError):
        plan_reads([H(0, 200)], max_bits=2000)


def test_custom_bits_limit() -> None:
    tags = [TagAddress("discrete", a, 1) for a in range(10)]
    assert spans(plan_reads(tags, max_bits=4)) == [
        ("discrete", 0, 4),
        ("discrete", 4, 4),
        ("discrete", 8, 2),
    ]


@pytest.mark.parametrize(
    ("tag", "kwargs"),
    [
        (H(0, 126), {}),
        (H(5, 11), {"max_registers": 10}),
        (TagAddress("coil", 0, 2001), {}),
        (TagAddress("discrete", 3, 9), {"max_bits": 8}),
    ],
)
def test_too_wide_tag_errors(tag: TagAddress, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"tag 1 .*wider") as info:
        plan_reads([H(0), tag], **kwargs)
    assert tag.table in str(info.value)
    assert str(tag.address) in str(info.value)


@pytest.mark.parametrize(
    "tag",
    [
        H(0, 0),
        H(-1, 1),
        H(65535, 2),
        TagAddress("bogus", 0, 1),  # type: ignore[arg-type]
    ],
)
def test_invalid_tags_error(tag: TagAddress) -> None:
    with pytest.raises(ValueError, match="tag 0"):
        plan_reads([tag])


def test_last_address_ok() -> None:
    assert spans(plan_reads([H(65535)])) == [("holding", 65535, 1)]


@pytest.mark.parametrize("kwargs", [{"max_registers": 0}, {"max_bits": 0}, {"max_gap": -1}])
def test_invalid_limits_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        plan_reads([H(0)], **kwargs)


def test_deterministic() -> None:
    tags = [H(5), TagAddress("coil", 3, 1), H(5), H(1, 2), TagAddress("input", 9, 4)]
    assert plan_reads(tags) == plan_reads(list(tags))


# --- property -------------------------------------------------------------------

TABLES: tuple[Table, ...] = ("holding", "input", "coil", "discrete")
tables = st.sampled_from(TABLES)


@st.composite
def tag_sets(draw: st.DrawFn) -> tuple[list[TagAddress], int, int, int]:
    max_registers = draw(st.integers(1, 125))
    max_bits = draw(st.integers(1, 2000))
    max_gap = draw(st.integers(0, 20))
    tags = []
    for _ in range(draw(st.integers(0, 60))):
        table: Table = draw(tables)
        limit = max_bits if table in BIT_TABLES else max_registers
        count = draw(st.integers(1, min(limit, 130)))
        # a narrow address range so tags collide, touch and overlap often
        address = draw(st.integers(0, 400))
        tags.append(TagAddress(table, address, count))
    return tags, max_registers, max_bits, max_gap


@given(tag_sets())
def test_plan_properties(case: tuple[list[TagAddress], int, int, int]) -> None:
    tags, max_registers, max_bits, max_gap = case
    reads = plan_reads(tags, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap)

    seen: list[int] = []
    for read in reads:
        limit = max_bits if read.table in BIT_TABLES else max_registers
        assert 1 <= read.count <= limit
        assert read.members
        for index, offset in read.members:
            tag = tags[index]
            assert tag.table == read.table
            assert read.address + offset == tag.address
            assert offset >= 0 and offset + tag.count <= read.count
            seen.append(index)
        # the read spans exactly its tags: no unused registers at either end
        assert min(tags[i].address for i, _ in read.members) == read.address
        assert max(tags[i].address + tags[i].count for i, _ in read.members) == (
            read.address + read.count
        )
    assert sorted(seen) == list(range(len(tags)))

    keys = [(TABLE_ORDER[r.table], r.address) for r in reads]
    assert keys == sorted(keys)

    # consecutive reads of one table could not have been one read
    for a, b in pairwise(reads):
        if a.table != b.table:
            continue
        limit = max_bits if a.table in BIT_TABLES else max_registers
        a_end = a.address + a.count
        b_end = b.address + b.count
        assert b.address - a_end > max_gap or max(a_end, b_end) - a.address > limit
