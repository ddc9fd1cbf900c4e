# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: embedsignature=True
"""Page codec: zero-page elision plus adaptive LZ4 (system liblz4).

A buffer is cut into pages; consecutive pages of the same kind become one
record of a self-describing body (format in docs/native.md):

* all-zero pages -> ZERO record (no payload),
* compressible pages -> LZ4 record (one independent LZ4 block),
* incompressible pages -> RAW record (bytes stored as is).

In ``mode="auto"`` a cheap probe (counting repeated 4-byte sequences in a
small sample of each page, the same signal LZ4 feeds on) decides whether a
page is worth compressing; when compression that the probe let through
still does not pay, the encoder backs off for a growing number of bytes and
then re-probes. The state lives in the :class:`PageEncoder`, so a streaming
channel keeps one encoder per stream.

Encoding and decoding run without the GIL, read their input in place (any
buffer-protocol object) and write straight into the result.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, _PyBytes_Resize
from cpython.object cimport PyObject
from cpython.pythread cimport (
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)
from cpython.ref cimport Py_DECREF, Py_XDECREF
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from bufview cimport PyBuffer_Release, acquire_read, acquire_write, overlaps
from kernels cimport (
    dp_zero_pages,
    dp_load_le32,
    dp_load_le64,
    dp_popcount64,
    dp_simd_level,
    dp_store_le32,
    dp_store_le64,
    simd_name,
    simd_select,
)
from lz4lib cimport (
    LZ4_MAX_INPUT_SIZE,
    LZ4_compress_fast,
    LZ4_compressBound,
    LZ4_decompress_safe,
    LZ4_compress_fast_extState,
    LZ4_sizeofState,
    LZ4_versionString,
)

import operator
import os

simd_select(os.environ.get("DATAPLANE_SIMD"), False)


class CodecError(ValueError):
    """A codec body (or LZ4 block) is malformed, truncated, corrupt, or larger than allowed."""


# ------------------------------------------------------------------ format

FORMAT_VERSION = 1
MAGIC = b"DPPC"
HEADER_SIZE = 24
RECORD_ZERO = 0
RECORD_RAW = 1
RECORD_LZ4 = 2
MAX_DATA_RECORD = 1 << 20
MAX_ZERO_RECORD = 1 << 31
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20

cdef enum:
    HDR = 24
    REC_ZERO = 0
    REC_RAW = 1
    REC_LZ4 = 2
    SMALL_HDR = 5       # type u8 + length u32 (ZERO, RAW)
    LZ4_HDR = 9         # type u8 + length u32 + stored u32
    MIN_SHIFT = 9
    MAX_SHIFT = 20
    MODE_OFF = 0
    MODE_ON = 1
    MODE_AUTO = 2
    VERSION = 1
    ZMAP_WORDS = 32      # zero-page map window: 2048 pages

cdef uint32_t MAGIC_LE = 0x43505044        # b"DPPC" as a little-endian u32
cdef uint64_t C_MAX_DATA_RECORD = 1 << 20
cdef uint64_t C_MAX_ZERO_RECORD = 1 << 31

# auto mode tuning
cdef size_t PROBE_WINDOW = 64       # bytes per sample window (two windows per page)
cdef uint64_t BACKOFF_MIN = 256 * 1024
cdef uint32_t BACKOFF_MAX_STEP = 8  # BACKOFF_MIN << 8 = 64 MiB

_MODES = {"off": MODE_OFF, "on": MODE_ON, "auto": MODE_AUTO}


# ------------------------------------------------------------------ probe

cdef inline uint32_t _probe_distinct(const uint8_t *p, size_t n, uint32_t *samples) noexcept nogil:
    """Number of distinct byte values among up to 128 sampled bytes of a page
    (64 at the start and 64 in the middle; all bytes of a page shorter than 128)."""
    cdef uint64_t seen[4]
    cdef size_t i
    cdef uint8_t b
    seen[0] = seen[1] = seen[2] = seen[3] = 0
    if n < 2 * PROBE_WINDOW:
        for i in range(n):
            b = p[i]
            seen[b >> 6] |= (<uint64_t>1) << (b & 63)
        samples[0] = <uint32_t>n
    else:
        for i in range(PROBE_WINDOW):
            b = p[i]
            seen[b >> 6] |= (<uint64_t>1) << (b & 63)
        p += n // 2
        for i in range(PROBE_WINDOW):
            b = p[i]
            seen[b >> 6] |= (<uint64_t>1) << (b & 63)
        samples[0] = <uint32_t>(2 * PROBE_WINDOW)
    return dp_popcount64(seen[0]) + dp_popcount64(seen[1]) + dp_popcount64(seen[2]) + dp_popcount64(seen[3])


cdef inline bint _probe(const uint8_t *p, size_t n) noexcept nogil:
    """True if the page looks worth compressing.

    Byte-value diversity of a small sample is a cheap entropy proxy: 128
    random bytes show ~101 distinct values (rarely < 90), text ~20-35,
    machine code and integer tables ~10-70. A page whose sample shows more
    than 5/8 of its bytes distinct is treated as incompressible. Tiny tails
    (< 32 bytes) are never worth it.
    """
    cdef uint32_t samples
    cdef uint32_t d = _probe_distinct(p, n, &samples)
    return samples >= 32 and d * 8 <= samples * 5


# ------------------------------------------------------------------ encoder core

cdef struct EncCtx:
    void *lz4        # LZ4 compression state (LZ4_sizeofState() bytes)
    int mode
    int accel
    unsigned int shift
    size_t page
    # adaptive state (kept across calls)
    uint32_t fail_streak
    uint64_t skip_budget
    # statistics
    uint64_t calls
    uint64_t raw_bytes
    uint64_t encoded_bytes
    uint64_t zero_pages
    uint64_t zero_runs
    uint64_t raw_runs
    uint64_t lz4_runs
    uint64_t lz4_bytes_in
    uint64_t lz4_bytes_out
    uint64_t lz4_rejected
    uint64_t probes
    uint64_t skipped_by_sampling


cdef inline int _classify(EncCtx *c, const uint8_t *p, size_t plen) noexcept nogil:
    """auto mode: LZ4 or RAW for a non-zero page."""
    if c.skip_budget:
        c.skip_budget -= plen if plen < c.skip_budget else c.skip_budget
        c.skipped_by_sampling += 1
        return REC_RAW
    c.probes += 1
    if _probe(p, plen):
        return REC_LZ4
    c.skipped_by_sampling += 1
    return REC_RAW


cdef inline void _adapt(EncCtx *c, size_t n, int clen) noexcept nogil:
    """Back off after compression that did not pay (< 1/32 saved); re-probe later."""
    cdef uint32_t step
    if clen > 0 and <uint64_t>clen * 32 <= <uint64_t>n * 31:
        c.fail_streak = 0
        return
    c.fail_streak += 1
    if c.fail_streak >= 2:
        step = c.fail_streak - 2
        if step > BACKOFF_MAX_STEP:
            step = BACKOFF_MAX_STEP
        c.skip_budget = BACKOFF_MIN << step


cdef inline uint8_t *_emit_raw(EncCtx *c, const uint8_t *src, size_t n, uint8_t *q) noexcept nogil:
    q[0] = REC_RAW
    dp_store_le32(q + 1, <uint32_t>n)
    memcpy(q + SMALL_HDR, src, n)
    c.raw_runs += 1
    return q + SMALL_HDR + n


cdef inline uint8_t *_emit(EncCtx *c, int kind, const uint8_t *src, size_t n, uint8_t *q) noexcept nogil:
    cdef int clen
    if kind == REC_ZERO:
        q[0] = REC_ZERO
        dp_store_le32(q + 1, <uint32_t>n)
        c.zero_runs += 1
        return q + SMALL_HDR
    if kind == REC_RAW:
        return _emit_raw(c, src, n, q)
    # LZ4: one independent block. The caller guarantees LZ4_compressBound(n)
    # bytes of room after the record header (see _max_encoded).
    clen = LZ4_compress_fast_extState(c.lz4, <const char *>src, <char *>(q + LZ4_HDR), <int>n,
                                      LZ4_compressBound(<int>n), c.accel)
    if c.mode == MODE_AUTO:
        _adapt(c, n, clen)
    if clen <= 0 or <size_t>clen >= n:
        c.lz4_rejected += 1
        return _emit_raw(c, src, n, q)
    q[0] = REC_LZ4
    dp_store_le32(q + 1, <uint32_t>n)
    dp_store_le32(q + 5, <uint32_t>clen)
    c.lz4_runs += 1
    c.lz4_bytes_in += n
    c.lz4_bytes_out += <uint64_t>clen
    return q + LZ4_HDR + clen


cdef size_t _encode(EncCtx *c, const uint8_t *src, size_t n, uint8_t *dst) noexcept nogil:
    """Encode src[0..n) into dst (room: max_encoded_size(n)); returns the body length.

    Pages are classified window by window: the zero-page map of a window
    (ZMAP_WORDS * 64 pages) comes from one multi-stream SIMD pass
    (dp_zero_pages), then its pages are grouped into records.
    """
    cdef uint8_t *q = dst + HDR
    cdef size_t ps = c.page, off = 0, plen, run_start = 0, run_len = 0
    cdef size_t win_start = 0, win_len = 0, win_bytes = ps * ZMAP_WORDS * 64, pg
    cdef int kind, run_kind = -1
    cdef uint64_t nrec = 0, cap
    cdef uint64_t zmap[ZMAP_WORDS]
    while off < n:
        if off == win_start + win_len:
            win_start = off
            win_len = n - off if n - off < win_bytes else win_bytes
            memset(zmap, 0, sizeof(zmap))
            dp_zero_pages(src + off, win_len, ps, zmap)
        plen = n - off if n - off < ps else ps
        pg = (off - win_start) >> c.shift
        if (zmap[pg >> 6] >> (pg & 63)) & 1:
            kind = REC_ZERO
            c.zero_pages += 1
        elif c.mode == MODE_AUTO:
            kind = _classify(c, src + off, plen)
        elif c.mode == MODE_ON:
            kind = REC_LZ4
        else:
            kind = REC_RAW
        cap = C_MAX_ZERO_RECORD if kind == REC_ZERO else C_MAX_DATA_RECORD
        if kind != run_kind or run_len + plen > cap:
            if run_kind >= 0:
                q = _emit(c, run_kind, src + run_start, run_len, q)
                nrec += 1
            run_kind = kind
            run_start = off
            run_len = 0
        run_len += plen
        off += plen
    if run_kind >= 0:
        q = _emit(c, run_kind, src + run_start, run_len, q)
        nrec += 1
    dp_store_le32(dst, MAGIC_LE)
    dst[4] = VERSION
    dst[5] = <uint8_t>c.shift
    dst[6] = 0
    dst[7] = 0
    dp_store_le64(dst + 8, n)
    dp_store_le32(dst + 16, <uint32_t>nrec)
    dp_store_le32(dst + 20, 0)
    c.calls += 1
    c.raw_bytes += n
    c.encoded_bytes += <uint64_t>(q - dst)
    return <size_t>(q - dst)


# ------------------------------------------------------------------ decoder core

cdef enum:
    E_OK = 0
    E_REC_HDR = 1
    E_TYPE = 2
    E_LEN0 = 3
    E_OVERRUN = 4
    E_ALIGN = 5
    E_RECBIG = 6
    E_PAYLOAD = 7
    E_CLEN = 8
    E_LZ4 = 9
    E_FEW = 10
    E_TRAILING = 11
    E_COVER = 12

cdef struct DecErr:
    int code
    uint64_t rec
    uint64_t at
    uint64_t a
    uint64_t b


cdef int _fail(DecErr *e, int code, uint64_t rec, uint64_t at, uint64_t a, uint64_t b) noexcept nogil:
    e.code = code
    e.rec = rec
    e.at = at
    e.a = a
    e.b = b
    return -1


cdef int _decode(const uint8_t *body, size_t blen, uint8_t *out, uint64_t olen, unsigned int shift,
                 uint32_t nrec, DecErr *e) noexcept nogil:
    """Decode the records of a body whose header was validated. Every length is
    checked before any copy; LZ4 output is bounded to the record's length."""
    cdef size_t p = HDR
    cdef uint64_t pos = 0, ln, clen, left, ps = (<uint64_t>1) << shift
    cdef uint32_t r
    cdef int kind, got
    for r in range(nrec):
        if blen - p < SMALL_HDR:
            if p == blen:
                return _fail(e, E_FEW, r, p, nrec, 0)
            return _fail(e, E_REC_HDR, r, p, blen - p, 0)
        kind = body[p]
        ln = dp_load_le32(body + p + 1)
        if kind > REC_LZ4:
            return _fail(e, E_TYPE, r, p, <uint64_t>kind, 0)
        if ln == 0:
            return _fail(e, E_LEN0, r, p, 0, 0)
        left = olen - pos
        if ln > left:
            return _fail(e, E_OVERRUN, r, p, ln, left)
        if ln < left and (ln & (ps - 1)):
            return _fail(e, E_ALIGN, r, p, ln, ps)
        if kind == REC_ZERO:
            if ln > C_MAX_ZERO_RECORD:
                return _fail(e, E_RECBIG, r, p, ln, C_MAX_ZERO_RECORD)
            memset(out + pos, 0, ln)
            p += SMALL_HDR
        elif kind == REC_RAW:
            if ln > C_MAX_DATA_RECORD:
                return _fail(e, E_RECBIG, r, p, ln, C_MAX_DATA_RECORD)
            if blen - p - SMALL_HDR < ln:
                return _fail(e, E_PAYLOAD, r, p, ln, blen - p - SMALL_HDR)
            memcpy(out + pos, body + p + SMALL_HDR, ln)
            p += SMALL_HDR + ln
        else:
            if ln > C_MAX_DATA_RECORD:
                return _fail(e, E_RECBIG, r, p, ln, C_MAX_DATA_RECORD)
            if blen - p < LZ4_HDR:
                return _fail(e, E_REC_HDR, r, p, blen - p, 0)
            clen = dp_load_le32(body + p + 5)
            if clen == 0 or clen > <uint64_t>LZ4_compressBound(<int>ln):
                return _fail(e, E_CLEN, r, p, clen, ln)
            if blen - p - LZ4_HDR < clen:
                return _fail(e, E_PAYLOAD, r, p, clen, blen - p - LZ4_HDR)
            got = LZ4_decompress_safe(<const char *>(body + p + LZ4_HDR), <char *>(out + pos),
                                      <int>clen, <int>ln)
            if got < 0 or <uint64_t>got != ln:
                return _fail(e, E_LZ4, r, p, <uint64_t>(got if got >= 0 else 0), ln)
            p += LZ4_HDR + clen
        pos += ln
    if p != blen:
        return _fail(e, E_TRAILING, nrec, p, blen - p, 0)
    if pos != olen:
        return _fail(e, E_COVER, nrec, p, pos, olen)
    return 0


