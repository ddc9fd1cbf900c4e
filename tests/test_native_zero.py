"""Tests for dataplane.native.zero (is_zero, zero_pages) against a Python reference."""

from __future__ import annotations

import array
import mmap
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.native import zero
from dataplane.native.bitmap import Bitmap

PAGE_SIZES = [1 << s for s in range(9, 17)]  # 512 .. 65536
LEVELS = zero.simd_levels()


def ref_zero_pages(data: bytes, page_size: int) -> list[bool]:
    return [not any(data[i:i + page_size]) for i in range(0, len(data), page_size)]


def bits(bm: Bitmap) -> list[bool]:
    return [bm.test_bit(i) for i in range(bm.nbits)]


@pytest.fixture(params=LEVELS)
def level(request):
    """Run the test once per SIMD kernel level the CPU supports."""
    assert zero._set_simd_level(request.param) == request.param
    yield request.param
    zero._set_simd_level("best")


# ---------------------------------------------------------------- is_zero

def test_is_zero_small_exhaustive(level):
    # every length up to 300 and every position of a single non-zero byte,
    # at several start alignments: covers head, body and tail of each kernel
    base = bytearray(5000)
    mv = memoryview(base)
    lengths = [*range(0, 200), 255, 256, 257, 319, 320, 321, 511, 512, 513, 600, 1023, 1024, 1025, 4129]
    for align in (0, 1, 7, 31):
        for n in lengths:
            view = mv[align:align + n]
            assert zero.is_zero(view)
            for pos in range(n):
                base[align + pos] = 0x80
                assert not zero.is_zero(view), (align, n, pos)
                base[align + pos] = 0


def test_is_zero_large(level):
    data = bytearray(3 << 20)
    assert zero.is_zero(data)
    for pos in (0, 1, 4095, 4096, (3 << 20) - 1, 12345, (1 << 20) + 255):
        data[pos] = 1
        assert not zero.is_zero(data)
        data[pos] = 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 64))
def test_is_zero_matches_reference(data, pad):
    buf = bytes(pad) + data
    assert zero.is_zero(buf) == (not any(buf))
    sparse = bytes(len(data))
    assert zero.is_zero(sparse)


# ---------------------------------------------------------------- zero_pages

@st.composite
def page_buffers(draw):
    page_size = draw(st.sampled_from(PAGE_SIZES[:4]))
    npages = draw(st.integers(0, 12))
    tail = draw(st.integers(0, page_size - 1))
    buf = bytearray(npages * page_size + tail)
    for p in range(npages + (1 if tail else 0)):
        kind = draw(st.sampled_from(["zero", "zero", "one", "full"]))
        start = p * page_size
        end = min(start + page_size, len(buf))
        if kind == "one":
            buf[draw(st.integers(start, end - 1))] = draw(st.integers(1, 255))
        elif kind == "full":
            buf[start:end] = bytes((i * 7 + 1) & 0xFF or 1 for i in range(end - start))
    return bytes(buf), page_size


@settings(max_examples=150, deadline=None)
@given(page_buffers())
def test_zero_pages_matches_reference(case):
    data, page_size = case
    for lvl in LEVELS:
        zero._set_simd_level(lvl)
        bm = zero.zero_pages(data, page_size)
        assert bm.size == len(data)
        assert bm.granularity == page_size
        assert bm.nbits == (len(data) + page_size - 1) // page_size
        assert bits(bm) == ref_zero_pages(data, page_size), lvl
    zero._set_simd_level("best")


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_every_page_size(page_size, level):
    rng = random.Random(page_size)
    n = 5 * page_size + page_size // 3  # partial last page
    buf = bytearray(n)
    for p in (1, 3, 5):  # page 5 is the partial one
        buf[min(p * page_size + rng.randrange(page_size), n - 1)] = 0xFF
    bm = zero.zero_pages(buf, page_size)
    assert bits(bm) == [True, False, True, False, True, False]
    assert bm.to_extents() == [(0, page_size), (2 * page_size, page_size), (4 * page_size, page_size)]


def test_each_byte_position_in_a_page(level):
    page_size = 4096
    buf = bytearray(3 * page_size)
    for pos in range(page_size):
        buf[page_size + pos] = 1
        assert bits(zero.zero_pages(buf, page_size)) == [True, False, True], pos
        buf[page_size + pos] = 0


def test_partial_last_page_judged_on_real_bytes(level):
    data = bytes(4096 + 10)
    bm = zero.zero_pages(data)
    assert bits(bm) == [True, True]
    assert bm.to_extents() == [(0, 4106)]  # last extent clipped to size
    assert bits(zero.zero_pages(bytes(4096) + b"\0" * 9 + b"\1")) == [True, False]


def test_empty_and_one_byte():
    bm = zero.zero_pages(b"")
    assert (bm.size, bm.nbits, bm.count()) == (0, 0, 0)
    assert bm.to_extents() == []
    assert zero.is_zero(b"")
    assert bits(zero.zero_pages(b"\0")) == [True]
    assert bits(zero.zero_pages(b"\1")) == [False]
    assert zero.is_zero(b"\0") and not zero.is_zero(b"\1")


