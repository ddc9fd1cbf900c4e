# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: embedsignature=True
"""Dirty bitmaps: one bit per block of ``granularity`` bytes.

The bitmap covers ``size`` bytes with ``nbits = ceil(size / granularity)``
bits stored in 64-bit words (bit ``i`` is bit ``i % 64`` of word ``i // 64``).
Byte-range operations affect every block the range touches. Bits past
``nbits`` in the last word are always kept zero.

All scans (count, any/all, extents) run without the GIL; ``extents_array``
is the fast path: it produces the flat ``array('Q')`` of extents in one
``nogil`` pass that reads only the cache lines a one-bit-per-line summary
marks as possibly non-empty (prefetched ahead of the scan). any/all and the
next-set/next-clear helpers skip empty or full stretches with SIMD scans.
"""

from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset

from bufview cimport PyBuffer_Release, acquire_read
from kernels cimport (
    dp_ctz64,
    dp_find_nonzero_u64,
    dp_prefetch,
    dp_find_notones_u64,
    dp_load_le32,
    dp_load_le64,
    dp_popcount64,
    dp_popcount_u64,
    dp_simd_level,
    dp_store_le32,
    dp_store_le64,
    simd_name,
    simd_select,
)

import array
import os
import zlib

simd_select(os.environ.get("DATAPLANE_SIMD"), False)

cdef uint64_t ONES = 0xFFFFFFFFFFFFFFFF
cdef uint64_t TOPBIT = 0x8000000000000000
# Limits keep every byte/bit computation inside 64 bits.
cdef uint64_t MAX_SIZE = (<uint64_t>1) << 62
cdef uint64_t MAX_GRANULARITY = (<uint64_t>1) << 32
# set()/clear() of at least this many bits release the GIL
cdef uint64_t BIG_RANGE = 1 << 20

# Serialised layout (little-endian), see docs/native.md.
MAGIC = b"DPBM"
FORMAT_VERSION = 1
cdef size_t SER_HEADER = 24
cdef size_t SER_TRAILER = 4

cdef array.array _Q_TEMPLATE = array.array("Q")
assert _Q_TEMPLATE.itemsize == 8


# ---------------------------------------------------------------- bit ops

cdef inline void _set_bits(uint64_t *w, uint64_t lo, uint64_t hi) noexcept nogil:
    """Set bits [lo, hi)."""
    cdef uint64_t wi, wj, mlo, mhi
    if lo >= hi:
        return
    wi = lo >> 6
    wj = (hi - 1) >> 6
    mlo = ONES << (lo & 63)
    mhi = ONES >> (63 - ((hi - 1) & 63))
    if wi == wj:
        w[wi] |= mlo & mhi
        return
    w[wi] |= mlo
    if wj > wi + 1:
        memset(w + wi + 1, 0xFF, (wj - wi - 1) * 8)
    w[wj] |= mhi


cdef inline void _clear_bits(uint64_t *w, uint64_t lo, uint64_t hi) noexcept nogil:
    """Clear bits [lo, hi)."""
    cdef uint64_t wi, wj, mlo, mhi
    if lo >= hi:
        return
    wi = lo >> 6
    wj = (hi - 1) >> 6
    mlo = ONES << (lo & 63)
    mhi = ONES >> (63 - ((hi - 1) & 63))
    if wi == wj:
        w[wi] &= ~(mlo & mhi)
        return
    w[wi] &= ~mlo
    if wj > wi + 1:
        memset(w + wi + 1, 0, (wj - wi - 1) * 8)
    w[wj] &= ~mhi


cdef inline bint _any_bits(const uint64_t *w, uint64_t lo, uint64_t hi) noexcept nogil:
    """True if any bit in [lo, hi) is set."""
    cdef uint64_t wi, wj, mlo, mhi
    if lo >= hi:
        return False
    wi = lo >> 6
    wj = (hi - 1) >> 6
    mlo = ONES << (lo & 63)
    mhi = ONES >> (63 - ((hi - 1) & 63))
    if wi == wj:
        return (w[wi] & mlo & mhi) != 0
    if w[wi] & mlo:
        return True
    if w[wj] & mhi:
        return True
    return dp_find_nonzero_u64(w, wi + 1, wj) < wj


