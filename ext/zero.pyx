# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: embedsignature=True
"""Zero-page detection.

``is_zero`` and ``zero_pages`` read any buffer-protocol object in place (no
copy) and scan it without the GIL with a vectorised OR-reduce that exits
early at the first non-zero block: SSE on the x86-64-v2 baseline, AVX2 when
the CPU has it (chosen at import time).
"""

from libc.stdint cimport uint64_t

from bufview cimport PyBuffer_Release, acquire_read
from kernels cimport dp_is_zero, dp_simd_best, dp_simd_level, dp_zero_pages, simd_name, simd_select

import os

from dataplane.native.bitmap import Bitmap


simd_select(os.environ.get("DATAPLANE_SIMD"), False)


def simd_level():
    """Name of the kernel level in use: ``"avx2"``, ``"sse"`` or ``"generic"``.

    Chosen at import (best the CPU supports; the ``DATAPLANE_SIMD``
    environment variable can force a lower one).
    """
    return simd_name(dp_simd_level())


def simd_levels():
    """Kernel levels this CPU supports, lowest first (e.g. ``["generic", "sse", "avx2"]``)."""
    return [simd_name(i) for i in range(dp_simd_best() + 1)]


def _set_simd_level(name):
    """Testing hook: force this module's kernel level ("generic", "sse", "avx2"
    or "best"); returns the level in use. Raises ValueError for an unknown name."""
    return simd_name(simd_select(name, True))


cdef int _page_shift(object page_size) except -1:
    try:
        ps = page_size.__index__()
    except AttributeError:
        raise TypeError(f"page_size must be an integer, not {type(page_size).__name__}") from None
    if ps < 512 or ps > (1 << 40) or ps & (ps - 1):
        raise ValueError(f"page_size must be a power of two >= 512, got {ps}")
    return (<uint64_t>ps).bit_length() - 1


def is_zero(buf):
    """True if every byte of *buf* is zero (an empty buffer is zero).

    *buf* is any bytes-like object (bytes, bytearray, memoryview, mmap,
    array, ...), read in place. Raises TypeError if it is not a buffer and
    ValueError if it is not C-contiguous.
    """
    cdef Py_buffer view
    cdef bint r
    acquire_read(buf, &view, "buf")
    try:
        with nogil:
            r = dp_is_zero(<const unsigned char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return r


def zero_pages(buf, page_size=4096):
    """Bitmap of the all-zero pages of *buf*.

    Returns a :class:`~dataplane.native.bitmap.Bitmap` with
    ``size == len(buf)`` (in bytes) and ``granularity == page_size``; bit i
    is set iff page i is entirely zero. A trailing partial page counts as a
    page and is judged on its real bytes.

    Raises ValueError unless *page_size* is a power of two >= 512, TypeError
    if *buf* is not a bytes-like object, ValueError if it is not
    C-contiguous.
    """
    cdef Py_buffer view
    cdef int shift = _page_shift(page_size)
    cdef const unsigned char *p
    cdef size_t n, ps, nwords
    cdef bytearray words
    cdef uint64_t *w
    acquire_read(buf, &view, "buf")
    try:
        p = <const unsigned char *>view.buf
        n = <size_t>view.len
        ps = (<size_t>1) << shift
        nwords = (((n + ps - 1) >> shift) + 63) >> 6
        words = bytearray(nwords * 8)
        w = <uint64_t *><char *>words
        with nogil:
            dp_zero_pages(p, n, ps, w)
    finally:
        PyBuffer_Release(&view)
    return Bitmap._from_words(n, ps, words)
