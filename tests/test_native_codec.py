"""Tests for dataplane.native.codec: round trips, format, interop with python-lz4, fuzzing, threads."""

from __future__ import annotations

import array
import base64
import mmap
import os
import random
import struct
import threading

import lz4.block
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.native import codec
from dataplane.native.codec import CodecError, PageEncoder

FUZZ = int(os.environ.get("DATAPLANE_FUZZ_EXAMPLES", "300"))
PAGE_SIZES = [1 << s for s in range(9, 17)]
MODES = ["auto", "on", "off"]
HEADER = struct.Struct("<4sBBHQII")

_WORDS = ("the of and to in is was for on that with as by at from this have not are but be or "
          "page dirty bitmap guest memory migration block device write read sector queue kernel "
          "error warning info debug request response client server disk volume snapshot").split()


def text(n: int, seed: int = 0) -> bytes:
    """Compressible, realistic-ish text: words from a vocabulary plus numbers."""
    rng = random.Random(seed)
    out = []
    size = 0
    while size <= n:
        w = rng.choice(_WORDS) if rng.random() < 0.85 else str(rng.randrange(100000))
        out.append(w)
        size += len(w) + 1
    return " ".join(out).encode()[:n]


def mixed(npages: int, page_size: int = 4096, seed: int = 0, tail: int = 0) -> bytes:
    rng = random.Random(seed)
    parts = []
    for i in range(npages):
        kind = rng.choice("zztr")
        if kind == "z":
            parts.append(bytes(page_size))
        elif kind == "t":
            parts.append(text(page_size, seed * 1000 + i))
        else:
            parts.append(rng.randbytes(page_size))
    parts.append(rng.randbytes(tail))
    return b"".join(parts)


# ---------------------------------------------------------------- reference parser

def parse(body: bytes) -> tuple[dict, list[tuple[str, int, int, bytes]]]:
    """Independent parser of the documented body format (docs/native.md)."""
    magic, version, shift, flags, size, nrec, reserved = HEADER.unpack_from(body, 0)
    assert (magic, version, flags, reserved) == (b"DPPC", 1, 0, 0)
    hdr = {"page_size": 1 << shift, "size": size, "records": nrec}
    p, pos, recs = 24, 0, []
    for _ in range(nrec):
        kind = body[p]
        ln = int.from_bytes(body[p + 1:p + 5], "little")
        if kind == 0:
            recs.append(("zero", pos, ln, b""))
            p += 5
        elif kind == 1:
            recs.append(("raw", pos, ln, body[p + 5:p + 5 + ln]))
            p += 5 + ln
        elif kind == 2:
            clen = int.from_bytes(body[p + 5:p + 9], "little")
            recs.append(("lz4", pos, ln, body[p + 9:p + 9 + clen]))
            p += 9 + clen
        else:
            raise AssertionError(f"record type {kind}")
        pos += ln
    assert p == len(body) and pos == size
    return hdr, recs


def ref_decode(body: bytes) -> bytes:
    """Decode with python-lz4 only (interop: our LZ4 payloads are plain LZ4 blocks)."""
    _, recs = parse(body)
    out = []
    for kind, _, ln, payload in recs:
        if kind == "zero":
            out.append(bytes(ln))
        elif kind == "raw":
            out.append(payload)
        else:
            out.append(lz4.block.decompress(payload, uncompressed_size=ln))
    return b"".join(out)


