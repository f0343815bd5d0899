"""The record format (docs/records.md): vectors, chain, check_record, payloads, Verifier.

The vectors in tests/vectors/records.json come from an encoder written from the
spec alone (tests/vectors/make_vectors.py, no gateway or msgpack import);
gateway/record.py must reproduce them byte for byte. Streams for the verifier
tests are sealed with the real ``Chain``, then damaged the way an attacker or a
lossy path would.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import random
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest

from gateway.record import (
    BAD,
    EV_GAP,
    EV_START,
    GOOD,
    REQUIRED_FIELDS,
    ZERO_HASH,
    Chain,
    Record,
    canonical_bytes,
    check_record,
    decode_payload,
    encode_payload,
    record_hash,
)
from gateway.verify import Verifier, record_from_json, record_to_json

VECTOR_DIR = Path(__file__).parent / "vectors"
DOC = json.loads((VECTOR_DIR / "records.json").read_text(encoding="utf-8"))
VECTORS: dict[str, dict[str, Any]] = {v["name"]: v for v in DOC["vectors"]}

GW, DEV = "gw-01", "bioreactor-1"
TS = 1_718_000_000_000_000_000


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_vectors = _load_module("make_vectors", VECTOR_DIR / "make_vectors.py")


def _set_path(obj: dict[str, Any], path: str, conv: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        obj = obj[p]
    obj[leaf] = conv(obj[leaf])


def vector_fields(v: dict[str, Any]) -> dict[str, Any]:
    """A vector's fields as Python values (hex -> bytes, floats forced to float)."""
    fields = copy.deepcopy(v["fields"])
    for path in v["bytes_fields"]:
        _set_path(fields, path, bytes.fromhex)
    for path in v["float_fields"]:
        _set_path(fields, path, float)
    return fields


def _vector_params() -> list[Any]:
    return [pytest.param(n, id=n) for n in VECTORS]


def reading(i: int, dev: str = DEV) -> Record:
    if i % 3 == 0:
        tag, val, unit = "pH", 7.0 + (i % 50) / 100, "[pH]"
    elif i % 3 == 1:
        tag, val, unit = "temperature", 36.5 + (i % 10) / 10, "Cel"
    else:
        tag, val, unit = "agitation", 100 + i % 300, "/min"
    return {
        "v": 1,
        "gw": GW,
        "dev": dev,
        "tag": tag,
        "val": val,
        "unit": unit,
        "q": GOOD,
        "ts": TS + i * 1_000_000_000,
    }


def sealed(n: int, *, dev: str = DEV, chain: Chain | None = None, start: int = 0) -> list[Record]:
    """``n`` readings sealed in order by a real Chain."""
    chain = chain if chain is not None else Chain()
    return [chain.seal(dev, reading(start + i, dev)) for i in range(n)]


def verify(records: list[Record]) -> Any:
    v = Verifier()
    for r in records:
        v.add(copy.deepcopy(r))
    return v.report()


def only_stream(records: list[Record]) -> Any:
    report = verify(records)
    assert len(report.streams) == 1
    return report, report.streams[0]


# -- the vector file ----------------------------------------------------------------
def test_vector_file_is_what_the_generator_writes() -> None:
    assert json.loads(json.dumps(make_vectors.build(), ensure_ascii=False)) == DOC
    assert len(VECTORS) == len(DOC["vectors"]) >= 20


def test_vector_hashes_are_sha256_of_their_canonical_bytes() -> None:
    for v in DOC["vectors"]:
        assert hashlib.sha256(bytes.fromhex(v["canonical"])).hexdigest() == v["hash"], v["name"]


def test_worked_example_in_the_spec_matches_its_vector() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "records.md").read_text(encoding="utf-8")
    block = doc.split("As one string:", 1)[1].split("```")[1]
    v = VECTORS["float_reading"]
    assert "".join(block.split()) == v["canonical"]
    assert v["hash"] in doc