cdef str _decode_message(DecErr *e):
    where = f"record {e.rec} at body offset {e.at}"
    if e.code == E_REC_HDR:
        return f"truncated body: {where}: only {e.a} bytes left for the record header"
    if e.code == E_TYPE:
        return f"{where}: unknown record type {e.a}"
    if e.code == E_LEN0:
        return f"{where}: zero-length record"
    if e.code == E_OVERRUN:
        return f"{where}: length {e.a} runs past the declared size ({e.b} bytes left)"
    if e.code == E_ALIGN:
        return f"{where}: length {e.a} is not a multiple of the page size {e.b} and it is not the last record"
    if e.code == E_RECBIG:
        return f"{where}: length {e.a} exceeds the record limit {e.b}"
    if e.code == E_PAYLOAD:
        return f"truncated body: {where}: payload needs {e.a} bytes, {e.b} left"
    if e.code == E_CLEN:
        return f"{where}: invalid LZ4 stored size {e.a} for {e.b} bytes"
    if e.code == E_LZ4:
        return f"{where}: corrupt LZ4 data (decoded {e.a} bytes, expected {e.b})"
    if e.code == E_FEW:
        return f"truncated body: it ends after {e.rec} of {e.a} records"
    if e.code == E_TRAILING:
        return f"{e.a} unexpected bytes after the last record (body offset {e.at})"
    if e.code == E_COVER:
        return f"records cover {e.a} bytes but the header declares {e.b}"
    return "corrupt body"


