"""Tests for dataplane.native.bitmap.Bitmap against a list-of-bools reference model."""

from __future__ import annotations

import array
import copy
import pickle
import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.native import bitmap as bitmap_mod
from dataplane.native.bitmap import Bitmap

LEVELS = ["generic", "sse", "avx2"]
FUZZ = int(__import__("os").environ.get("DATAPLANE_FUZZ_EXAMPLES", "300"))


class Ref:
    """Obvious reference: one bool per block."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.g = granularity
        self.bits = [False] * (-(-size // granularity))

    def blocks(self, offset: int, length: int) -> range:
        if length == 0:
            return range(0)
        return range(offset // self.g, (offset + length - 1) // self.g + 1)

    def set(self, offset: int, length: int) -> None:
        for b in self.blocks(offset, length):
            self.bits[b] = True

    def clear(self, offset: int, length: int) -> None:
        for b in self.blocks(offset, length):
            self.bits[b] = False

    def any(self, offset: int, length: int) -> bool:
        return any(self.bits[b] for b in self.blocks(offset, length))

    def all(self, offset: int, length: int) -> bool:
        return all(self.bits[b] for b in self.blocks(offset, length))

    def extents(self, max_length: int | None = None) -> list[tuple[int, int]]:
        out = []
        i, n = 0, len(self.bits)
        while i < n:
            if not self.bits[i]:
                i += 1
                continue
            j = i
            while j < n and self.bits[j]:
                j += 1
            start, end = i * self.g, min(j * self.g, self.size)
            while start < end:
                ln = end - start if max_length is None else min(max_length, end - start)
                out.append((start, ln))
                start += ln
            i = j
        return out


def bits(bm: Bitmap) -> list[bool]:
    return [bm.test_bit(i) for i in range(bm.nbits)]


@pytest.fixture(params=LEVELS)
def level(request):
    """Run once per kernel level (capped at what the CPU supports; never skipped)."""
    yield bitmap_mod._set_simd_level(request.param)
    bitmap_mod._set_simd_level("best")


# ---------------------------------------------------------------- construction

def test_properties():
    bm = Bitmap(10 * 65536 + 1)
    assert (bm.size, bm.granularity, bm.nbits, bm.count()) == (655361, 65536, 11, 0)
    assert Bitmap(0, 512).nbits == 0
    assert Bitmap(1, 1).nbits == 1
    assert Bitmap(100, 1).nbits == 100


@pytest.mark.parametrize("gran", [0, 3, 6, 1000, 65535, (1 << 32) + 1, 1 << 33])
def test_bad_granularity(gran):
    with pytest.raises(ValueError, match="granularity"):
        Bitmap(1 << 20, gran)


def test_bad_size():
    with pytest.raises(ValueError):
        Bitmap(-1)
    with pytest.raises(ValueError):
        Bitmap((1 << 62) + 1, 1 << 20)
    with pytest.raises(TypeError):
        Bitmap(1.5)
    with pytest.raises(TypeError):
        Bitmap("10")


# ---------------------------------------------------------------- byte ranges

def test_ranges_crossing_word_boundaries(level):
    g = 512
    n = 300
    for lo in (0, 1, 62, 63, 64, 65, 127, 128, 129, 191, 250):
        for hi in (lo + 1, lo + 2, 64, 65, 127, 128, 129, 192, 193, 256, 299, 300):
            if hi <= lo:
                continue
            bm, ref = Bitmap(n * g, g), Ref(n * g, g)
            bm.set(lo * g, (hi - lo) * g)
            ref.set(lo * g, (hi - lo) * g)
            assert bits(bm) == ref.bits, (lo, hi)
            assert bm.count() == hi - lo
            assert bm.all(lo * g, (hi - lo) * g) and bm.all(0, n * g) == (hi - lo == n)
            assert bm.any(lo * g, 1) and not bm.any(0, lo * g)
            assert bm.to_extents() == ref.extents()
            bm.set_all()
            bm.clear(lo * g + 1, (hi - lo) * g - 2 if hi - lo > 1 else 1)
            ref.bits = [True] * n
            ref.clear(lo * g + 1, (hi - lo) * g - 2 if hi - lo > 1 else 1)
            assert bits(bm) == ref.bits, (lo, hi)
            assert bm.to_extents() == ref.extents()


def test_unaligned_byte_ranges_touch_every_block():
    bm = Bitmap(10_000, 1024)
    bm.set(1023, 2)  # touches blocks 0 and 1
    assert bits(bm)[:3] == [True, True, False]
    bm.clear(1024, 1)
    assert bits(bm)[:3] == [True, False, False]
    bm.set(9999, 1)
    assert bm.test(9999) and bm.test(9216) and not bm.test(9215)
    bm.set(5000, 0)  # empty range: no-op
    assert bm.count() == 2


def test_range_validation():
    bm = Bitmap(4096, 512)
    with pytest.raises(ValueError):
        bm.set(4000, 97)
    with pytest.raises(ValueError):
        bm.set(-1, 1)
    with pytest.raises(ValueError):
        bm.clear(0, -5)
    with pytest.raises(ValueError):
        bm.test(4096)
    with pytest.raises(ValueError):
        bm.any(5000, 0)
    with pytest.raises(TypeError):
        bm.set("0", 1)
    bm.set(4096, 0)  # empty range at the end is fine
    assert bm.any(0) is False and bm.all(0, 0) is True and bm.any(0, 0) is False


def test_bit_helpers():
    bm = Bitmap(130 * 4096, 4096)
    bm.set_bit(0)
    bm.set_bit(64)
    bm.set_bit(129)
    assert bm.test_bit(64) and not bm.test_bit(63)
    bm.clear_bit(64)
    assert not bm.test_bit(64)
    assert bm.next_set_bit(0) == 0 and bm.next_set_bit(1) == 129 and bm.next_set_bit(130) == -1
    assert bm.next_clear_bit(0) == 1
    bm.set_all()
    assert bm.next_clear_bit(0) == -1
    assert bm.count() == 130
    with pytest.raises(IndexError):
        bm.set_bit(130)
    with pytest.raises(IndexError):
        bm.test_bit(1 << 40)


def test_set_all_keeps_tail_clear():
    for nbits in (1, 63, 64, 65, 127, 128, 1000):
        bm = Bitmap(nbits * 512 - 100, 512)
        bm.set_all()
        assert bm.count() == nbits
        assert bm.to_extents() == [(0, nbits * 512 - 100)]
        assert Bitmap.from_bytes(bm.to_bytes()) == bm
        bm.clear_all()
        assert bm.count() == 0 and bm.to_extents() == []


# ---------------------------------------------------------------- model-based

@st.composite
def op_sequences(draw):
    g = draw(st.sampled_from([1, 2, 512, 4096, 65536]))
    nbits = draw(st.integers(0, 400))
    size = max(0, nbits * g - draw(st.integers(0, g - 1)))
    ops = []
    for _ in range(draw(st.integers(0, 25))):
        off = draw(st.integers(0, size))
        ln = draw(st.integers(0, size - off))
        ops.append((draw(st.sampled_from(["set", "set", "clear"])), off, ln))
    return size, g, ops


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_sequences(), st.randoms(use_true_random=False))
def test_model(case, rnd):
    size, g, ops = case
    bm, ref = Bitmap(size, g), Ref(size, g)
    for op, off, ln in ops:
        getattr(bm, op)(off, ln)
        getattr(ref, op)(off, ln)
        assert bm._summary_ok()
    assert bits(bm) == ref.bits
    assert bm.count() == sum(ref.bits)
    assert bm.to_extents() == ref.extents()
    assert list(bm.extents()) == ref.extents()
    ea = bm.extents_array()
    assert ea.typecode == "Q" and list(ea) == [x for e in ref.extents() for x in e]
    for _ in range(5):
        off = rnd.randint(0, size)
        ln = rnd.randint(0, size - off)
        assert bm.any(off, ln) == ref.any(off, ln)
        assert bm.all(off, ln) == ref.all(off, ln)
        if off < size:
            assert bm.test(off) == ref.bits[off // g]
    if ref.bits:
        k = rnd.randint(1, 70)
        assert bm.to_extents(k * g) == ref.extents(k * g)
        assert bm.next_set_bit(0) == (ref.bits.index(True) if True in ref.bits else -1)
    assert Bitmap.from_bytes(bm.to_bytes()) == bm
    assert Bitmap.from_extents(size, g, bm.to_extents()) == bm


def test_random_large_against_reference(level):
    rng = random.Random(7)
    for _ in range(8):
        nbits = rng.randint(1, 20000)
        g = 4096
        size = nbits * g
        bm, ref = Bitmap(size, g), Ref(size, g)
        for _ in range(rng.randint(0, 300)):
            b = rng.randrange(nbits)
            ln = rng.choice([1, 2, rng.randint(1, 64), rng.randint(1, 2000)])
            ln = min(ln, nbits - b)
            op = rng.choice(["set", "set", "clear"])
            getattr(bm, op)(b * g, ln * g)
            getattr(ref, op)(b * g, ln * g)
        assert bm.to_extents() == ref.extents()
        assert bm.to_extents(64 * g) == ref.extents(64 * g)
        assert bm.count() == sum(ref.bits)


# ---------------------------------------------------------------- extents

def test_extents_max_length_cutting():
    g = 4096
    bm = Bitmap(1000 * g, g)
    bm.set(10 * g, 130 * g)
    assert bm.to_extents(64 * g) == [(10 * g, 64 * g), (74 * g, 64 * g), (138 * g, 2 * g)]
    assert bm.to_extents(g) == [((10 + i) * g, g) for i in range(130)]
    assert bm.to_extents() == [(10 * g, 130 * g)]
    for bad in (0, g - 1, g + 1, 3 * g // 2, -g):
        with pytest.raises(ValueError):
            bm.extents_array(bad)
        with pytest.raises(ValueError):
            bm.extents(bad)


def test_extents_clip_last_to_size():
    bm = Bitmap(10 * 4096 + 5, 4096)
    bm.set(9 * 4096, 4096 + 5)
    assert bm.to_extents() == [(9 * 4096, 4096 + 5)]
    assert bm.to_extents(4096) == [(9 * 4096, 4096), (10 * 4096, 5)]


def test_extents_full_and_word_edges():
    bm = Bitmap(256 * 512, 512)
    bm.set_all()
    assert bm.to_extents() == [(0, 256 * 512)]
    bm.clear(63 * 512, 2 * 512)
    assert bm.to_extents() == [(0, 63 * 512), (65 * 512, 191 * 512)]
    e = bm.extents()
    assert next(e) == (0, 63 * 512)


def test_extents_array_is_flat_q():
    bm = Bitmap(1 << 20, 4096)
    bm.set(0, 4096)
    bm.set(8192, 4096)
    a = bm.extents_array()
    assert isinstance(a, array.array) and a.typecode == "Q"
    assert a.tolist() == [0, 4096, 8192, 4096]


def test_from_extents_to_extents_round_trip():
    g = 65536
    ext = [(0, g), (3 * g, 5 * g), (100 * g, g)]
    bm = Bitmap.from_extents(200 * g, g, ext)
    assert bm.to_extents() == ext
    # NBD-style extents that are not block aligned set every touched block
    bm2 = Bitmap.from_extents(200 * g, g, [(g - 1, 2), (10 * g + 5, 10)])
    assert bm2.to_extents() == [(0, 2 * g), (10 * g, g)]
    with pytest.raises(ValueError):
        Bitmap.from_extents(10 * g, g, [(9 * g, 2 * g)])
    with pytest.raises(ValueError):
        Bitmap.from_extents(10 * g, g, [(1, 2, 3)])
    with pytest.raises(ValueError):
        Bitmap.from_extents(10 * g, g, [5])


# ---------------------------------------------------------------- set ops

def test_ior_andnot():
    a = Bitmap.from_extents(100 * 512, 512, [(0, 10 * 512), (50 * 512, 512)])
    b = Bitmap.from_extents(100 * 512, 512, [(5 * 512, 10 * 512)])
    c = a.copy()
    c |= b
    assert c.to_extents() == [(0, 15 * 512), (50 * 512, 512)]
    assert (a | b) == c and a.count() == 11  # __or__ leaves a alone
    assert a.copy().ior(b) == c
    d = c.copy().andnot(b)
    assert d.to_extents() == [(0, 5 * 512), (50 * 512, 512)]
    assert c._summary_ok() and d._summary_ok()
    with pytest.raises(ValueError):
        a.ior(Bitmap(100 * 512, 1024))
    with pytest.raises(ValueError):
        a.andnot(Bitmap(99 * 512, 512))
    with pytest.raises(TypeError):
        a.ior(None)
    with pytest.raises(TypeError):
        a.andnot("x")
    with pytest.raises(TypeError):
        a |= 5


def test_copy_eq_pickle():
    a = Bitmap.from_extents(1 << 20, 4096, [(8192, 4096)])
    b = a.copy()
    assert a == b and not (a != b)
    b.set(0, 1)
    assert a != b and a.count() == 1
    assert copy.copy(a) == a and copy.deepcopy(a) == a
    assert pickle.loads(pickle.dumps(a)) == a
    assert a != Bitmap(1 << 20, 8192)
    assert a != "bitmap"
    with pytest.raises(TypeError):
        hash(a)
    assert "Bitmap" in repr(a)


# ---------------------------------------------------------------- serialisation

def test_serialisation_layout():
    bm = Bitmap.from_extents(200 * 512, 512, [(0, 512), (64 * 512, 512)])
    raw = bm.to_bytes()
    assert raw[:4] == b"DPBM"
    version, flags, gran, size = struct.unpack_from("<HHQQ", raw, 4)
    assert (version, flags, gran, size) == (1, 0, 512, 200 * 512)
    words = struct.unpack_from("<4Q", raw, 24)
    assert words == (1, 1, 0, 0)
    assert len(raw) == 24 + 4 * 8 + 4
    assert struct.unpack_from("<I", raw, len(raw) - 4)[0] == zlib.crc32(raw[:-4])
    assert Bitmap.from_bytes(raw) == bm
    assert Bitmap.from_bytes(memoryview(raw)) == bm
    assert Bitmap.from_bytes(bytearray(raw)) == bm


def _reseal(raw: bytes | bytearray) -> bytes:
    """Recompute the CRC so structural checks (not the checksum) are exercised."""
    body = bytes(raw[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def test_corrupted_bytes_rejected():
    bm = Bitmap.from_extents(1000 * 4096, 4096, [(4096, 40960)])
    raw = bm.to_bytes()
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        with pytest.raises(ValueError):
            Bitmap.from_bytes(bad)
    for cut in range(len(raw)):
        with pytest.raises(ValueError):
            Bitmap.from_bytes(raw[:cut])
    with pytest.raises(ValueError):
        Bitmap.from_bytes(raw + b"\0")


@pytest.mark.parametrize("field,value,msg", [
    (slice(0, 4), b"XXXX", "magic"),
    (slice(4, 6), struct.pack("<H", 2), "version"),
    (slice(6, 8), struct.pack("<H", 1), "flags"),
    (slice(8, 16), struct.pack("<Q", 3000), "granularity"),
    (slice(8, 16), struct.pack("<Q", 0), "granularity"),
    (slice(16, 24), struct.pack("<Q", 1 << 63), "size"),
    (slice(16, 24), struct.pack("<Q", 900 * 4096), "expected"),
])
def test_structural_validation(field, value, msg):
    raw = bytearray(Bitmap(1000 * 4096, 4096).to_bytes())
    raw[field] = value
    with pytest.raises(ValueError, match=msg):
        Bitmap.from_bytes(_reseal(raw))


def test_stray_tail_bits_rejected():
    raw = bytearray(Bitmap(100 * 4096, 4096).to_bytes())
    raw[24 + 8 + 7] = 0x80  # bit 127 > nbits 100
    with pytest.raises(ValueError, match="past the last block"):
        Bitmap.from_bytes(_reseal(raw))


def test_from_bytes_type_errors():
    with pytest.raises(TypeError):
        Bitmap.from_bytes("DPBM")
    with pytest.raises(ValueError, match="contiguous"):
        Bitmap.from_bytes(memoryview(Bitmap(4096, 512).to_bytes())[::2])


_VALID = [Bitmap.from_extents(s, g, e).to_bytes() for s, g, e in [
    (0, 512, []), (4096 * 70, 4096, [(0, 4096), (4096 * 63, 4096 * 3)]), (10, 1, [(3, 4)])]]


@settings(max_examples=FUZZ, deadline=None)
@given(st.data())
def test_from_bytes_fuzz(data):
    base = bytearray(data.draw(st.sampled_from(_VALID)))
    how = data.draw(st.sampled_from(["flip", "truncate", "reseal_flip", "random", "extend"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        base = base[:data.draw(st.integers(0, len(base) - 1))]
    elif how == "reseal_flip":
        i = data.draw(st.integers(0, len(base) - 5))
        base[i] ^= 1 << data.draw(st.integers(0, 7))
        base = bytearray(_reseal(base))
    elif how == "random":
        base = bytearray(data.draw(st.binary(max_size=200)))
    else:
        base += data.draw(st.binary(min_size=1, max_size=16))
    try:
        bm = Bitmap.from_bytes(base)
    except ValueError:
        return
    # accepted: must be a consistent bitmap that serialises back identically
    assert bm.to_bytes() == bytes(base)
    assert bm.count() <= bm.nbits


def test_big_ranges_release_the_gil():
    # ranges of >= 2**20 bits take the nogil path
    bm = Bitmap((1 << 22) * 512, 512)
    bm.set(100 * 512 + 1, 3_000_000 * 512)
    assert bm.count() == 3_000_001
    bm.clear(200 * 512, 2_000_000 * 512)
    assert bm.to_extents() == [(100 * 512, 100 * 512), (2_000_200 * 512, 999_901 * 512)]
    assert bm.count() == 1_000_001


def test_summary_skips_cleared_groups():
    # the scan trusts the summary (one bit per 512 bits): exercise every path
    # that changes words and check extents against the reference each time
    g = 512
    n = 5000
    rng = random.Random(3)
    bm, ref = Bitmap(n * g, g), Ref(n * g, g)
    other = Bitmap(n * g, g)
    for step in range(300):
        op = rng.choice(["set", "clear", "set_bit", "clear_bit", "ior", "andnot", "set_all", "clear_all"])
        b = rng.randrange(n)
        ln = rng.choice([1, 2, 511, 512, 513, 1024, rng.randrange(1, n - b + 1)])
        ln = min(ln, n - b)
        if op in ("set", "clear"):
            getattr(bm, op)(b * g, ln * g)
            getattr(ref, op)(b * g, ln * g)
        elif op == "set_bit":
            bm.set_bit(b)
            ref.bits[b] = True
        elif op == "clear_bit":
            bm.clear_bit(b)
            ref.bits[b] = False
        elif op in ("ior", "andnot"):
            other.clear_all()
            other.set(b * g, ln * g)
            getattr(bm, op)(other)
            for i in range(b, b + ln):
                ref.bits[i] = op == "ior" or (ref.bits[i] and False)
        elif op == "set_all" and step % 50 == 0:
            bm.set_all()
            ref.bits = [True] * n
        elif op == "clear_all" and step % 20 == 0:
            bm.clear_all()
            ref.bits = [False] * n
        assert bm._summary_ok(), op
        assert bm.to_extents() == ref.extents(), (step, op)
    assert Bitmap.from_bytes(bm.to_bytes())._summary_ok()
    assert bm.copy()._summary_ok()