@pytest.mark.parametrize("name", _vector_params())
def test_canonical_bytes_match_vector(name: str) -> None:
    v = VECTORS[name]
    assert canonical_bytes(vector_fields(v)).hex() == v["canonical"]


@pytest.mark.parametrize("name", _vector_params())
def test_record_hash_matches_vector(name: str) -> None:
    v = VECTORS[name]
    fields = vector_fields(v)
    assert record_hash(fields).hex() == v["hash"]
    # ... also with the hash field present (it is left out of its own hash)
    fields["hash"] = bytes.fromhex(v["hash"])
    assert canonical_bytes(fields).hex() == v["canonical"]
    assert check_record(fields) is None


@pytest.mark.parametrize("name", _vector_params())
def test_chain_seal_reproduces_vector(name: str) -> None:
    """Chain.seal (fast path for flat records, generic path with info) gives the same hash."""
    v = VECTORS[name]
    fields = vector_fields(v)
    seq, prev = fields.pop("seq"), fields.pop("prev")
    chain = Chain({DEV: (seq - 1, prev)})
    rec = chain.seal(DEV, fields)
    assert (rec["seq"], rec["prev"], rec["hash"].hex()) == (seq, prev, v["hash"])
    assert chain.head(DEV) == (seq, bytes.fromhex(v["hash"]))


def test_chain_seal_produces_the_chain_vector() -> None:
    (spec,) = DOC["chains"]
    chain = Chain()
    for name in spec["vectors"]:
        v = VECTORS[name]
        fields = vector_fields(v)
        seq, prev = fields.pop("seq"), fields.pop("prev")
        rec = chain.seal(spec["dev"], fields)
        assert rec["seq"] == seq
        assert rec["prev"] == prev
        assert rec["hash"].hex() == v["hash"]
        assert canonical_bytes(rec).hex() == v["canonical"]
    assert chain.head(spec["dev"])[0] == len(spec["vectors"])


def _boundary_values() -> list[Any]:
    ints = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
    ints += [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]
    strs = ["é" * 15 + "x", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536]
    floats = [1.5, -2.25, 5e-324, 1.7976931348623157e308, float("inf"), float("-inf")]
    return [*ints, *strs, *floats, None, True, False, [], list(range(15)), list(range(16))]


@pytest.mark.parametrize("val", _boundary_values(), ids=repr)
def test_independent_encoder_agrees_at_format_boundaries(val: Any) -> None:
    fields = {"val": val, "prev": bytes(300), "info": {f"k{i:02}": i for i in range(16)}}
    assert canonical_bytes(fields) == make_vectors.canonical(fields)


def test_key_order_is_by_utf8_bytes_in_nested_maps() -> None:
    info = {"zeta": {"b": 1, "a": 2}, "Zeta": 0, "é": 1, "e": [{"y": 1, "x": 2}]}
    assert canonical_bytes({"info": info}) == make_vectors.canonical({"info": info})


# -- the chain ------------------------------------------------------------------------
def test_chain_continuity_over_10000_records() -> None:
    records = sealed(10_000)
    prev = ZERO_HASH
    for i, r in enumerate(records, 1):
        assert r["seq"] == i
        assert r["prev"] == prev
        assert len(r["hash"]) == 32
        prev = r["hash"]
    assert len({r["hash"] for r in records}) == 10_000
    for r in records[::997]:
        assert check_record(r) is None


def test_chain_restored_from_head_continues_as_if_never_stopped() -> None:
    straight = sealed(20)
    before = Chain()
    first = sealed(12, chain=before)
    head = before.head(DEV)
    assert head == (12, first[-1]["hash"])
    restarted = Chain({DEV: head})  # what the outbox loads from its heads table
    second = sealed(8, chain=restarted, start=12)
    assert second[0]["seq"] == 13 and second[0]["prev"] == first[-1]["hash"]
    assert [r["hash"] for r in first + second] == [r["hash"] for r in straight]
    assert verify(first + second).ok