def check_body(data: bytes, body: bytes, page_size: int, mode: str) -> None:
    """Every invariant the format promises, checked against the input."""
    hdr, recs = parse(body)
    assert hdr["page_size"] == page_size and hdr["size"] == len(data)
    assert len(body) <= codec.max_encoded_size(len(data), page_size)
    for i, (kind, pos, ln, payload) in enumerate(recs):
        assert ln > 0 and pos % page_size == 0
        if i + 1 < len(recs):
            assert ln % page_size == 0
        chunk = data[pos:pos + ln]
        pages = [chunk[j:j + page_size] for j in range(0, ln, page_size)]
        if kind == "zero":
            assert not any(chunk)
        else:
            assert ln <= codec.MAX_DATA_RECORD
            assert all(any(pg) for pg in pages), "zero page not elided"
        if kind == "raw":
            assert payload == chunk
        if kind == "lz4":
            assert mode != "off"
            assert 0 < len(payload) < ln
            assert lz4.block.decompress(payload, uncompressed_size=ln) == chunk
    assert ref_decode(body) == data


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_round_trip_all_page_sizes(mode, page_size):
    data = mixed(12, page_size, seed=page_size, tail=page_size // 3)
    body = codec.encode(data, page_size, mode)
    check_body(data, body, page_size, mode)
    assert codec.decode(body, len(data)) == data
    assert codec.decoded_size(body) == len(data)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("data", [
    b"", b"\0", b"\1", bytes(4096), bytes(4097), b"\0" * 4095 + b"\1", text(3 * 4096), os.urandom(10000),
    bytes(5 << 20), text(3 << 20, 9), os.urandom(3 << 20),
], ids=["empty", "zero1", "one1", "zeropage", "zero4097", "lastbyte", "text", "random", "zero5M",
        "text3M", "random3M"])
def test_round_trip_kinds(mode, data):
    body = codec.encode(data, mode=mode)
    check_body(data, body, 4096, mode)
    assert codec.decode(body, len(data)) == data


def test_large_mixed_record_caps():
    # long runs are split at MAX_DATA_RECORD, zero runs stay one record
    data = bytes(3 << 20) + text(3 << 20, 1) + os.urandom(2 << 20) + bytes(100)
    for mode in MODES:
        body = codec.encode(data, mode=mode)
        check_body(data, body, 4096, mode)
        _, recs = parse(body)
        assert recs[0] == ("zero", 0, 3 << 20, b"")
        assert max(r[2] for r in recs if r[0] != "zero") == codec.MAX_DATA_RECORD


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from("ztr"), st.integers(1, 4)), max_size=10),
       st.integers(0, 600), st.sampled_from([512, 1024, 4096]), st.sampled_from(MODES), st.integers(0, 2**32))
def test_round_trip_hypothesis(runs, tail, page_size, mode, seed):
    rng = random.Random(seed)
    parts = []
    for kind, n in runs:
        if kind == "z":
            parts.append(bytes(n * page_size))
        elif kind == "t":
            parts.append(text(n * page_size, seed))
        else:
            parts.append(rng.randbytes(n * page_size))
    parts.append(rng.randbytes(tail) if rng.random() < 0.5 else bytes(tail))
    data = b"".join(parts)
    body = codec.encode(data, page_size, mode)
    check_body(data, body, page_size, mode)
    assert codec.decode(body, len(data)) == data
    out = bytearray(len(data) + 7)
    assert codec.decode_into(body, out) == len(data) and out[:len(data)] == data


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=20000), st.sampled_from(MODES))
def test_round_trip_arbitrary_bytes(data, mode):
    body = codec.encode(data, 512, mode)
    assert codec.decode(body, len(data)) == data
    assert ref_decode(body) == data


def test_every_simd_level_same_output():
    data = mixed(40, seed=3, tail=100)
    bodies = set()
    for lvl in ["generic", "sse", "avx2"]:
        codec._set_simd_level(lvl)
        bodies.add(codec.encode(data))
    codec._set_simd_level("best")
    assert len(bodies) == 1
    assert codec.decode(bodies.pop(), len(data)) == data


# ---------------------------------------------------------------- modes and adaptivity

def test_mode_off_never_compresses():
    data = text(64 * 1024) + bytes(8192) + text(4096)
    enc = PageEncoder(mode="off")
    body = enc.encode(data)
    _, recs = parse(body)
    assert [r[0] for r in recs] == ["raw", "zero", "raw"]
    assert enc.lz4_runs == 0 and enc.zero_pages == 2 and enc.probes == 0