@pytest.mark.parametrize("bad", [0, 1, 256, 511, 513, 1000, 4095, 6144, -4096])
def test_bad_page_size(bad):
    with pytest.raises(ValueError, match="power of two"):
        zero.zero_pages(bytes(8192), bad)


def test_page_size_type():
    with pytest.raises(TypeError):
        zero.zero_pages(bytes(8192), 4096.0)
    with pytest.raises(TypeError):
        zero.zero_pages(bytes(8192), "4096")


# ---------------------------------------------------------------- buffer kinds

def test_readonly_and_exotic_buffers(tmp_path):
    raw = bytearray(4 * 4096)
    raw[4096 + 17] = 3
    expect = [True, False, True, True]
    path = tmp_path / "mem.img"
    path.write_bytes(raw)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ro_map:
        assert bits(zero.zero_pages(ro_map)) == expect
        assert not zero.is_zero(ro_map)
        assert bits(zero.zero_pages(memoryview(ro_map)[4096:])) == expect[1:]
    anon = mmap.mmap(-1, len(raw))
    anon[:] = raw
    try:
        assert bits(zero.zero_pages(anon)) == expect
    finally:
        anon.close()
    assert bits(zero.zero_pages(bytes(raw))) == expect
    assert bits(zero.zero_pages(memoryview(bytes(raw)))) == expect
    assert bits(zero.zero_pages(memoryview(raw).toreadonly())) == expect
    assert bits(zero.zero_pages(array.array("Q", bytes(raw)))) == expect
    # memoryview slice starting mid-page, odd alignment
    assert bits(zero.zero_pages(memoryview(raw)[4096 + 18:], 512)) == [True] * 24
    assert bits(zero.zero_pages(memoryview(raw)[4096 + 17:], 512)) == [False] + [True] * 23
    # a multi-dimensional but C-contiguous view is fine too
    assert bits(zero.zero_pages(memoryview(raw).cast("B", (4, 4096)))) == expect


def test_non_contiguous_rejected():
    mv = memoryview(bytearray(8192))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        zero.zero_pages(mv)
    with pytest.raises(ValueError, match="contiguous"):
        zero.is_zero(mv)


@pytest.mark.parametrize("bad", ["text", 123, None, [0, 0], 4.5])
def test_not_a_buffer(bad):
    with pytest.raises(TypeError, match="bytes-like"):
        zero.is_zero(bad)
    with pytest.raises(TypeError, match="bytes-like"):
        zero.zero_pages(bad)


def test_simd_level_hook():
    assert zero.simd_level() in LEVELS
    assert LEVELS[0] == "generic"
    with pytest.raises(ValueError):
        zero._set_simd_level("avx512")
    zero._set_simd_level("best")
    assert zero.simd_level() == LEVELS[-1]


def test_random_buffers_against_reference():
    rng = random.Random(1234)
    for _ in range(30):
        page_size = rng.choice(PAGE_SIZES)
        npages = rng.randint(0, 40)
        buf = bytearray(npages * page_size + rng.randrange(page_size))
        for _ in range(rng.randint(0, 10)):
            if buf:
                buf[rng.randrange(len(buf))] = rng.randint(1, 255)
        if rng.random() < 0.3 and buf:
            start = rng.randrange(len(buf))
            buf[start:start + 5000] = os.urandom(len(buf[start:start + 5000]))
        want = ref_zero_pages(bytes(buf), page_size)
        for lvl in LEVELS:
            zero._set_simd_level(lvl)
            assert bits(zero.zero_pages(buf, page_size)) == want
    zero._set_simd_level("best")


@pytest.mark.parametrize("page_size", [512, 4096, 16384])
def test_many_pages_multi_stream(page_size, level):
    # >= 64 pages: the AVX2 kernel scans the buffer's quarters as concurrent
    # streams; put non-zero bytes at page edges in every quarter
    rng = random.Random(page_size)
    for npages in (64, 67, 130, 257):
        buf = bytearray(npages * page_size + rng.choice([0, 1, page_size - 1]))
        for _ in range(rng.randint(0, 3 * npages // 4)):
            page = rng.randrange(npages)
            edges = [0, 1, 31, 32, 127, 128, page_size // 2, page_size - 1]
            where = rng.choice([*edges, rng.randrange(page_size)])
            buf[page * page_size + where] = rng.randint(1, 255)
        assert bits(zero.zero_pages(buf, page_size)) == ref_zero_pages(bytes(buf), page_size)


def test_is_zero_big_buffers(level):
    for n in ((1 << 20), (1 << 20) + 1, (4 << 20) + 4097, (3 << 20) + 127):
        buf = bytearray(n)
        assert zero.is_zero(buf)
        for pos in (0, n // 4 - 1, n // 4, n // 2 + 5, 3 * (n // 4) + 100, n - 200, n - 1):
            buf[pos] = 1
            assert not zero.is_zero(buf), (n, pos)
            assert not zero.is_zero(memoryview(buf)[1:]) or pos == 0
            buf[pos] = 0