cdef struct Header:
    uint64_t olen
    uint32_t nrec
    unsigned int shift


cdef int _parse_header(const uint8_t *p, size_t n, Header *h) except -1:
    if n < HDR:
        raise CodecError(f"truncated body: {n} bytes, the header alone is {HDR}")
    if dp_load_le32(p) != MAGIC_LE:
        raise CodecError(f"not a page-codec body (magic {bytes(p[:4])!r}, expected {MAGIC!r})")
    if p[4] != VERSION:
        raise CodecError(f"unsupported page-codec format version {p[4]} (expected {VERSION})")
    if p[5] < MIN_SHIFT or p[5] > MAX_SHIFT:
        raise CodecError(f"invalid page size 2**{p[5]} in header (expected 2**{MIN_SHIFT}..2**{MAX_SHIFT})")
    if p[6] or p[7] or dp_load_le32(p + 20):
        raise CodecError("header has reserved fields set (flags or reserved word)")
    h.olen = dp_load_le64(p + 8)
    h.nrec = dp_load_le32(p + 16)
    h.shift = p[5]
    if h.olen > <uint64_t>0x7FFFFFFFFFFFFFFF:
        raise CodecError(f"declared size {h.olen} is out of range")
    if h.olen == 0 and h.nrec:
        raise CodecError(f"{h.nrec} records for an empty buffer")
    if (h.olen >> h.shift) + 1 < h.nrec:
        raise CodecError(f"{h.nrec} records for {h.olen} bytes is more than one per page")
    return 0