def test_mode_on_always_tries():
    data = os.urandom(8192) + text(8192)
    enc = PageEncoder(mode="on")
    _, recs = parse(enc.encode(data))
    assert enc.probes == 0 and enc.lz4_rejected == 0 and [r[0] for r in recs] == ["lz4"]


def test_auto_skips_random_and_compresses_text():
    data = os.urandom(16 * 4096) + bytes(4096) + text(16 * 4096) + os.urandom(4096)
    enc = PageEncoder()
    body = enc.encode(data)
    _, recs = parse(body)
    assert [r[0] for r in recs] == ["raw", "zero", "lz4", "raw"]
    assert enc.skipped_by_sampling == 17 and enc.probes == 33 and enc.lz4_rejected == 0
    assert enc.raw_bytes == len(data) and enc.encoded_bytes == len(body)
    assert enc.zero_pages == 1 and enc.zero_runs == 1 and enc.lz4_runs == 1 and enc.raw_runs == 2
    assert enc.lz4_bytes_in == 16 * 4096 and enc.lz4_bytes_out < 16 * 4096 * 0.8
    st_ = enc.stats()
    assert st_["calls"] == 1 and st_["lz4_runs"] == 1
    enc.reset_stats()
    assert enc.calls == 0 and enc.raw_bytes == 0


def test_probe_hook():
    d, n, ok = codec._probe_stats(os.urandom(4096))
    assert n == 128 and d > 80 and not ok
    d, n, ok = codec._probe_stats(text(4096))
    assert d < 50 and ok
    assert codec._probe_stats(b"ab")[2] is False  # too small to be worth it


def test_probe_pages_counts_compressible_and_zero_pages():
    mixed = os.urandom(3 * 4096) + text(4096) + bytes(4096) + os.urandom(100)
    assert codec.probe_pages(mixed) == (6, 2)  # a text page and a zero page; the short random tail is not
    assert codec.probe_pages(os.urandom(1 << 20)) == (256, 0)
    assert codec.probe_pages(bytes(8192), page_size=1024) == (8, 8)
    assert codec.probe_pages(b"") == (0, 0)
    # every 2nd page from the first: pages 0 (random), 2 (random), 4 (zero)
    assert codec.probe_pages(mixed, stride=2) == (3, 1)
    assert codec.probe_pages(mixed, stride=100) == (1, 0)
    with pytest.raises(ValueError):
        codec.probe_pages(b"x", page_size=3000)
    with pytest.raises(ValueError):
        codec.probe_pages(b"x", stride=0)


def test_auto_backs_off_and_reprobes():
    # base64 looks diverse enough to pass the probe but LZ4 cannot shrink it
    b64 = base64.b64encode(os.urandom(6 << 20))[:8 << 20]
    enc = PageEncoder()
    body = enc.encode(b64)
    assert codec.decode(body, len(b64)) == b64
    assert enc.lz4_rejected >= 2            # probe said yes, LZ4 said no (twice)
    assert enc.skipped_by_sampling > 0      # then it backed off without trying
    tried = enc.lz4_rejected
    skipped = enc.skipped_by_sampling
    # compressible data after the back-off: compression resumes after re-probing
    data = text(8 << 20, 5)
    body = enc.encode(data)
    assert codec.decode(body, len(data)) == data
    assert enc.lz4_runs > 0
    assert enc.skipped_by_sampling - skipped < (8 << 20) // 4096
    assert enc.lz4_rejected == tried
    assert enc.backoff_bytes == 0


def test_encoder_state_persists_across_calls():
    enc = PageEncoder()
    b64 = base64.b64encode(os.urandom(3 << 20))[:4 << 20]
    for _ in range(3):
        enc.encode(b64[:1 << 20])
    assert enc.calls == 3
    assert enc.backoff_bytes > 0 or enc.skipped_by_sampling > 0