cdef inline bint _all_bits(const uint64_t *w, uint64_t lo, uint64_t hi) noexcept nogil:
    """True if every bit in [lo, hi) is set (True for an empty range)."""
    cdef uint64_t wi, wj, mlo, mhi
    if lo >= hi:
        return True
    wi = lo >> 6
    wj = (hi - 1) >> 6
    mlo = ONES << (lo & 63)
    mhi = ONES >> (63 - ((hi - 1) & 63))
    if wi == wj:
        return (w[wi] & mlo & mhi) == (mlo & mhi)
    if (w[wi] & mlo) != mlo:
        return False
    if (w[wj] & mhi) != mhi:
        return False
    return dp_find_notones_u64(w, wi + 1, wj) >= wj


cdef inline uint64_t _next_set(const uint64_t *w, size_t nwords, uint64_t nbits, uint64_t pos) noexcept nogil:
    """Index of the first set bit >= pos, or nbits."""
    cdef uint64_t x
    cdef size_t wi
    if pos >= nbits:
        return nbits
    wi = <size_t>(pos >> 6)
    x = w[wi] & (ONES << (pos & 63))
    if x == 0:
        wi = dp_find_nonzero_u64(w, wi + 1, nwords)
        if wi >= nwords:
            return nbits
        x = w[wi]
    pos = ((<uint64_t>wi) << 6) + dp_ctz64(x)
    return pos if pos < nbits else nbits


cdef inline uint64_t _next_clear(const uint64_t *w, size_t nwords, uint64_t nbits, uint64_t pos) noexcept nogil:
    """Index of the first clear bit >= pos, or nbits."""
    cdef uint64_t x
    cdef size_t wi
    if pos >= nbits:
        return nbits
    wi = <size_t>(pos >> 6)
    x = ~w[wi] & (ONES << (pos & 63))
    if x == 0:
        wi = dp_find_notones_u64(w, wi + 1, nwords)
        if wi >= nwords:
            return nbits
        x = ~w[wi]
    pos = ((<uint64_t>wi) << 6) + dp_ctz64(x)
    return pos if pos < nbits else nbits


# ---------------------------------------------------------------- summary
#
# Besides the words, a Bitmap keeps a summary with one bit per group of
# GROUP_WORDS words (64 bytes, one cache line): the bit is set whenever a word
# of the group may be non-zero, and is never clear while one is (it may stay
# set after the group was cleared). Extent listing reads only the groups the
# summary marks, so sparse bitmaps are scanned without touching most of their
# memory (the idea of QEMU's hierarchical bitmaps).

cdef enum:
    PREFETCH_GROUPS = 64            # marked groups prefetched ahead of the scan
    GROUP_SHIFT = 3                 # log2(words per group)
    GROUP_WORDS = 8
    GROUP_BITS_SHIFT = 9            # log2(bits per group)


cdef inline void _sum_mark(uint64_t *sm, uint64_t lo, uint64_t hi) noexcept nogil:
    """Mark the groups holding bits [lo, hi)."""
    if lo < hi:
        _set_bits(sm, lo >> GROUP_BITS_SHIFT, ((hi - 1) >> GROUP_BITS_SHIFT) + 1)


cdef void _sum_rebuild(const uint64_t *w, size_t nwords, uint64_t *sm, size_t g0, size_t g1) noexcept nogil:
    """Recompute the summary bits of groups [g0, g1) from the words."""
    cdef size_t g, i, i1
    cdef uint64_t acc
    for g in range(g0, g1):
        i = g << GROUP_SHIFT
        i1 = i + GROUP_WORDS if i + GROUP_WORDS < nwords else nwords
        acc = 0
        while i < i1:
            acc |= w[i]
            i += 1
        if acc:
            sm[g >> 6] |= (<uint64_t>1) << (g & 63)
        else:
            sm[g >> 6] &= ~((<uint64_t>1) << (g & 63))


cdef inline void _sum_after_clear(const uint64_t *w, size_t nwords, uint64_t *sm, uint64_t lo,
                                  uint64_t hi) noexcept nogil:
    """Update the summary after bits [lo, hi) were cleared."""
    cdef size_t g0, g1
    if lo >= hi:
        return
    g0 = <size_t>(lo >> GROUP_BITS_SHIFT)
    g1 = <size_t>((hi - 1) >> GROUP_BITS_SHIFT)
    if g1 > g0 + 1:
        _clear_bits(sm, g0 + 1, g1)   # groups entirely inside the range are now zero
    _sum_rebuild(w, nwords, sm, g0, g0 + 1)
    if g1 != g0:
        _sum_rebuild(w, nwords, sm, g1, g1 + 1)


cdef struct ExtOut:
    # growable malloc'ed uint64 buffer
    uint64_t *data
    size_t len     # number of uint64 values stored
    size_t cap