# ------------------------------------------------------------------ helpers

cdef object _index(object value):
    """operator.index (TypeError for non-integers)."""
    return operator.index(value)


cdef int _page_shift(object page_size) except -1:
    try:
        ps = operator.index(page_size)
    except TypeError:
        raise TypeError(f"page_size must be an integer, not {type(page_size).__name__}") from None
    if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
        raise ValueError(f"page_size must be a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}, got {ps}")
    return (<uint64_t>ps).bit_length() - 1


cdef uint64_t _max_encoded(uint64_t n, unsigned int shift) noexcept nogil:
    cdef uint64_t npages = (n + ((<uint64_t>1) << shift) - 1) >> shift
    if npages == 0:
        return HDR
    # every record holds >= 1 page and has <= 9 header bytes; payloads are never
    # larger than the input, plus LZ4's worst-case slack for one record in flight.
    return HDR + npages * LZ4_HDR + n + (<uint64_t>LZ4_compressBound(<int>C_MAX_DATA_RECORD) - C_MAX_DATA_RECORD)


cdef object _shrink(PyObject *raw, Py_ssize_t n):
    """Resize a fresh bytes object (refcount 1) in place and return it."""
    _PyBytes_Resize(&raw, n)    # frees raw and raises on failure
    obj = <object>raw
    Py_DECREF(obj)
    return obj