# ---------------------------------------------------------------- API, buffers, errors

def test_buffers_readonly_mmap_slices(tmp_path):
    data = mixed(8, tail=123, seed=11)
    body = codec.encode(data)
    path = tmp_path / "data"
    path.write_bytes(data)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert codec.encode(m) == body
        assert codec.encode(memoryview(m)[4096:]) == codec.encode(data[4096:])
    assert codec.encode(bytearray(data)) == body
    assert codec.encode(memoryview(data)) == body
    assert codec.encode(memoryview(bytearray(data)).toreadonly()) == body
    arr = array.array("B", data)
    assert codec.encode(arr) == body
    # the body itself can be any buffer as well
    assert codec.decode(memoryview(body), len(data)) == data
    assert codec.decode(bytearray(body), len(data)) == data
    bpath = tmp_path / "body"
    bpath.write_bytes(body)
    with bpath.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert codec.decode(m, len(data)) == data
        assert codec.decoded_size(m) == len(data)


def test_non_contiguous_and_non_buffers():
    nc = memoryview(bytearray(8192))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        codec.encode(nc)
    with pytest.raises(ValueError, match="contiguous"):
        codec.decode(nc, 100)
    with pytest.raises(ValueError, match="contiguous"):
        codec.lz4_compress_block(nc)
    for bad in ("str", 5, None, [1, 2]):
        with pytest.raises(TypeError):
            codec.encode(bad)
        with pytest.raises(TypeError):
            codec.decode(bad, 10)
    body = codec.encode(bytes(100))
    with pytest.raises(TypeError, match="writable"):
        codec.decode_into(body, bytes(100))
    with pytest.raises(ValueError, match="contiguous"):
        codec.decode_into(body, memoryview(bytearray(400))[::2])


def test_parameter_validation():
    for ps in (0, 256, 511, 1000, 1 << 21):
        with pytest.raises(ValueError):
            PageEncoder(page_size=ps)
        with pytest.raises(ValueError):
            codec.max_encoded_size(10, ps)
    with pytest.raises(ValueError):
        PageEncoder(mode="fast")
    with pytest.raises(ValueError):
        PageEncoder(acceleration=0)
    with pytest.raises(ValueError):
        codec.lz4_compress_block(b"x", acceleration=70000)
    with pytest.raises(ValueError):
        codec.max_encoded_size(-1)
    with pytest.raises(ValueError):
        codec.decode(codec.encode(b""), -1)
    with pytest.raises(ValueError):
        codec.lz4_decompress_block(b"\0", -1)
    for call in (lambda: PageEncoder(acceleration="1"), lambda: PageEncoder(page_size=4096.0),
                 lambda: codec.decode(b"", "10"), lambda: codec.max_encoded_size(1.5),
                 lambda: codec.lz4_decompress_block(b"", None)):
        with pytest.raises(TypeError):
            call()
    enc = PageEncoder(8192, "on", 4)
    assert (enc.page_size, enc.mode, enc.acceleration) == (8192, "on", 4)
    assert "PageEncoder" in repr(enc)


def test_max_encoded_size_is_a_bound():
    for ps in (512, 4096, 65536):
        # worst case: alternating zero / incompressible pages, partial tail
        rng = random.Random(ps)
        data = b"".join(bytes(ps) if i % 2 else rng.randbytes(ps) for i in range(21)) + rng.randbytes(7)
        for mode in MODES:
            assert len(codec.encode(data, ps, mode)) <= codec.max_encoded_size(len(data), ps)
    assert codec.max_encoded_size(0) == codec.HEADER_SIZE