cdef int _ext_reserve(ExtOut *o, size_t need) noexcept nogil:
    """Make room for *need* more values; -1 if out of memory."""
    cdef size_t ncap
    cdef uint64_t *nd
    if o.len + need <= o.cap:
        return 0
    ncap = o.cap * 2 if o.cap else 16384
    while ncap < o.len + need:
        ncap *= 2
    nd = <uint64_t *>realloc(o.data, ncap * 8)
    if nd == NULL:
        return -1
    o.data = nd
    o.cap = ncap
    return 0


cdef inline int _ext_push(ExtOut *o, uint64_t off, uint64_t length) noexcept nogil:
    if o.len + 2 > o.cap and _ext_reserve(o, 2) < 0:
        return -1
    o.data[o.len] = off
    o.data[o.len + 1] = length
    o.len += 2
    return 0


cdef inline int _emit_run(ExtOut *o, uint64_t start, uint64_t end, unsigned int shift,
                          uint64_t size, uint64_t maxbits) noexcept nogil:
    """Append the run of bits [start, end) as byte extents, cut every maxbits bits."""
    cdef uint64_t piece, off, ln
    while start < end:
        piece = end - start
        if maxbits and piece > maxbits:
            piece = maxbits
        off = start << shift
        ln = piece << shift
        if off + ln > size:
            ln = size - off
        if _ext_push(o, off, ln) < 0:
            return -1
        start += piece
    return 0


cdef inline void _prefetch_next(const uint64_t *w, const uint64_t *sm, size_t nsum, size_t ngroups,
                                size_t *psi, uint64_t *pm) noexcept nogil:
    """Prefetch the next marked group after the cursor (*psi, *pm) and advance it."""
    cdef size_t g
    while pm[0] == 0:
        if psi[0] + 1 >= nsum:
            return
        psi[0] += 1
        pm[0] = sm[psi[0]]
    g = (psi[0] << 6) + dp_ctz64(pm[0])
    pm[0] &= pm[0] - 1
    if g < ngroups:
        dp_prefetch(w + (g << GROUP_SHIFT))


cdef int _transitions(const uint64_t *w, size_t nwords, const uint64_t *sm, size_t ngroups,
                      uint64_t nbits, ExtOut *o) noexcept nogil:
    """Store the bit positions where the bitmap changes value in *o*.

    Runs of set bits alternate start/end, so the list is [start0, end0,
    start1, end1, ...] and the loop has no run state to branch on. Outside a
    run, groups the summary does not mark are skipped without reading their
    words; inside a run, an unmarked group ends it at its first bit. In a
    marked group, a word equal to the previous word's last bit repeated has
    no transition; in any other word the transitions are the set bits of
    ``x ^ (x << 1 | carry)``, found with ctz; the first two are stored
    unconditionally (the count advances by the popcount), more take a loop.
    Returns -1 if out of memory.
    """
    cdef size_t g = 0, i, i1, k = o.len, j, si, nsum = (ngroups + 63) >> 6
    cdef size_t psi = 0, n
    cdef uint64_t x, t, t2, carry = 0, base, m, pm = sm[0]
    cdef unsigned c
    cdef uint64_t *d = o.data
    # A second cursor walks the marked groups PREFETCH_GROUPS ahead of the
    # scan and prefetches them: marked groups are scattered, so without it
    # each would be a full memory latency.
    for n in range(PREFETCH_GROUPS):
        _prefetch_next(w, sm, nsum, ngroups, &psi, &pm)
    while g < ngroups:
        if carry == 0:
            # next marked group
            si = g >> 6
            m = sm[si] & (ONES << (g & 63))
            while m == 0:
                si += 1
                if si >= nsum:
                    break
                m = sm[si]
            if m == 0:
                break
            g = (si << 6) + dp_ctz64(m)
            if g >= ngroups:
                break
        elif (sm[g >> 6] >> (g & 63)) & 1 == 0:
            # an all-zero group ends the current run at its first bit
            if k + 1 > o.cap:
                o.len = k
                if _ext_reserve(o, 1) < 0:
                    return -1
                d = o.data
            d[k] = (<uint64_t>g) << GROUP_BITS_SHIFT
            k += 1
            carry = 0
            g += 1
            continue
        _prefetch_next(w, sm, nsum, ngroups, &psi, &pm)
        if k + GROUP_WORDS * 64 + 1 > o.cap:
            o.len = k
            if _ext_reserve(o, GROUP_WORDS * 64 + 1) < 0:
                return -1
            d = o.data
        i = g << GROUP_SHIFT
        i1 = i + GROUP_WORDS if i + GROUP_WORDS < nwords else nwords
        while i < i1:
            x = w[i]
            if x != 0 - carry:
                t = x ^ ((x << 1) | carry)
                base = (<uint64_t>i) << 6
                c = dp_popcount64(t)
                t2 = t & (t - 1)
                d[k] = base + dp_ctz64(t)
                d[k + 1] = base + dp_ctz64(t2 | TOPBIT)   # junk if c == 1: overwritten next
                if c > 2:
                    t2 &= t2 - 1
                    j = k + 2
                    while t2:
                        d[j] = base + dp_ctz64(t2)
                        j += 1
                        t2 &= t2 - 1
                k += c
                carry = x >> 63
            i += 1
        g += 1
    if k & 1:
        # the last run reaches the end of the bitmap
        if k + 1 > o.cap:
            o.len = k
            if _ext_reserve(o, 1) < 0:
                return -1
            d = o.data
        d[k] = nbits
        k += 1
    o.len = k
    return 0