cdef extern from "Python.h":
    PyObject *_new_bytes "PyBytes_FromStringAndSize"(const char *v, Py_ssize_t n) except NULL


def max_encoded_size(n, page_size=4096):
    """Upper bound of ``len(encode(buf, page_size))`` for a buffer of *n* bytes.

    Raises ValueError for a negative *n* or an invalid *page_size*.
    """
    cdef int shift = _page_shift(page_size)
    n = _index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if (n >> shift) >= 0xFFFFFFFF:
        raise ValueError(f"a buffer of {n} bytes has too many pages for one body")
    return _max_encoded(n, shift)


# ------------------------------------------------------------------ encoder

cdef class PageEncoder:
    """PageEncoder(page_size=4096, mode="auto", acceleration=1)

    Encodes buffers into page-codec bodies, keeping its adaptive state (the
    back-off after compression that did not pay) and statistics across
    calls; a streaming channel keeps one per stream.

    *mode*: ``"auto"`` (probe each page, compress when it looks worth it),
    ``"on"`` (always try LZ4) or ``"off"`` (never compress; zero pages are
    still elided). *acceleration* is LZ4's (1 = default, higher = faster,
    larger output). Raises ValueError for a bad page size, mode or
    acceleration.

    An encoder may be shared between threads; calls are serialised.
    """

    cdef EncCtx c
    cdef PyThread_type_lock lock
    cdef readonly int page_size
    cdef readonly str mode
    cdef readonly int acceleration

    def __cinit__(self, page_size=4096, mode="auto", acceleration=1):
        cdef int shift = _page_shift(page_size)
        if mode not in _MODES:
            raise ValueError(f"mode must be 'auto', 'on' or 'off', got {mode!r}")
        acceleration = _index(acceleration)
        if acceleration < 1 or acceleration > 65537:
            raise ValueError(f"acceleration must be between 1 and 65537, got {acceleration}")
        memset(&self.c, 0, sizeof(EncCtx))
        self.c.mode = _MODES[mode]
        self.c.accel = acceleration
        self.c.shift = shift
        self.c.page = (<size_t>1) << shift
        self.page_size = self.c.page
        self.mode = mode
        self.acceleration = acceleration
        self.c.lz4 = malloc(<size_t>LZ4_sizeofState())
        if self.c.lz4 == NULL:
            raise MemoryError("cannot allocate an LZ4 state")
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError("cannot allocate a lock")

    def __dealloc__(self):
        free(self.c.lz4)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    def encode(self, buf):
        """Encode *buf* (any bytes-like object, read in place) into a body (bytes).

        The GIL is released while encoding. Raises TypeError if *buf* is not
        a bytes-like object, ValueError if it is not C-contiguous or too
        large.
        """
        cdef Py_buffer view
        cdef PyObject *raw = NULL
        cdef size_t written
        cdef uint8_t *dst
        acquire_read(buf, &view, "buf")
        try:
            cap = max_encoded_size(view.len, self.c.page)
            raw = _new_bytes(NULL, <Py_ssize_t>cap)
            dst = <uint8_t *>PyBytes_AS_STRING(<object>raw)
            with nogil:
                written = self._run(<const uint8_t *>view.buf, <size_t>view.len, dst)
        except BaseException:
            Py_XDECREF(raw)
            raise
        finally:
            PyBuffer_Release(&view)
        return _shrink(raw, <Py_ssize_t>written)

    def encode_into(self, buf, out):
        """Encode *buf* into the writable buffer *out*; return the body length.

        *out* must hold at least ``max_encoded_size(len(buf), page_size)``
        bytes (a reusable send or scratch buffer: no allocation per call).
        Raises ValueError if it is smaller or overlaps *buf*, TypeError if it
        is read-only or not a buffer, and the same errors as :meth:`encode`
        for *buf*.
        """
        cdef Py_buffer view, oview
        cdef size_t written
        acquire_read(buf, &view, "buf")
        try:
            acquire_write(out, &oview, "out")
            try:
                if overlaps(&view, &oview):
                    raise ValueError("out must not overlap buf")
                cap = max_encoded_size(view.len, self.c.page)
                if oview.len < cap:
                    raise ValueError(
                        f"out holds {oview.len} bytes; encoding {view.len} bytes needs up to {cap} "
                        f"(max_encoded_size)")
                with nogil:
                    written = self._run(<const uint8_t *>view.buf, <size_t>view.len, <uint8_t *>oview.buf)
            finally:
                PyBuffer_Release(&oview)
        finally:
            PyBuffer_Release(&view)
        return written

    cdef size_t _run(self, const uint8_t *src, size_t n, uint8_t *dst) noexcept nogil:
        cdef size_t written
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        written = _encode(&self.c, src, n, dst)
        PyThread_release_lock(self.lock)
        return written

    # statistics -----------------------------------------------------------

    @property
    def calls(self):
        """Number of encode() calls."""
        return self.c.calls

    @property
    def raw_bytes(self):
        """Input bytes encoded."""
        return self.c.raw_bytes

    @property
    def encoded_bytes(self):
        """Output (body) bytes produced."""
        return self.c.encoded_bytes

    @property
    def zero_pages(self):
        """Pages elided because they were all zero."""
        return self.c.zero_pages

    @property
    def zero_runs(self):
        """ZERO records written."""
        return self.c.zero_runs

    @property
    def raw_runs(self):
        """RAW records written (including LZ4 attempts that did not shrink)."""
        return self.c.raw_runs

    @property
    def lz4_runs(self):
        """LZ4 records written."""
        return self.c.lz4_runs

    @property
    def lz4_bytes_in(self):
        """Input bytes stored in LZ4 records."""
        return self.c.lz4_bytes_in

    @property
    def lz4_bytes_out(self):
        """LZ4 payload bytes written."""
        return self.c.lz4_bytes_out

    @property
    def lz4_rejected(self):
        """Runs compressed with LZ4 but stored raw because the output did not shrink."""
        return self.c.lz4_rejected

    @property
    def probes(self):
        """Pages sampled by the auto-mode probe."""
        return self.c.probes

    @property
    def skipped_by_sampling(self):
        """Non-zero pages stored raw without trying LZ4 (probe said no, or back-off)."""
        return self.c.skipped_by_sampling

    @property
    def backoff_bytes(self):
        """Bytes left in the current back-off (auto mode), 0 when probing."""
        return self.c.skip_budget

    def stats(self):
        """All statistics as a dict."""
        return {name: getattr(self, name) for name in (
            "calls", "raw_bytes", "encoded_bytes", "zero_pages", "zero_runs", "raw_runs", "lz4_runs",
            "lz4_bytes_in", "lz4_bytes_out", "lz4_rejected", "probes", "skipped_by_sampling",
            "backoff_bytes")}

    def reset_stats(self):
        """Zero the statistics (the adaptive state is kept)."""
        self.c.calls = self.c.raw_bytes = self.c.encoded_bytes = 0
        self.c.zero_pages = self.c.zero_runs = self.c.raw_runs = self.c.lz4_runs = 0
        self.c.lz4_bytes_in = self.c.lz4_bytes_out = self.c.lz4_rejected = 0
        self.c.probes = self.c.skipped_by_sampling = 0

    def __repr__(self):
        return (f"<PageEncoder page_size={self.page_size} mode={self.mode!r} "
                f"acceleration={self.acceleration} calls={self.c.calls}>")