def test_encode_into():
    data = mixed(20, seed=2)
    enc = PageEncoder()
    out = bytearray(codec.max_encoded_size(len(data)))
    n = enc.encode_into(data, out)
    assert bytes(out[:n]) == codec.encode(data)
    with pytest.raises(ValueError, match="max_encoded_size"):
        enc.encode_into(data, bytearray(len(data)))
    with pytest.raises(TypeError):
        enc.encode_into(data, bytes(len(out)))
    shared = bytearray(len(data) + len(out))
    shared[:len(data)] = data
    mv = memoryview(shared)
    with pytest.raises(ValueError, match="overlap"):
        enc.encode_into(mv[:len(data)], mv[len(data) - 1:])
    assert enc.encode_into(mv[:len(data)], mv[len(data):]) == n


def test_decode_into_overlap_rejected():
    body = codec.encode(text(9000))
    buf = bytearray(body) + bytearray(9000)
    mv = memoryview(buf)
    with pytest.raises(ValueError, match="overlap"):
        codec.decode_into(mv[:len(body)], mv[10:])
    assert codec.decode_into(mv[:len(body)], mv[len(body):]) == 9000
    assert bytes(mv[len(body):]) == text(9000)


def test_decode_limits_and_decode_into():
    data = text(10000) + bytes(9000)
    body = codec.encode(data)
    assert codec.decode(body, len(data)) == data
    with pytest.raises(CodecError, match="max_size"):
        codec.decode(body, len(data) - 1)
    out = bytearray(b"\xaa" * (len(data) + 50))
    assert codec.decode_into(body, out) == len(data)
    assert out[:len(data)] == data and out[len(data):] == b"\xaa" * 50
    small = bytearray(len(data) - 1)
    with pytest.raises(CodecError, match="output buffer"):
        codec.decode_into(body, small)
    assert small == bytearray(len(data) - 1)
    assert issubclass(CodecError, ValueError)


@pytest.mark.parametrize("patch,msg", [
    ((0, b"XXXX"), "magic"),
    ((4, b"\x02"), "version"),
    ((5, b"\x08"), "page size"),
    ((5, b"\x15"), "page size"),
    ((6, b"\x01"), "reserved"),
    ((20, b"\x01"), "reserved"),
    ((16, b"\xff\xff\xff\x7f"), "records"),
])
def test_header_validation(patch, msg):
    body = bytearray(codec.encode(text(20000)))
    off, value = patch
    body[off:off + len(value)] = value
    with pytest.raises(CodecError, match=msg):
        codec.decoded_size(body)
    with pytest.raises(CodecError, match=msg):
        codec.decode(body, 1 << 30)


def test_truncated_everywhere():
    data = mixed(6, seed=4, tail=10)
    body = codec.encode(data)
    for cut in range(len(body)):
        with pytest.raises(CodecError):
            codec.decode(body[:cut], len(data))
    with pytest.raises(CodecError, match="after the last record"):
        codec.decode(body + b"\0", len(data))


def _records(body: bytes) -> list[tuple[int, int]]:
    """(body offset, type) of each record."""
    _, recs = parse(body)
    p, out = 24, []
    for kind, _, _, payload in recs:
        out.append((p, {"zero": 0, "raw": 1, "lz4": 2}[kind]))
        p += {"zero": 5, "raw": 5, "lz4": 9}[kind] + len(payload)
    return out