def test_chain_streams_are_independent() -> None:
    chain = Chain()
    a = [chain.seal("a", reading(i, "a")) for i in range(3)]
    b = [chain.seal("b", reading(i, "b")) for i in range(2)]
    a.append(chain.seal("a", reading(3, "a")))
    assert [r["seq"] for r in a] == [1, 2, 3, 4]
    assert [r["seq"] for r in b] == [1, 2]
    assert b[0]["prev"] == ZERO_HASH and a[3]["prev"] == a[2]["hash"]
    assert chain.head("c") == (0, ZERO_HASH)


# -- check_record -----------------------------------------------------------------------
def _located(record: Record, field: str) -> tuple[bytes, int, int]:
    """A one-record payload and the byte span of ``field``'s value in it."""
    payload = encode_payload([record])
    key = msgpack.packb(field, use_bin_type=True)
    val = msgpack.packb(record[field], use_bin_type=True)
    start = payload.index(key + val) + len(key)
    return payload, start, start + len(val)


def _flip_is_caught(payload: bytes, i: int, mask: int) -> bool:
    damaged = bytearray(payload)
    damaged[i] ^= mask
    try:
        records = decode_payload(bytes(damaged))
    except ValueError:
        return True
    return len(records) != 1 or check_record(records[0]) is not None


@pytest.mark.parametrize("val", [36.95, 7, -5_000_000_000, "Zulauf läuft", True, None], ids=repr)
def test_check_record_catches_a_flipped_byte_anywhere_in_val(val: Any) -> None:
    rec = reading(1)
    rec["val"] = val
    if val is None:
        rec.update(q=BAD, status="timeout")
    Chain().seal(DEV, rec)
    assert check_record(rec) is None
    payload, start, end = _located(rec, "val")
    for i in range(start, end):
        for mask in (0x01, 0x80, 0xFF):
            assert _flip_is_caught(payload, i, mask), (i - start, mask)


def test_check_record_catches_a_flipped_bit_anywhere_in_the_record() -> None:
    rec = Chain().seal(DEV, {**reading(1), "status": 0x40920000, "src_ts": TS - 5})
    payload = encode_payload([rec])
    for i in range(len(payload)):
        for bit in range(8):
            assert _flip_is_caught(payload, i, 1 << bit), (i, bit)


def test_check_record_catches_a_changed_float_value() -> None:
    rec = Chain().seal(DEV, reading(1))
    (bits,) = struct.unpack(">Q", struct.pack(">d", rec["val"]))
    for bit in range(64):
        bad = dict(rec, val=struct.unpack(">d", struct.pack(">Q", bits ^ (1 << bit)))[0])
        assert check_record(bad) == "hash does not match the record's content", bit


@pytest.mark.parametrize("prev", [bytes(31), bytes(33), b"", "00" * 32, None], ids=repr)
def test_check_record_catches_a_wrong_prev(prev: Any) -> None:
    rec = Chain().seal(DEV, reading(1))
    rec["prev"] = prev
    rec["hash"] = record_hash(rec)  # even re-hashed: prev must be 32 bytes
    assert check_record(rec) == "prev is not 32 bytes"


def test_check_record_catches_a_wrong_hash_length() -> None:
    rec = Chain().seal(DEV, reading(1))
    rec["hash"] = rec["hash"][:31]
    assert check_record(rec) == "hash is not 32 bytes"


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_check_record_catches_a_missing_field(field: str) -> None:
    rec = Chain().seal(DEV, reading(1))
    del rec[field]
    if field != "hash":
        rec["hash"] = record_hash(rec)  # a consistent hash does not excuse it
    assert check_record(rec) == f"missing field(s) {field}"


def test_check_record_catches_an_unknown_field() -> None:
    rec = Chain().seal(DEV, reading(1))
    rec["comment"] = "added later"
    rec["hash"] = record_hash(rec)
    assert check_record(rec) == "unknown field(s) comment"