def encode(buf, page_size=4096, mode="auto", acceleration=1):
    """Encode *buf* into a self-describing page-codec body (bytes).

    One-shot form of ``PageEncoder(page_size, mode, acceleration).encode(buf)``
    (no adaptive state carried between calls). Raises ValueError for bad
    parameters or a non-contiguous buffer, TypeError for a non-buffer.
    """
    return PageEncoder(page_size, mode, acceleration).encode(buf)


# ------------------------------------------------------------------ decoder

def decoded_size(body):
    """Decoded length declared by the header of *body* (header validated only).

    Raises CodecError if the header is truncated or invalid, TypeError /
    ValueError if *body* is not a contiguous bytes-like object.
    """
    cdef Py_buffer view
    cdef Header h
    acquire_read(body, &view, "body")
    try:
        _parse_header(<const uint8_t *>view.buf, <size_t>view.len, &h)
    finally:
        PyBuffer_Release(&view)
    return h.olen


def decode(body, max_size):
    """Decode *body* and return the original bytes.

    *max_size* caps the declared decoded size (protection against hostile
    bodies). Raises CodecError if the body is malformed, truncated or
    corrupt, or declares more than *max_size* bytes; ValueError for a
    negative *max_size*; TypeError if *body* is not a bytes-like object.
    The GIL is released while decoding.
    """
    cdef Py_buffer view
    cdef Header h
    cdef DecErr e
    cdef int rc
    cdef PyObject *raw = NULL
    cdef uint8_t *dst
    max_size = _index(max_size)
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    acquire_read(body, &view, "body")
    try:
        _parse_header(<const uint8_t *>view.buf, <size_t>view.len, &h)
        if h.olen > max_size:
            raise CodecError(f"declared size {h.olen} exceeds max_size {max_size}")
        raw = _new_bytes(NULL, <Py_ssize_t>h.olen)
        dst = <uint8_t *>PyBytes_AS_STRING(<object>raw)
        with nogil:
            rc = _decode(<const uint8_t *>view.buf, <size_t>view.len, dst, h.olen, h.shift, h.nrec, &e)
        if rc:
            raise CodecError(_decode_message(&e))
    except BaseException:
        Py_XDECREF(raw)
        raise
    finally:
        PyBuffer_Release(&view)
    return _shrink(raw, <Py_ssize_t>h.olen)