def test_length_field_tampering_messages():
    data = bytes(8192) + text(3 * 4096) + os.urandom(4096)
    body = codec.encode(data)
    recs = _records(body)
    assert [t for _, t in recs] == [0, 2, 1]
    cases = [
        (recs[0][0], b"\x07", "unknown record type"),
        (recs[0][0] + 1, struct.pack("<I", 0), "zero-length"),
        (recs[0][0] + 1, struct.pack("<I", 1 << 30), "runs past"),
        (recs[0][0] + 1, struct.pack("<I", 4095), "multiple of the page size"),
        (recs[1][0] + 5, struct.pack("<I", 0), "stored size"),
        (recs[1][0] + 5, struct.pack("<I", 1 << 20), "stored size"),
        (recs[1][0] + 5, struct.pack("<I", 12300), "truncated"),
        (recs[1][0] + 9, b"\xff\xff\xff\xff", "corrupt LZ4"),
        (recs[2][0] + 1, struct.pack("<I", 8192), "runs past"),
    ]
    for off, value, msg in cases:
        bad = bytearray(body)
        bad[off:off + len(value)] = value
        with pytest.raises(CodecError, match=msg):
            codec.decode(bad, len(data))
    bad = bytearray(body)
    bad[16:20] = struct.pack("<I", 2)  # fewer records than the body holds
    with pytest.raises(CodecError, match="unexpected bytes"):
        codec.decode(bad, len(data))
    bad[16:20] = struct.pack("<I", 4)  # more records than the body holds
    with pytest.raises(CodecError, match="truncated"):
        codec.decode(bad, len(data))
    bad = bytearray(body)
    bad[8:16] = struct.pack("<Q", len(data) + 4096)  # records cover less than declared
    with pytest.raises(CodecError, match="cover"):
        codec.decode(bad, len(data) + 4096)


# ---------------------------------------------------------------- fuzzing

_SEEDS = [
    codec.encode(b""),
    codec.encode(bytes(3000), 512),
    codec.encode(bytes(4096) + text(8192, 1) + os.urandom(4096) + bytes(4096) + b"tail", 4096),
    codec.encode(text(5000, 2), 512, "on"),
    codec.encode(mixed(6, 1024, seed=8, tail=77), 1024, "off"),
    codec.encode(mixed(10, 512, seed=9, tail=300), 512),
]
_ORIGINALS = [codec.decode(b, 1 << 20) for b in _SEEDS]


@st.composite
def mutated_bodies(draw):
    idx = draw(st.integers(0, len(_SEEDS) - 1))
    body = bytearray(_SEEDS[idx])
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "byte", "truncate", "length", "insert", "delete", "header"]))
        if how == "flip" and body:
            i = draw(st.integers(0, len(body) - 1))
            body[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "byte" and body:
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        elif how == "truncate":
            body = body[:draw(st.integers(0, len(body)))]
        elif how == "length" and len(body) > 24:
            # overwrite a 32-bit field right after a plausible record start
            i = draw(st.integers(24, len(body) - 1))
            value = draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 511, 512, 4095, 4096,
                                                                                 1 << 20, (1 << 20) + 1])))
            body[i:i + 4] = struct.pack("<I", value)[:len(body) - i]
        elif how == "insert":
            i = draw(st.integers(0, len(body)))
            body[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete" and body:
            i = draw(st.integers(0, len(body) - 1))
            del body[i:i + draw(st.integers(1, 8))]
        elif how == "header" and len(body) >= 24:
            field = draw(st.sampled_from([(8, "<Q"), (16, "<I"), (5, "<B")]))
            body[field[0]:field[0] + struct.calcsize(field[1])] = struct.pack(
                field[1], draw(st.integers(0, 2 ** (8 * struct.calcsize(field[1])) - 1)))
    return idx, bytes(body)


def _decode_checked(body: bytes, max_size: int) -> None:
    try:
        out = codec.decode(body, max_size)
    except CodecError:
        pass
    else:
        assert len(out) == codec.decoded_size(body) <= max_size
    guard = 64
    buf = bytearray(b"\xa5" * (max_size + guard))
    try:
        n = codec.decode_into(body, memoryview(buf)[:max_size])
    except CodecError:
        n = None
    else:
        assert n == codec.decoded_size(body) <= max_size
    assert buf[max_size:] == b"\xa5" * guard, "wrote past the output buffer"


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_bodies(), st.sampled_from([0, 100, 4096, 1 << 16]))
def test_decoder_fuzz_mutations(case, extra):
    idx, body = case
    _decode_checked(body, len(_ORIGINALS[idx]) + extra)


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(0, 2**20), st.integers(0, 40), st.integers(9, 12))
def test_decoder_fuzz_random_records(records, size, nrec, shift):
    body = HEADER.pack(b"DPPC", 1, shift, 0, size, nrec, 0) + records
    _decode_checked(body, 1 << 16)


