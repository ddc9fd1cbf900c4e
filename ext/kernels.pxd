# Declarations of the C helpers in dp_kernels.h (SIMD zero checks and zero-page
# maps, word scans, popcount, prefetch, little-endian loads/stores and the
# run-time CPU dispatch) plus the level-selection helpers shared by the modules.
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "dp_kernels.h" nogil:
    int DP_SIMD_GENERIC
    int DP_SIMD_SSE
    int DP_SIMD_AVX2

    uint32_t dp_load_le32(const unsigned char *p)
    uint64_t dp_load_le64(const unsigned char *p)
    void dp_store_le32(unsigned char *p, uint32_t v)
    void dp_store_le64(unsigned char *p, uint64_t v)
    void dp_prefetch(const void *p)
    unsigned dp_ctz64(uint64_t x)
    unsigned dp_popcount64(uint64_t x)

    int dp_simd_best()
    int dp_simd_init(int level)
    int dp_simd_level()
    bint dp_is_zero(const unsigned char *p, size_t n)
    void dp_zero_pages(const unsigned char *p, size_t n, size_t ps, uint64_t *w)
    size_t dp_find_nonzero_u64(const uint64_t *w, size_t i, size_t n)
    size_t dp_find_notones_u64(const uint64_t *w, size_t i, size_t n)
    uint64_t dp_popcount_u64(const uint64_t *w, size_t n)


cdef inline int simd_select(object name, bint strict) except -2:
    """Select this module's kernel level by name: "generic", "sse", "avx2", or
    "best" / "" / None for the best the CPU supports (a level above what the
    CPU supports is capped). Unknown names raise ValueError if *strict*, else
    mean "best". Returns the level in use."""
    cdef int level = -1
    if name is not None:
        name = str(name).strip().lower()
        if name == "generic":
            level = DP_SIMD_GENERIC
        elif name == "sse":
            level = DP_SIMD_SSE
        elif name == "avx2":
            level = DP_SIMD_AVX2
        elif name not in ("", "best") and strict:
            raise ValueError(f"unknown SIMD level {name!r}; expected 'generic', 'sse', 'avx2' or 'best'")
    return dp_simd_init(level)


cdef inline str simd_name(int level):
    if level == DP_SIMD_AVX2:
        return "avx2"
    if level == DP_SIMD_SSE:
        return "sse"
    return "generic"