def test_check_record_catches_a_dropped_optional_field() -> None:
    rec = Chain().seal(DEV, {**reading(1), "q": BAD, "val": None, "status": 2})
    assert check_record(rec) is None
    del rec["status"]
    assert check_record(rec) == "hash does not match the record's content"


# -- payloads ------------------------------------------------------------------------------
def _mixed_records() -> list[Record]:
    chain = Chain()
    recs = [
        {**reading(0), "val": 36.95},
        {**reading(1), "val": -0.0},
        {**reading(2), "val": 1e300},
        {**reading(3), "val": 20.899999618530273},
        {**reading(4), "val": 2**64 - 1},
        {**reading(5), "val": -(2**63)},
        {**reading(6), "val": "Zellzahl Ø", "unit": "µS/cm"},
        {**reading(7), "val": None, "q": BAD, "status": "timeout", "src_ts": TS},
        {**reading(8), "tag": EV_START, "val": "acquisition started", "unit": ""},
        {
            **reading(9),
            "tag": EV_GAP,
            "val": "3 record(s) lost",
            "unit": "",
            "q": BAD,
            "info": {"reason": "quota", "count": 3, "from_ts": 1, "to_ts": 2, "ranges": [[2, 4]]},
        },
    ]
    recs[8]["info"] = {"previous_seq": 7, "clean_shutdown": False}
    return [chain.seal(DEV, r) for r in recs]


def test_payload_round_trip() -> None:
    records = _mixed_records()
    back = decode_payload(encode_payload(records))
    assert back == records
    assert all(check_record(r) is None for r in back)
    assert [r["hash"] for r in back] == [record_hash(r) for r in records]
    assert decode_payload(encode_payload([])) == []


def _reading(i: int, **extra: Any) -> Record:
    return {"v": 1, "gw": "gw", "dev": DEV, "tag": f"t{i}", "val": i * 0.5, "unit": "%",
            "q": GOOD, "ts": 1_700_000_000_000_000_000 + i, **extra}  # fmt: skip


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])
def test_seal_payload_is_the_payload_of_the_sealed_records(n: int) -> None:
    # Array headers change size at 16 and 65536 elements; layouts vary: the
    # normalizer's canonical order, any other order, optional fields, info.
    records: list[Record] = []
    for i in range(n):
        r = _reading(i)
        if i % 4 == 1:
            r = dict(sorted(r.items(), key=lambda kv: kv[0].encode()))
        elif i % 4 == 2:
            r.update(status=i, src_ts=i)
        elif i % 4 == 3:
            r["info"] = {"hash": b"nested", "z": [1, {"b": 2, "a": 1}]}
        records.append(r)
    payload = Chain().seal_payload(DEV, records)
    back = decode_payload(payload)
    assert back == records  # sealed in place: the payload holds exactly these
    assert [r["seq"] for r in back] == list(range(1, n + 1))
    assert [r["prev"] for r in back] == ([ZERO_HASH] + [r["hash"] for r in back])[:n]
    # record_hash packs through the generic canonical path: an independent check.
    assert all(record_hash(r) == r["hash"] for r in back)
    assert all(check_record(r) is None for r in back[:200])