@settings(max_examples=FUZZ, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_fuzz_arbitrary(body):
    _decode_checked(body, 4096)


# ---------------------------------------------------------------- raw LZ4 blocks / interop

@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=5000), st.integers(0, 20000).map(lambda n: text(n, n))),
       st.integers(1, 20))
def test_lz4_block_interop(data, acceleration):
    ours = codec.lz4_compress_block(data, acceleration)
    assert lz4.block.decompress(ours, uncompressed_size=len(data)) == data
    theirs = lz4.block.compress(data, store_size=False)
    assert codec.lz4_decompress_block(theirs, len(data)) == data
    assert codec.lz4_decompress_block(ours, len(data)) == data


def test_lz4_block_errors():
    block = codec.lz4_compress_block(text(5000))
    with pytest.raises(CodecError):
        codec.lz4_decompress_block(block, 4999)
    with pytest.raises(CodecError):
        codec.lz4_decompress_block(block, 5001)
    with pytest.raises(CodecError):
        codec.lz4_decompress_block(block[:-5], 5000)
    with pytest.raises(CodecError):
        codec.lz4_decompress_block(b"\xff" * 20, 100)
    assert codec.lz4_decompress_block(codec.lz4_compress_block(b""), 0) == b""
    assert codec.lz4_version().startswith("1.")


def test_codec_lz4_payloads_decode_with_python_lz4():
    data = text(300 * 1024, 3) + bytes(4096) + text(5000, 4)
    body = codec.encode(data)
    _, recs = parse(body)
    lz4_recs = [r for r in recs if r[0] == "lz4"]
    assert len(lz4_recs) == 2
    for _, pos, ln, payload in lz4_recs:
        assert lz4.block.decompress(payload, uncompressed_size=ln) == data[pos:pos + ln]


# ---------------------------------------------------------------- threads

def test_two_threads_encode_concurrently():
    bufs = [mixed(300, seed=s, tail=s * 100) for s in (21, 22)]
    expect = [codec.encode(b) for b in bufs]
    results: dict[int, list[bytes]] = {0: [], 1: []}
    errors = []

    def work(i: int) -> None:
        try:
            enc = PageEncoder()
            for _ in range(4):
                results[i].append(enc.encode(bufs[i]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in (0, 1):
        for body in results[i]:
            assert body == expect[i]
            assert codec.decode(body, len(bufs[i])) == bufs[i]


def test_shared_encoder_is_serialised():
    enc = PageEncoder()
    bufs = [mixed(100, seed=s) for s in range(4)]
    out: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        for _ in range(3):
            body = enc.encode(bufs[i])
            with lock:
                out.append((i, body))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 12 and enc.calls == 12
    for i, body in out:
        assert codec.decode(body, len(bufs[i])) == bufs[i]


@pytest.mark.parametrize("level", ["generic", "sse", "avx2"])
def test_zero_map_window_boundaries(level):
    # the encoder classifies pages in windows of 2048 pages; put every kind of
    # page around the window edges (512-byte pages: windows of 1 MiB)
    ps = 512
    rng = random.Random(99)
    pages = [bytes(ps)] * 4500
    for pg in (0, 1, 2046, 2047, 2048, 2049, 4095, 4096, 4097, 4499):
        pages[pg] = rng.choice([rng.randbytes(ps), text(ps, pg), b"\0" * (ps - 1) + b"\1"])
    data = b"".join(pages) + b"\0" * 77
    codec._set_simd_level(level)
    try:
        for mode in MODES:
            body = codec.encode(data, ps, mode)
            check_body(data, body, ps, mode)
            assert codec.decode(body, len(data)) == data
    finally:
        codec._set_simd_level("best")