cdef int _extents(const uint64_t *w, size_t nwords, const uint64_t *sm, size_t ngroups, uint64_t nbits,
                  unsigned int shift, uint64_t size, uint64_t maxbits, ExtOut *tr, ExtOut *o) noexcept nogil:
    """Byte extents of the runs of set bits.

    The transitions go to *tr*; without cutting (maxbits == 0) they are turned
    into (offset, length) pairs in place and *o* is not used; otherwise the
    runs are cut every *maxbits* bits into *o*. The last extent is clipped to
    *size*. Returns -1 if out of memory.
    """
    cdef size_t j
    cdef uint64_t s, e, off, ln
    if _transitions(w, nwords, sm, ngroups, nbits, tr) < 0:
        return -1
    if maxbits:
        for j in range(0, tr.len, 2):
            if _emit_run(o, tr.data[j], tr.data[j + 1], shift, size, maxbits) < 0:
                return -1
        return 0
    for j in range(0, tr.len, 2):
        s = tr.data[j]
        e = tr.data[j + 1]
        off = s << shift
        ln = (e - s) << shift
        if off + ln > size:
            ln = size - off
        tr.data[j] = off
        tr.data[j + 1] = ln
    return 0


cdef bint _is_pow2(uint64_t x) noexcept nogil:
    return x != 0 and (x & (x - 1)) == 0


cdef unsigned int _log2(uint64_t x) noexcept nogil:
    return dp_ctz64(x)


def _index(obj, str what):
    """operator.index with a clear message; rejects negatives."""
    try:
        v = obj.__index__()
    except AttributeError:
        raise TypeError(f"{what} must be an integer, not {type(obj).__name__}") from None
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


def _bit_index(obj, nbits):
    index = _index(obj, "bit index")
    if index >= nbits:
        raise IndexError(f"bit index {index} out of range (nbits {nbits})")
    return index