def test_seal_payload_falls_back_for_a_record_of_many_fields() -> None:
    # Beyond 14 canonical fields the fixmap splice does not apply; the result
    # must still be right (verify then reports the unknown fields, not a hash error).
    r = _reading(1, **{f"x{i}": i for i in range(10)})
    back = decode_payload(Chain().seal_payload(DEV, [r]))
    assert back == [r]
    assert record_hash(back[0]) == back[0]["hash"]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # a format byte msgpack never uses
        b"this is not msgpack",
        b"\x91\x81\xa1",  # truncated
        b"\x92\x80",  # array of 2, one element
        bytes(range(256)),
    ],
    ids=["empty", "c1", "text", "truncated", "short-array", "all-bytes"],
)
def test_decode_payload_rejects_garbage(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_payload(payload)


@pytest.mark.parametrize("obj", [{"v": 1}, 5, "records", None, [1, 2], [{"v": 1}, "x"]], ids=repr)
def test_decode_payload_rejects_anything_but_an_array_of_maps(obj: Any) -> None:
    with pytest.raises(ValueError, match="not a msgpack array of maps"):
        decode_payload(msgpack.packb(obj, use_bin_type=True))


def test_decode_payload_rejects_non_string_map_keys() -> None:
    with pytest.raises(ValueError):
        decode_payload(msgpack.packb([{1: 2}]))


# -- the verifier ---------------------------------------------------------------------------
def test_verifier_intact_stream_is_ok() -> None:
    records = sealed(30)
    v = Verifier()
    for i in range(0, 30, 4):  # as published: one payload per acquisition cycle
        v.add_payload(encode_payload(records[i : i + 4]), f"{GW}/{DEV}")
    report = v.report()
    (s,) = report.streams
    assert report.ok and not report.malformed
    assert (s.gw, s.dev, s.records, s.first_seq, s.last_seq) == (GW, DEV, 30, 1, 30)
    assert report.summary().endswith("PASS: 1 stream(s), 30 unique records")


def test_verifier_duplicate_delivery_is_not_an_error() -> None:
    records = sealed(10)
    report, s = only_stream(records + records[3:6] + [records[0]])
    assert report.ok
    assert (s.records, s.duplicates) == (10, 4)


def test_verifier_reordered_delivery_is_ok() -> None:
    records = sealed(50)
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    report, s = only_stream(shuffled)
    assert report.ok and (s.first_seq, s.last_seq, s.records) == (1, 50, 50)


def test_verifier_several_streams_are_checked_separately() -> None:
    chain = Chain()
    a, b = sealed(5, dev="a", chain=chain), sealed(7, dev="b", chain=chain)
    report = verify(a + b)
    assert report.ok and [(s.dev, s.records) for s in report.streams] == [("a", 5), ("b", 7)]


def test_verifier_late_join_is_ok() -> None:
    report, s = only_stream(sealed(40)[25:])
    assert report.ok and s.first_seq == 26


def test_verifier_flipped_byte_names_the_bad_record() -> None:
    records = sealed(10)
    payload, start, _ = _located(records[6], "val")
    damaged = bytearray(payload)
    damaged[start + 5] ^= 0x10  # a bit deep in the float64
    v = Verifier()
    for r in records[:6] + records[7:]:
        v.add(r)
    v.add_payload(bytes(damaged))
    report = v.report()
    (s,) = report.streams
    assert not report.ok and not s.ok
    assert s.bad_records == [(7, "hash does not match the record's content")]
    assert not s.unexplained and not s.conflicts
    assert "BAD RECORD seq 7" in report.summary() and "FAIL" in report.summary()


def test_verifier_deleted_record_is_an_unexplained_gap() -> None:
    records = sealed(10)
    report, s = only_stream(records[:4] + records[5:])
    assert not report.ok
    assert s.unexplained == [[5, 5]] and not s.bad_records and not s.broken_links
    assert "UNEXPLAINED GAP seq 5..5 (1 records missing)" in report.summary()


def test_verifier_deleted_range_covered_by_gap_record_is_explained() -> None:
    chain = Chain()
    records = sealed(10, chain=chain)
    lost = records[3:6]  # seq 4..6 deleted from the outbox by drop_oldest
    gap = chain.seal(
        DEV,
        {
            "v": 1,
            "gw": GW,
            "dev": DEV,
            "tag": EV_GAP,
            "val": "3 record(s) lost: quota (policy drop_oldest)",
            "unit": "",
            "q": BAD,
            "ts": TS + 100,
            "info": {
                "reason": "quota (policy drop_oldest)",
                "count": 3,
                "from_ts": lost[0]["ts"],
                "to_ts": lost[-1]["ts"],
                "ranges": [[4, 6]],
            },
        },
    )
    delivered = records[:3] + records[6:] + [gap]
    report, s = only_stream(delivered)
    assert report.ok, report.summary()
    assert s.explained == [[4, 6]] and not s.unexplained
    assert s.events == {EV_GAP: 1}
    # A gap that covers only part of what is missing explains only that part.
    gap_part = copy.deepcopy(gap)
    gap_part["info"]["ranges"] = [[4, 5]]
    gap_part["hash"] = record_hash(gap_part)  # a sound record of another chain history
    report, s = only_stream(records[:3] + records[6:] + [gap_part])
    assert s.explained == [[4, 5]] and s.unexplained == [[6, 6]] and not report.ok


def test_verifier_counts_records_refused_before_chaining() -> None:
    chain = Chain()
    records = sealed(5, chain=chain)
    gap = chain.seal(
        DEV,
        {
            **reading(99),
            "tag": EV_GAP,
            "val": "40 record(s) lost",
            "unit": "",
            "q": BAD,
            "info": {"reason": "drop_newest", "count": 40, "from_ts": 1, "to_ts": 2, "ranges": []},
        },
    )
    report, s = only_stream([*records, gap])
    assert report.ok and s.declared_lost == 40 and not s.explained


def test_verifier_forged_record_breaks_the_link() -> None:
    records = sealed(10)
    forged = copy.deepcopy(records[4])  # replaces seq 5
    forged["val"] = 99.0
    forged["prev"] = hashlib.sha256(b"not the real seq 4").digest()
    forged["hash"] = record_hash(forged)  # its own hash is valid
    assert check_record(forged) is None
    report, s = only_stream([*records[:4], forged, *records[5:]])
    assert not report.ok and not s.bad_records
    assert [seq for seq, _ in s.broken_links] == [5, 6]
    assert s.broken_links[0][1] == "prev does not match the hash of seq 4"
    assert "BROKEN LINK at seq 5" in report.summary()


def test_verifier_forged_record_with_the_right_prev_breaks_the_next_link() -> None:
    records = sealed(10)
    forged = copy.deepcopy(records[4])
    forged["val"] = 99.0
    forged["hash"] = record_hash(forged)
    report, s = only_stream([*records[:4], forged, *records[5:]])
    assert not report.ok and s.broken_links == [(6, "prev does not match the hash of seq 5")]


def test_verifier_forged_record_appended_after_the_head() -> None:
    records = sealed(10)
    forged = {**reading(10), "seq": 11, "prev": bytes(32)}
    forged["hash"] = record_hash(forged)
    report, s = only_stream([*records, forged])
    assert not report.ok and [seq for seq, _ in s.broken_links] == [11]


def test_verifier_first_record_must_link_to_zero() -> None:
    forged = {**reading(0), "seq": 1, "prev": b"\x01" * 32}
    forged["hash"] = record_hash(forged)
    report, s = only_stream([forged, *sealed(3)[1:]])
    assert not report.ok
    assert (1, "first record's prev is not 32 zero bytes") in s.broken_links


@pytest.mark.parametrize("forged_first", [False, True])
def test_verifier_same_seq_different_content_is_a_conflict(forged_first: bool) -> None:
    records = sealed(10)
    other = copy.deepcopy(records[3])
    other["val"] = 1.0
    other["hash"] = record_hash(other)  # a sound record, but not the one the chain holds
    pair = [other, records[3]] if forged_first else [records[3], other]
    report, s = only_stream(records[:3] + pair + records[4:])
    assert not report.ok and s.conflicts == [4]
    assert "CONFLICT seq 4" in report.summary()


@pytest.mark.parametrize("tampered_first", [False, True])
def test_verifier_tampered_copy_keeping_the_hash_is_reported(tampered_first: bool) -> None:
    records = sealed(10)
    tampered = copy.deepcopy(records[3])
    tampered["val"] = 1.0  # hash field left as it was
    pair = [tampered, records[3]] if tampered_first else [records[3], tampered]
    report, _ = only_stream(records[:3] + pair + records[4:])
    assert not report.ok


def test_verifier_reports_malformed_payloads_and_records() -> None:
    v = Verifier()
    v.add_payload(b"\xc1", "t/1")
    v.add({"gw": GW, "val": 1}, "t/2")
    for r in sealed(3):
        v.add(r)
    report = v.report()
    assert not report.ok and len(report.malformed) == 2
    assert report.malformed[0].startswith("t/1: payload is not valid msgpack")


# -- JSON lines -----------------------------------------------------------------------------
def test_json_lines_round_trip_preserves_hashes() -> None:
    records = _mixed_records()
    lines = [record_to_json(r) for r in records]
    back = [record_from_json(line) for line in lines]
    assert back == records
    for r, b in zip(records, back, strict=True):
        assert check_record(b) is None
        assert type(b["val"]) is type(r["val"])
        assert canonical_bytes(b) == canonical_bytes(r)
    assert math.copysign(1.0, back[1]["val"]) == -1.0  # -0.0 kept its sign
    v = Verifier()
    for line in lines:
        v.add(record_from_json(line))
    assert v.report().ok


def test_json_lines_round_trip_of_every_vector() -> None:
    for name, v in VECTORS.items():
        fields = vector_fields(v)
        fields["hash"] = record_hash(fields)
        back = record_from_json(record_to_json(fields))
        assert canonical_bytes(back) == canonical_bytes(fields), name


def test_json_lines_round_trip_preserves_nan_bits() -> None:
    (nan,) = struct.unpack(">f", bytes.fromhex("ffc00000"))  # what a Modbus float32 may hold
    rec = Chain().seal(DEV, {**reading(0), "val": nan})
    assert check_record(rec) is None
    assert check_record(record_from_json(record_to_json(rec))) is None


def test_json_lines_round_trip_keeps_the_default_nan() -> None:
    rec = Chain().seal(DEV, {**reading(0), "val": float("nan")})
    assert check_record(record_from_json(record_to_json(rec))) is None


def test_device_reported_unit_is_used_only_when_the_config_has_none() -> None:
    from gateway.config import DeviceConfig, TagConfig
    from gateway.driver import Reading
    from gateway.stream import DeviceStream

    dev = DeviceConfig(
        id="d", driver="x", tags=[TagConfig(name="a", unit="Cel"), TagConfig(name="b")]
    )
    stream = DeviceStream("gw", dev, outbox=None)  # type: ignore[arg-type]
    recs = stream.normalize([Reading("a", 1.0, unit="K"), Reading("b", 2.0, unit="g/L")], 1)
    assert [r["unit"] for r in recs] == ["Cel", "g/L"]
    assert stream.normalize([Reading("b", 3.0)], 2)[0]["unit"] == ""


def test_normalizer_builds_records_in_canonical_order() -> None:
    # The stream submits with canonical=True: sealing then packs its dicts
    # unchecked, so every layout it can produce must already be canonical.
    from gateway.config import DeviceConfig, TagConfig
    from gateway.driver import Reading
    from gateway.record import _is_canonical_layout
    from gateway.stream import DeviceStream

    dev = DeviceConfig(id="d", driver="x", tags=[TagConfig(name="t", unit="Cel")])
    stream = DeviceStream("gw", dev, outbox=None)  # type: ignore[arg-type]
    readings = [
        Reading("t", 1.5),
        Reading("t", None, BAD, status=2),
        Reading("t", 2, src_ts=7),
        Reading("t", "x", BAD, status="timeout", src_ts=8, unit="K"),
    ]
    records = stream.normalize(readings, 123)
    assert len(records) == 4
    assert all(_is_canonical_layout(tuple(r)) for r in records)
    back = decode_payload(Chain().seal_payload("d", records, canonical=True))
    assert all(record_hash(r) == r["hash"] for r in back)