def decode_into(body, out):
    """Decode *body* into the writable buffer *out*; return the decoded length.

    Bytes of *out* past the decoded length are left untouched. Raises
    CodecError if the body is malformed, truncated or corrupt, or declares
    more bytes than *out* holds (then *out* is unchanged if the header was
    the problem, and may be partly written otherwise); ValueError if *out*
    overlaps *body*; TypeError if *out* is read-only or not a buffer.
    """
    cdef Py_buffer bview, oview
    cdef Header h
    cdef DecErr e
    cdef int rc
    acquire_read(body, &bview, "body")
    try:
        acquire_write(out, &oview, "out")
        try:
            if overlaps(&bview, &oview):
                raise ValueError("out must not overlap body")
            _parse_header(<const uint8_t *>bview.buf, <size_t>bview.len, &h)
            if h.olen > <uint64_t>oview.len:
                raise CodecError(f"declared size {h.olen} exceeds the output buffer ({oview.len} bytes)")
            with nogil:
                rc = _decode(<const uint8_t *>bview.buf, <size_t>bview.len, <uint8_t *>oview.buf,
                             h.olen, h.shift, h.nrec, &e)
            if rc:
                raise CodecError(_decode_message(&e))
        finally:
            PyBuffer_Release(&oview)
    finally:
        PyBuffer_Release(&bview)
    return h.olen


# ------------------------------------------------------------------ raw LZ4 blocks