cdef class Bitmap:
    """Bitmap(size, granularity=65536)

    One bit per ``granularity``-byte block of a ``size``-byte area (a disk or
    guest RAM). ``granularity`` must be a power of two (1 .. 2**32) and
    ``size`` must be 0 .. 2**62; otherwise ValueError (TypeError for
    non-integers). All bits start clear.
    """

    cdef uint64_t *_words       # bit i is (words[i >> 6] >> (i & 63)) & 1; 64-byte aligned
    cdef size_t _nwords         # ceil(nbits / 64); at least 1 word is allocated
    cdef void *_raw             # the allocation holding _words
    cdef uint64_t *_sum         # summary: one bit per group of 8 words (see above)
    cdef size_t _ngroups        # ceil(nwords / 8)
    cdef size_t _nsum           # summary words: ceil(ngroups / 64), at least 1
    cdef uint64_t _size         # bytes covered
    cdef uint64_t _nbits        # ceil(size / granularity)
    cdef uint64_t _gran         # bytes per bit, a power of two
    cdef unsigned int _shift    # log2(granularity)
    cdef uint64_t _tailmask     # valid bits of the last word

    def __cinit__(self, size, granularity=65536):
        cdef uint64_t s, g
        size = _index(size, "size")
        granularity = _index(granularity, "granularity")
        if size > MAX_SIZE:
            raise ValueError(f"size must be <= 2**62, got {size}")
        if granularity == 0 or granularity > MAX_GRANULARITY or not _is_pow2(granularity):
            raise ValueError(f"granularity must be a power of two between 1 and 2**32, got {granularity}")
        s = size
        g = granularity
        self._size = s
        self._gran = g
        self._shift = _log2(g)
        self._nbits = (s + g - 1) >> self._shift
        self._nwords = <size_t>((self._nbits + 63) >> 6)
        if self._nbits & 63:
            self._tailmask = ONES >> (64 - (self._nbits & 63))
        else:
            self._tailmask = ONES
        self._ngroups = (self._nwords + GROUP_WORDS - 1) >> GROUP_SHIFT
        self._nsum = (self._ngroups + 63) >> 6
        if self._nsum == 0:
            self._nsum = 1
        # calloc: big bitmaps get untouched zero pages; aligned by hand so that
        # a summary group is exactly one cache line
        self._raw = calloc((self._nwords if self._nwords else 1) * 8 + 64, 1)
        self._sum = <uint64_t *>calloc(self._nsum, 8)
        if self._raw == NULL or self._sum == NULL:
            raise MemoryError(f"cannot allocate a bitmap of {self._nbits} bits")
        self._words = <uint64_t *>((<size_t>self._raw + 63) & ~(<size_t>63))

    def __dealloc__(self):
        free(self._raw)
        free(self._sum)

    # ------------------------------------------------------------ helpers

    cdef int _check_same(self, Bitmap other) except -1:
        if other is None:
            raise TypeError("expected a Bitmap, got None")
        if other._size != self._size or other._gran != self._gran:
            raise ValueError(
                f"bitmaps differ: size {self._size}/granularity {self._gran} vs "
                f"size {other._size}/granularity {other._gran}")
        return 0

    cdef int _byte_range(self, object offset, object length, uint64_t *lo, uint64_t *hi) except -1:
        """Translate a byte range into the bit range [lo, hi) it touches (``length=None``: to the end)."""
        cdef uint64_t o, n
        offset = _index(offset, "offset")
        if length is None:
            length = self._size - offset if offset <= self._size else 0
        length = _index(length, "length")
        if offset > self._size or length > self._size - offset:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside the bitmap (size {self._size})")
        o = offset
        n = length
        if n == 0:
            lo[0] = hi[0] = 0
            return 0
        lo[0] = o >> self._shift
        hi[0] = ((o + n - 1) >> self._shift) + 1
        return 0

    # --------------------------------------------------------- properties

    @property
    def size(self):
        """Number of bytes covered."""
        return self._size

    @property
    def granularity(self):
        """Bytes per bit (a power of two)."""
        return self._gran

    @property
    def nbits(self):
        """Number of bits: ceil(size / granularity)."""
        return self._nbits

    # ------------------------------------------------------ byte ranges

    def set(self, offset, length):
        """Mark every block touched by bytes [offset, offset+length) dirty.

        Raises ValueError if the range is negative or extends past ``size``.
        """
        cdef uint64_t lo, hi
        self._byte_range(offset, length, &lo, &hi)
        if hi - lo < BIG_RANGE:
            _set_bits(self._words, lo, hi)
            _sum_mark(self._sum, lo, hi)
        else:
            with nogil:
                _set_bits(self._words, lo, hi)
                _sum_mark(self._sum, lo, hi)

    def clear(self, offset, length):
        """Clear every block touched by bytes [offset, offset+length).

        Raises ValueError if the range is negative or extends past ``size``.
        """
        cdef uint64_t lo, hi
        self._byte_range(offset, length, &lo, &hi)
        if hi - lo < BIG_RANGE:
            _clear_bits(self._words, lo, hi)
            _sum_after_clear(self._words, self._nwords, self._sum, lo, hi)
        else:
            with nogil:
                _clear_bits(self._words, lo, hi)
                _sum_after_clear(self._words, self._nwords, self._sum, lo, hi)

    def test(self, offset):
        """True if the block containing byte *offset* is set.

        Raises ValueError unless 0 <= offset < size.
        """
        offset = _index(offset, "offset")
        if offset >= self._size:
            raise ValueError(f"offset {offset} is outside the bitmap (size {self._size})")
        cdef uint64_t b = (<uint64_t>offset) >> self._shift
        return (self._words[b >> 6] >> (b & 63)) & 1 == 1

    def any(self, offset=0, length=None):
        """True if any block touched by [offset, offset+length) is set.

        ``length=None`` means "to the end". An empty range gives False.
        Raises ValueError if the range is outside the bitmap.
        """
        cdef uint64_t lo, hi
        cdef bint r
        self._byte_range(offset, length, &lo, &hi)
        with nogil:
            r = _any_bits(self._words, lo, hi)
        return r

    def all(self, offset=0, length=None):
        """True if every block touched by [offset, offset+length) is set.

        ``length=None`` means "to the end". An empty range gives True.
        Raises ValueError if the range is outside the bitmap.
        """
        cdef uint64_t lo, hi
        cdef bint r
        self._byte_range(offset, length, &lo, &hi)
        with nogil:
            r = _all_bits(self._words, lo, hi)
        return r

    # -------------------------------------------------------- bit level

    def set_bit(self, index):
        """Set bit *index*. Raises IndexError unless 0 <= index < nbits."""
        cdef uint64_t b = _bit_index(index, self._nbits)
        self._words[b >> 6] |= (<uint64_t>1) << (b & 63)
        _sum_mark(self._sum, b, b + 1)

    def clear_bit(self, index):
        """Clear bit *index*. Raises IndexError unless 0 <= index < nbits."""
        cdef uint64_t b = _bit_index(index, self._nbits)
        self._words[b >> 6] &= ~((<uint64_t>1) << (b & 63))
        _sum_after_clear(self._words, self._nwords, self._sum, b, b + 1)

    def test_bit(self, index):
        """Value of bit *index*. Raises IndexError unless 0 <= index < nbits."""
        cdef uint64_t b = _bit_index(index, self._nbits)
        return (self._words[b >> 6] >> (b & 63)) & 1 == 1

    def next_set_bit(self, start=0):
        """Index of the first set bit >= *start*, or -1 if there is none."""
        cdef uint64_t s = min(_index(start, "start"), self._nbits), r
        with nogil:
            r = _next_set(self._words, self._nwords, self._nbits, s)
        return -1 if r >= self._nbits else r

    def next_clear_bit(self, start=0):
        """Index of the first clear bit >= *start*, or -1 if there is none."""
        cdef uint64_t s = min(_index(start, "start"), self._nbits), r
        with nogil:
            r = _next_clear(self._words, self._nwords, self._nbits, s)
        return -1 if r >= self._nbits else r

    # ---------------------------------------------------------- whole map

    def count(self):
        """Number of set bits."""
        cdef uint64_t total
        with nogil:
            total = dp_popcount_u64(self._words, self._nwords)
        return total

    def clear_all(self):
        """Clear every bit."""
        with nogil:
            memset(self._words, 0, self._nwords * 8)
            memset(self._sum, 0, self._nsum * 8)

    def set_all(self):
        """Set every bit (bits past nbits stay clear)."""
        if self._nwords:
            with nogil:
                memset(self._words, 0xFF, self._nwords * 8)
                _set_bits(self._sum, 0, self._ngroups)
            self._words[self._nwords - 1] &= self._tailmask

    def ior(self, Bitmap other not None):
        """self |= other, in place; returns self.

        Raises ValueError if size or granularity differ.
        """
        cdef size_t i
        cdef uint64_t *a = self._words
        cdef const uint64_t *b = other._words
        self._check_same(other)
        with nogil:
            for i in range(self._nwords):
                a[i] |= b[i]
            for i in range(self._nsum):
                self._sum[i] |= other._sum[i]
        return self

    def __ior__(self, other):
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self.ior(other)

    def __or__(self, other):
        if not isinstance(self, Bitmap) or not isinstance(other, Bitmap):
            return NotImplemented
        return self.copy().ior(other)

    def andnot(self, Bitmap other not None):
        """self &= ~other, in place (clear what *other* has set); returns self.

        Raises ValueError if size or granularity differ.
        """
        cdef size_t i
        cdef uint64_t *a = self._words
        cdef const uint64_t *b = other._words
        self._check_same(other)
        with nogil:
            for i in range(self._nwords):
                a[i] &= ~b[i]
            _sum_rebuild(a, self._nwords, self._sum, 0, self._ngroups)
        return self

    def copy(self):
        """An independent copy."""
        cdef Bitmap c = Bitmap(self._size, self._gran)
        with nogil:
            memcpy(c._words, self._words, self._nwords * 8)
            memcpy(c._sum, self._sum, self._nsum * 8)
        return c

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __eq__(self, other):
        if not isinstance(self, Bitmap) or not isinstance(other, Bitmap):
            return NotImplemented
        cdef Bitmap a = self, b = other
        cdef int diff
        if a._size != b._size or a._gran != b._gran:
            return False
        with nogil:
            diff = memcmp(a._words, b._words, a._nwords * 8)
        return diff == 0

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    def __repr__(self):
        return f"<Bitmap size={self._size} granularity={self._gran} nbits={self._nbits} set={self.count()}>"

    def __reduce__(self):
        return (Bitmap.from_bytes, (self.to_bytes(),))

    # ------------------------------------------------------------ extents

    def extents_array(self, max_length=None):
        """Runs of set bits as a flat ``array('Q')``: [off0, len0, off1, len1, ...].

        Offsets and lengths are in bytes, in increasing order. Runs longer
        than *max_length* are cut into pieces of *max_length* bytes; the
        last extent is clipped to ``size``. The scan runs without the GIL.

        Raises ValueError if *max_length* is not a positive multiple of the
        granularity; MemoryError if the result does not fit in memory.
        """
        cdef uint64_t maxbits = 0
        cdef ExtOut tr, o
        cdef ExtOut *res
        cdef int rc
        cdef array.array out
        if max_length is not None:
            max_length = _index(max_length, "max_length")
            if max_length == 0 or max_length % self._gran or max_length > MAX_SIZE:
                raise ValueError(
                    f"max_length must be a positive multiple of the granularity ({self._gran}), "
                    f"got {max_length}")
            maxbits = (<uint64_t>max_length) >> self._shift
        # scratch buffers from malloc, copied into the result array at the end:
        # in steady state the allocator hands back already-mapped memory,
        # which matters where first-touch page faults are expensive
        tr.data = NULL
        tr.len = 0
        tr.cap = 0
        o.data = NULL
        o.len = 0
        o.cap = 0
        with nogil:
            rc = _extents(self._words, self._nwords, self._sum, self._ngroups, self._nbits, self._shift,
                          self._size, maxbits, &tr, &o)
        try:
            if rc < 0:
                raise MemoryError("out of memory while listing extents")
            res = &o if maxbits else &tr
            out = array.clone(_Q_TEMPLATE, <Py_ssize_t>res.len, False)
            if res.len:
                memcpy(out.data.as_voidptr, res.data, res.len * 8)
        finally:
            free(tr.data)
            free(o.data)
        return out

    def extents(self, max_length=None):
        """Iterator of ``(offset, length)`` byte extents of the set bits.

        Same rules and errors as :meth:`extents_array` (the scan is done
        eagerly, so errors are raised by the call, not by iteration).
        """
        return _pairs(self.extents_array(max_length))

    def to_extents(self, max_length=None):
        """List of ``(offset, length)`` byte extents of the set bits (see extents_array)."""
        cdef array.array a = self.extents_array(max_length)
        cdef const uint64_t *d = <const uint64_t *>a.data.as_voidptr
        cdef Py_ssize_t i, n = len(a)
        return [(d[i], d[i + 1]) for i in range(0, n, 2)]

    @classmethod
    def from_extents(cls, size, granularity, extents):
        """Bitmap with every block touched by the given extents set.

        *extents* is an iterable of ``(offset, length)`` byte pairs (the shape
        NBD block-status replies have). Raises ValueError for a malformed pair
        or a range outside ``size``.
        """
        cdef Bitmap bm = cls(size, granularity)
        for item in extents:
            try:
                off, ln = item
            except (TypeError, ValueError):
                raise ValueError(f"extent must be an (offset, length) pair, got {item!r}") from None
            bm.set(off, ln)
        return bm

    # ------------------------------------------------------ serialisation

    def to_bytes(self):
        """Self-describing serialisation (see docs/native.md):

        magic ``DPBM``, version, flags, granularity, size, the words
        (little-endian uint64) and a CRC-32 of everything before it.
        """
        cdef size_t nbytes = SER_HEADER + self._nwords * 8 + SER_TRAILER
        cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>nbytes)
        cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
        cdef size_t i
        memcpy(p, b"DPBM", 4)
        p[4] = FORMAT_VERSION & 0xFF
        p[5] = FORMAT_VERSION >> 8
        p[6] = 0
        p[7] = 0
        dp_store_le64(p + 8, self._gran)
        dp_store_le64(p + 16, self._size)
        with nogil:
            for i in range(self._nwords):
                dp_store_le64(p + SER_HEADER + i * 8, self._words[i])
        crc = zlib.crc32(memoryview(out)[:nbytes - SER_TRAILER])
        dp_store_le32(p + nbytes - SER_TRAILER, crc)
        return out

    @classmethod
    def from_bytes(cls, data):
        """Rebuild a Bitmap serialised by :meth:`to_bytes`.

        *data* is any bytes-like object. Raises ValueError if it is
        truncated, has a bad magic, version, flags, granularity or size,
        a wrong length, a bad checksum, or bits set past ``nbits``;
        TypeError if it is not a bytes-like object.
        """
        cdef Py_buffer view
        cdef const unsigned char *p
        cdef size_t n, i
        cdef uint64_t g, s, nbits, nwords
        cdef Bitmap bm
        acquire_read(data, &view, "data")
        try:
            p = <const unsigned char *>view.buf
            n = <size_t>view.len
            if n < SER_HEADER + SER_TRAILER:
                raise ValueError(f"bitmap data truncated: {n} bytes, the header alone is {SER_HEADER + SER_TRAILER}")
            if memcmp(p, b"DPBM", 4) != 0:
                raise ValueError(f"not a serialised bitmap (magic {bytes(p[:4])!r}, expected {MAGIC!r})")
            version = p[4] | (p[5] << 8)
            if version != FORMAT_VERSION:
                raise ValueError(f"unsupported bitmap format version {version} (expected {FORMAT_VERSION})")
            if p[6] or p[7]:
                raise ValueError("bitmap header has unknown flags set")
            g = dp_load_le64(p + 8)
            s = dp_load_le64(p + 16)
            if g == 0 or g > MAX_GRANULARITY or not _is_pow2(g):
                raise ValueError(f"bitmap header has an invalid granularity {g}")
            if s > MAX_SIZE:
                raise ValueError(f"bitmap header has an invalid size {s}")
            nbits = (s + g - 1) >> _log2(g)
            nwords = (nbits + 63) >> 6
            if n != SER_HEADER + nwords * 8 + SER_TRAILER:
                raise ValueError(
                    f"bitmap data has {n} bytes, expected {SER_HEADER + nwords * 8 + SER_TRAILER} "
                    f"for size {s} and granularity {g}")
            crc = zlib.crc32(memoryview(data).cast("B")[:n - SER_TRAILER])
            if crc != dp_load_le32(p + n - SER_TRAILER):
                raise ValueError("bitmap data is corrupt (CRC-32 mismatch)")
            bm = cls(s, g)
            with nogil:
                for i in range(<size_t>nwords):
                    bm._words[i] = dp_load_le64(p + SER_HEADER + i * 8)
            if nwords and (bm._words[nwords - 1] & ~bm._tailmask):
                raise ValueError("bitmap data has bits set past the last block")
            with nogil:
                _sum_rebuild(bm._words, bm._nwords, bm._sum, 0, bm._ngroups)
            return bm
        finally:
            PyBuffer_Release(&view)

    def _summary_ok(self):
        """Testing hook: True if every group holding a set bit is marked in the summary."""
        cdef size_t g, i, i1
        cdef uint64_t acc
        for g in range(self._ngroups):
            i = g << GROUP_SHIFT
            i1 = min(i + GROUP_WORDS, self._nwords)
            acc = 0
            while i < i1:
                acc |= self._words[i]
                i += 1
            if acc and not (self._sum[g >> 6] >> (g & 63)) & 1:
                return False
        for g in range(self._ngroups, self._nsum * 64):
            if (self._sum[g >> 6] >> (g & 63)) & 1:
                return False
        return True

    @classmethod
    def _from_words(cls, size, granularity, words):
        """Internal: a Bitmap from raw native-endian uint64 words (bits past nbits are dropped)."""
        cdef Py_buffer view
        cdef Bitmap bm = cls(size, granularity)
        acquire_read(words, &view, "words")
        try:
            if <size_t>view.len != bm._nwords * 8:
                raise ValueError(f"expected {bm._nwords * 8} bytes of words, got {view.len}")
            memcpy(bm._words, view.buf, bm._nwords * 8)
            if bm._nwords:
                bm._words[bm._nwords - 1] &= bm._tailmask
            _sum_rebuild(bm._words, bm._nwords, bm._sum, 0, bm._ngroups)
        finally:
            PyBuffer_Release(&view)
        return bm


def _pairs(array.array a):
    cdef Py_ssize_t i
    for i in range(0, len(a), 2):
        yield (a[i], a[i + 1])


def simd_level():
    """Name of the kernel level this module uses (``"avx2"``, ``"sse"`` or ``"generic"``)."""
    return simd_name(dp_simd_level())


def _set_simd_level(name):
    """Testing hook: force this module's kernel level ("generic", "sse", "avx2"
    or "best"); returns the level in use. Raises ValueError for an unknown name."""
    return simd_name(simd_select(name, True))