def lz4_compress_block(buf, acceleration=1):
    """Compress *buf* into one plain LZ4 block (no size prefix) with the system liblz4.

    Raises ValueError if *buf* is larger than LZ4's limit (0x7E000000 bytes)
    or *acceleration* is outside 1..65537; TypeError for a non-buffer.
    """
    cdef Py_buffer view
    cdef PyObject *raw = NULL
    cdef int n, bound, r, acc
    cdef char *dst
    acceleration = _index(acceleration)
    if acceleration < 1 or acceleration > 65537:
        raise ValueError(f"acceleration must be between 1 and 65537, got {acceleration}")
    acc = acceleration
    acquire_read(buf, &view, "buf")
    try:
        if view.len > LZ4_MAX_INPUT_SIZE:
            raise ValueError(f"buffer of {view.len} bytes exceeds LZ4's limit of {LZ4_MAX_INPUT_SIZE}")
        n = <int>view.len
        bound = LZ4_compressBound(n)
        raw = _new_bytes(NULL, bound)
        dst = PyBytes_AS_STRING(<object>raw)
        with nogil:
            r = LZ4_compress_fast(<const char *>view.buf, dst, n, bound, acc)
        if r <= 0:
            raise CodecError("LZ4 compression failed")
    except BaseException:
        Py_XDECREF(raw)
        raise
    finally:
        PyBuffer_Release(&view)
    return _shrink(raw, r)


def lz4_decompress_block(buf, uncompressed_size):
    """Decompress one plain LZ4 block that must decode to exactly *uncompressed_size* bytes.

    Raises CodecError if the block is corrupt or decodes to another size,
    ValueError if *uncompressed_size* is negative or above 0x7FFFFFFF.
    """
    cdef Py_buffer view
    cdef PyObject *raw = NULL
    cdef int usize, r
    cdef char *dst
    uncompressed_size = _index(uncompressed_size)
    if uncompressed_size < 0 or uncompressed_size > 0x7FFFFFFF:
        raise ValueError(f"uncompressed_size must be between 0 and 2**31-1, got {uncompressed_size}")
    usize = uncompressed_size
    acquire_read(buf, &view, "buf")
    try:
        if view.len > 0x7FFFFFFF:
            raise CodecError("LZ4 block larger than 2 GiB")
        raw = _new_bytes(NULL, usize)
        dst = PyBytes_AS_STRING(<object>raw)
        with nogil:
            r = LZ4_decompress_safe(<const char *>view.buf, dst, <int>view.len, usize)
        if r != usize:
            raise CodecError(
                f"corrupt LZ4 block or wrong size (decoded {r if r >= 0 else 'nothing'}, "
                f"expected {usize} bytes)")
    except BaseException:
        Py_XDECREF(raw)
        raise
    finally:
        PyBuffer_Release(&view)
    return _shrink(raw, usize)


def lz4_version():
    """Version string of the system liblz4 in use."""
    return LZ4_versionString().decode()


def probe_pages(buf, page_size=4096, stride=1):
    """Return ``(probed, compressible)``: how many *page_size* pages of *buf*
    were probed - every *stride*-th one, from the first; a short last page
    counts - and how many of those the auto-mode probe finds worth
    compressing (zero pages included). About 60 ns per probed page (two cache
    lines of it), GIL released: a cheap look at a buffer before paying for LZ4.

    Raises ValueError for a page size the codec does not support (as the
    encoder does), or a stride below 1.
    """
    cdef Py_buffer view
    cdef size_t ps = (<size_t>1) << _page_shift(page_size)
    cdef size_t step, n, off, k, probed = 0, good = 0
    cdef const uint8_t *p
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    step = ps * <size_t>stride
    acquire_read(buf, &view, "buf")
    try:
        p = <const uint8_t *>view.buf
        n = <size_t>view.len
        with nogil:
            off = 0
            while off < n:
                k = ps if n - off > ps else n - off
                probed += 1
                if _probe(p + off, k):
                    good += 1
                if n - off <= step:
                    break
                off += step
    finally:
        PyBuffer_Release(&view)
    return probed, good


def _probe_stats(buf):
    """Testing hook: (distinct byte values, bytes sampled, looks compressible) for one page."""
    cdef Py_buffer view
    cdef uint32_t d, samples
    acquire_read(buf, &view, "buf")
    try:
        d = _probe_distinct(<const uint8_t *>view.buf, <size_t>view.len, &samples)
        ok = _probe(<const uint8_t *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return d, samples, ok


def simd_level():
    """Name of the kernel level this module uses (``"avx2"``, ``"sse"`` or ``"generic"``)."""
    return simd_name(dp_simd_level())


def _set_simd_level(name):
    """Testing hook: force this module's kernel level ("generic", "sse", "avx2"
    or "best"); returns the level in use. Raises ValueError for an unknown name."""
    return simd_name(simd_select(name, True))
