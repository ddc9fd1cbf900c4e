/*
 * dp_kernels.h - tiny C helpers for the dataplane native kernels.
 *
 * Only the parts that need SIMD intrinsics and run-time CPU dispatch live
 * here; everything else is Cython. Every function is `static` so each
 * extension module gets its own copy (no shared C symbols between modules);
 * each module calls dp_simd_init() once at import.
 *
 * Dispatch: the build baseline is x86-64-v2 (SSE4.2, POPCNT). AVX2 variants
 * are compiled with __attribute__((target("avx2"))) and chosen at run time
 * with __builtin_cpu_supports("avx2") (which also checks that the OS saves
 * the YMM state). Other architectures get portable 64-bit word loops.
 */
#ifndef DP_KERNELS_H
#define DP_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DP_X86 1
#include <immintrin.h>
#else
#define DP_X86 0
#endif

#define DP_SIMD_GENERIC 0
#define DP_SIMD_SSE 1
#define DP_SIMD_AVX2 2

/* ------------------------------------------------------------------ */
/* little-endian loads/stores and bit helpers                           */
/* ------------------------------------------------------------------ */

static inline uint32_t dp_load_le32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t dp_load_le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void dp_store_le32(unsigned char *p, uint32_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    memcpy(p, &v, 4);
}

static inline void dp_store_le64(unsigned char *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

/* hint: the cache line at p will be read soon */
static inline void dp_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

/* count trailing zeros; x must be non-zero */
static inline unsigned dp_ctz64(uint64_t x) { return (unsigned)__builtin_ctzll(x); }
static inline unsigned dp_popcount64(uint64_t x) { return (unsigned)__builtin_popcountll(x); }

/* ------------------------------------------------------------------ */
/* zero detection                                                       */
/* ------------------------------------------------------------------ */

/* portable: OR-reduce 64-bit words, early exit every 64 bytes */
static int dp_is_zero_generic(const unsigned char *p, size_t n)
{
    size_t i = 0;
    if (n < 8) {
        unsigned char acc = 0;
        for (; i < n; i++)
            acc |= p[i];
        return acc == 0;
    }
    for (; i + 64 <= n; i += 64) {
        uint64_t a, b, c, d, e, f, g, h;
        memcpy(&a, p + i, 8);
        memcpy(&b, p + i + 8, 8);
        memcpy(&c, p + i + 16, 8);
        memcpy(&d, p + i + 24, 8);
        memcpy(&e, p + i + 32, 8);
        memcpy(&f, p + i + 40, 8);
        memcpy(&g, p + i + 48, 8);
        memcpy(&h, p + i + 56, 8);
        if ((a | b | c | d | e | f | g | h) != 0)
            return 0;
    }
    for (; i + 8 <= n; i += 8) {
        uint64_t a;
        memcpy(&a, p + i, 8);
        if (a)
            return 0;
    }
    if (i < n) { /* overlapping last 8 bytes (n >= 8 here) */
        uint64_t a;
        memcpy(&a, p + n - 8, 8);
        if (a)
            return 0;
    }
    return 1;
}

#if DP_X86
#if defined(__SSE4_1__)
#define DP_TESTZ128(v) _mm_testz_si128((v), (v))
#else
#define DP_TESTZ128(v) (_mm_movemask_epi8(_mm_cmpeq_epi8((v), _mm_setzero_si128())) == 0xFFFF)
#endif

/* SSE baseline: 128 bytes per iteration, aligned loads after a head check */
static int dp_is_zero_sse(const unsigned char *p, size_t n)
{
    if (n < 32)
        return dp_is_zero_generic(p, n);
    {
        __m128i h = _mm_or_si128(_mm_loadu_si128((const __m128i *)p),
                                 _mm_loadu_si128((const __m128i *)(p + 16)));
        if (!DP_TESTZ128(h))
            return 0;
    }
    /* the first 32 bytes are known zero: continue from the next 16-byte boundary */
    const unsigned char *q = (const unsigned char *)(((uintptr_t)p + 16) & ~(uintptr_t)15);
    const unsigned char *end = p + n;
    while ((size_t)(end - q) >= 128) {
        __m128i a = _mm_or_si128(_mm_load_si128((const __m128i *)q), _mm_load_si128((const __m128i *)(q + 16)));
        __m128i b = _mm_or_si128(_mm_load_si128((const __m128i *)(q + 32)), _mm_load_si128((const __m128i *)(q + 48)));
        __m128i c = _mm_or_si128(_mm_load_si128((const __m128i *)(q + 64)), _mm_load_si128((const __m128i *)(q + 80)));
        __m128i d = _mm_or_si128(_mm_load_si128((const __m128i *)(q + 96)), _mm_load_si128((const __m128i *)(q + 112)));
        __m128i x = _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d));
        if (!DP_TESTZ128(x))
            return 0;
        q += 128;
    }
    while ((size_t)(end - q) >= 16) {
        __m128i a = _mm_load_si128((const __m128i *)q);
        if (!DP_TESTZ128(a))
            return 0;
        q += 16;
    }
    if (q < end) { /* overlapping unaligned tail; n >= 32 so end - 16 >= p */
        __m128i a = _mm_loadu_si128((const __m128i *)(end - 16));
        if (!DP_TESTZ128(a))
            return 0;
    }
    return 1;
}

#define DP_OR4(p) _mm256_or_si256(                                                              \
        _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(p)), _mm256_loadu_si256((const __m256i *)((p) + 32))), \
        _mm256_or_si256(_mm256_loadu_si256((const __m256i *)((p) + 64)), _mm256_loadu_si256((const __m256i *)((p) + 96))))

/* AVX2: 256 bytes per iteration (8 aligned 32-byte loads OR-reduced), one
 * vptest per iteration for the early exit. */
__attribute__((target("avx2"))) static int dp_is_zero_avx2(const unsigned char *p, size_t n)
{
    if (n < 64)
        return dp_is_zero_sse(p, n);
    if (n >= ((size_t)1 << 20)) {
        /* big buffers: its quarters as 4 concurrent streams (more misses in
         * flight than one stream, see dp_zero_pages_avx2), then the rest */
        size_t quarter = (n / 4) & ~(size_t)127, i;
        const unsigned char *q0 = p, *q1 = p + quarter, *q2 = p + 2 * quarter, *q3 = p + 3 * quarter;
        for (i = 0; i < quarter; i += 128) {
            __m256i x = _mm256_or_si256(_mm256_or_si256(DP_OR4(q0 + i), DP_OR4(q1 + i)),
                                        _mm256_or_si256(DP_OR4(q2 + i), DP_OR4(q3 + i)));
            if (!_mm256_testz_si256(x, x))
                return 0;
        }
        p += 4 * quarter;
        n -= 4 * quarter;
        if (n < 64)
            return dp_is_zero_sse(p, n);
    }
    {
        __m256i h = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)p),
                                    _mm256_loadu_si256((const __m256i *)(p + 32)));
        if (!_mm256_testz_si256(h, h))
            return 0;
    }
    const unsigned char *q = (const unsigned char *)(((uintptr_t)p + 32) & ~(uintptr_t)31);
    const unsigned char *end = p + n;
    while ((size_t)(end - q) >= 256) {
        __m256i a = _mm256_or_si256(_mm256_load_si256((const __m256i *)q),
                                    _mm256_load_si256((const __m256i *)(q + 32)));
        __m256i b = _mm256_or_si256(_mm256_load_si256((const __m256i *)(q + 64)),
                                    _mm256_load_si256((const __m256i *)(q + 96)));
        __m256i c = _mm256_or_si256(_mm256_load_si256((const __m256i *)(q + 128)),
                                    _mm256_load_si256((const __m256i *)(q + 160)));
        __m256i d = _mm256_or_si256(_mm256_load_si256((const __m256i *)(q + 192)),
                                    _mm256_load_si256((const __m256i *)(q + 224)));
        __m256i x = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
        if (!_mm256_testz_si256(x, x))
            return 0;
        q += 256;
    }
    while ((size_t)(end - q) >= 32) {
        __m256i a = _mm256_load_si256((const __m256i *)q);
        if (!_mm256_testz_si256(a, a))
            return 0;
        q += 32;
    }
    if (q < end) { /* overlapping unaligned tail; n >= 64 so end - 32 >= p */
        __m256i a = _mm256_loadu_si256((const __m256i *)(end - 32));
        if (!_mm256_testz_si256(a, a))
            return 0;
    }
    return 1;
}
#endif /* DP_X86 */

/* ------------------------------------------------------------------ */
/* zero-page maps: set bit i of w (pre-zeroed, little-endian bit order)  */
/* iff page i of p[0..n) is all zero; ps is a power of two >= 512; a      */
/* trailing partial page is judged on its real bytes.                    */
/* ------------------------------------------------------------------ */

static void dp_zero_pages_generic(const unsigned char *p, size_t n, size_t ps, uint64_t *w)
{
    size_t np = (n + ps - 1) / ps, pg;
    for (pg = 0; pg < np; pg++) {
        size_t off = pg * ps;
        size_t len = n - off < ps ? n - off : ps;
        if (dp_is_zero_generic(p + off, len))
            w[pg >> 6] |= (uint64_t)1 << (pg & 63);
    }
}

#if DP_X86
static void dp_zero_pages_sse(const unsigned char *p, size_t n, size_t ps, uint64_t *w)
{
    size_t np = n / ps, pg, i;
    for (pg = 0; pg < np; pg++) {
        const unsigned char *q = p + pg * ps;
        int z = 1;
        for (i = 0; i < ps; i += 128) {
            const __m128i *v = (const __m128i *)(q + i);
            __m128i a = _mm_or_si128(_mm_loadu_si128(v), _mm_loadu_si128(v + 1));
            __m128i b = _mm_or_si128(_mm_loadu_si128(v + 2), _mm_loadu_si128(v + 3));
            __m128i c = _mm_or_si128(_mm_loadu_si128(v + 4), _mm_loadu_si128(v + 5));
            __m128i d = _mm_or_si128(_mm_loadu_si128(v + 6), _mm_loadu_si128(v + 7));
            __m128i x = _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d));
            if (!DP_TESTZ128(x)) {
                z = 0;
                break;
            }
        }
        if (z)
            w[pg >> 6] |= (uint64_t)1 << (pg & 63);
    }
    if (n % ps && dp_is_zero_sse(p + np * ps, n % ps))
        w[np >> 6] |= (uint64_t)1 << (np & 63);
}

/* One page, 256 bytes (8 x 32) per step, early exit. ps is a multiple of 256. */
__attribute__((target("avx2"))) static inline int dp_page_zero_avx2(const unsigned char *q, size_t ps)
{
    size_t i;
    for (i = 0; i < ps; i += 256) {
        const __m256i *v = (const __m256i *)(q + i);
        __m256i a = _mm256_or_si256(_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1));
        __m256i b = _mm256_or_si256(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3));
        __m256i c = _mm256_or_si256(_mm256_loadu_si256(v + 4), _mm256_loadu_si256(v + 5));
        __m256i d = _mm256_or_si256(_mm256_loadu_si256(v + 6), _mm256_loadu_si256(v + 7));
        __m256i x = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
        if (!_mm256_testz_si256(x, x))
            return 0;
    }
    return 1;
}

/* Large buffers are read as 4 concurrent streams (the buffer's quarters, one
 * page of each at a time): more independent sequential streams let the
 * hardware prefetchers keep more misses in flight than a single stream, which
 * raises the read bandwidth of one core. Each page still exits early. */
__attribute__((target("avx2"))) static void dp_zero_pages_avx2(const unsigned char *p, size_t n, size_t ps, uint64_t *w)
{
    size_t np = n / ps, pg = 0, quarter = np / 4, k, i, s;
    if (quarter >= 16) {
        for (k = 0; k < quarter; k++) {
            const unsigned char *q[4];
            unsigned live = 0xF;
            for (s = 0; s < 4; s++)
                q[s] = p + (s * quarter + k) * ps;
            for (i = 0; i < ps; i += 128) {
                if (live == 0xF) {
                    __m256i x0 = DP_OR4(q[0] + i), x1 = DP_OR4(q[1] + i);
                    __m256i x2 = DP_OR4(q[2] + i), x3 = DP_OR4(q[3] + i);
                    __m256i all = _mm256_or_si256(_mm256_or_si256(x0, x1), _mm256_or_si256(x2, x3));
                    if (_mm256_testz_si256(all, all))
                        continue;
                    live = (unsigned)_mm256_testz_si256(x0, x0) | (unsigned)_mm256_testz_si256(x1, x1) << 1
                         | (unsigned)_mm256_testz_si256(x2, x2) << 2 | (unsigned)_mm256_testz_si256(x3, x3) << 3;
                    if (!live)
                        break;
                } else {
                    for (s = 0; s < 4; s++) {
                        if (live >> s & 1) {
                            __m256i x = DP_OR4(q[s] + i);
                            if (!_mm256_testz_si256(x, x))
                                live &= ~(1u << s);
                        }
                    }
                    if (!live)
                        break;
                }
            }
            for (s = 0; s < 4; s++) {
                if (live >> s & 1) {
                    size_t b = s * quarter + k;
                    w[b >> 6] |= (uint64_t)1 << (b & 63);
                }
            }
        }
        pg = 4 * quarter;
    }
    for (; pg < np; pg++)
        if (dp_page_zero_avx2(p + pg * ps, ps))
            w[pg >> 6] |= (uint64_t)1 << (pg & 63);
    if (n % ps && dp_is_zero_avx2(p + np * ps, n % ps))
        w[np >> 6] |= (uint64_t)1 << (np & 63);
}
#endif /* DP_X86 */

/* ------------------------------------------------------------------ */
/* word scans for bitmaps                                               */
/* ------------------------------------------------------------------ */

/* index of the first word in [i, n) that is not zero, or n */
static size_t dp_find_nonzero_u64_generic(const uint64_t *w, size_t i, size_t n)
{
    while (i + 4 <= n) {
        if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3]) != 0)
            break;
        i += 4;
    }
    while (i < n && w[i] == 0)
        i++;
    return i;
}

/* index of the first word in [i, n) that is not all ones, or n */
static size_t dp_find_notones_u64_generic(const uint64_t *w, size_t i, size_t n)
{
    while (i + 4 <= n) {
        if ((w[i] & w[i + 1] & w[i + 2] & w[i + 3]) != UINT64_MAX)
            break;
        i += 4;
    }
    while (i < n && w[i] == UINT64_MAX)
        i++;
    return i;
}

static uint64_t dp_popcount_u64_generic(const uint64_t *w, size_t n)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += (uint64_t)__builtin_popcountll(w[i]);
    return total;
}

#if DP_X86
/* 16 words (128 bytes) per step; the exact word is found with compare masks */
__attribute__((target("avx2"))) static size_t dp_find_nonzero_u64_avx2(const uint64_t *w, size_t i, size_t n)
{
    const __m256i z = _mm256_setzero_si256();
    while (i + 16 <= n) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + i + 4));
        __m256i c = _mm256_loadu_si256((const __m256i *)(w + i + 8));
        __m256i d = _mm256_loadu_si256((const __m256i *)(w + i + 12));
        __m256i x = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
        if (!_mm256_testz_si256(x, x)) {
            unsigned m = (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(a, z)))
                       | (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(b, z))) << 4
                       | (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(c, z))) << 8
                       | (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(d, z))) << 12;
            return i + (size_t)__builtin_ctz(~m & 0xFFFFu);
        }
        i += 16;
    }
    while (i < n && w[i] == 0)
        i++;
    return i;
}

__attribute__((target("avx2"))) static size_t dp_find_notones_u64_avx2(const uint64_t *w, size_t i, size_t n)
{
    const __m256i ones = _mm256_set1_epi64x(-1);
    while (i + 16 <= n) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + i + 4));
        __m256i c = _mm256_loadu_si256((const __m256i *)(w + i + 8));
        __m256i d = _mm256_loadu_si256((const __m256i *)(w + i + 12));
        __m256i x = _mm256_and_si256(_mm256_and_si256(a, b), _mm256_and_si256(c, d));
        if (!_mm256_testc_si256(x, ones)) { /* testc: 1 iff every bit of x is set */
            unsigned m = (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(a, ones)))
                       | (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(b, ones))) << 4
                       | (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(c, ones))) << 8
                       | (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(d, ones))) << 12;
            return i + (size_t)__builtin_ctz(~m & 0xFFFFu);
        }
        i += 16;
    }
    while (i < n && w[i] == UINT64_MAX)
        i++;
    return i;
}

/* popcount of n words: nibble lookup (vpshufb) + vpsadbw, 4 words per step */
__attribute__((target("avx2"))) static uint64_t dp_popcount_u64_avx2(const uint64_t *w, size_t n)
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i acc = _mm256_setzero_si256();
    size_t i = 0;
    uint64_t total = 0;
    while (i + 16 <= n) {
        __m256i cnt = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + i + 4 * k));
            __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
            __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
            cnt = _mm256_add_epi8(cnt, _mm256_add_epi8(lo, hi)); /* <= 4 * 8 per byte: no overflow */
        }
        acc = _mm256_add_epi64(acc, _mm256_sad_epu8(cnt, _mm256_setzero_si256()));
        i += 16;
    }
    total = (uint64_t)_mm256_extract_epi64(acc, 0) + (uint64_t)_mm256_extract_epi64(acc, 1)
          + (uint64_t)_mm256_extract_epi64(acc, 2) + (uint64_t)_mm256_extract_epi64(acc, 3);
    for (; i < n; i++)
        total += (uint64_t)__builtin_popcountll(w[i]);
    return total;
}
#endif /* DP_X86 */

/* ------------------------------------------------------------------ */
/* run-time dispatch                                                    */
/* ------------------------------------------------------------------ */

typedef int (*dp_is_zero_fn)(const unsigned char *, size_t);
typedef size_t (*dp_find_u64_fn)(const uint64_t *, size_t, size_t);
typedef uint64_t (*dp_popcount_fn)(const uint64_t *, size_t);
typedef void (*dp_zero_pages_fn)(const unsigned char *, size_t, size_t, uint64_t *);

static dp_is_zero_fn dp_is_zero_impl = dp_is_zero_generic;
static dp_zero_pages_fn dp_zero_pages_impl = dp_zero_pages_generic;
static dp_find_u64_fn dp_find_nonzero_impl = dp_find_nonzero_u64_generic;
static dp_find_u64_fn dp_find_notones_impl = dp_find_notones_u64_generic;
static dp_popcount_fn dp_popcount_impl = dp_popcount_u64_generic;
static int dp_simd_level_cur = DP_SIMD_GENERIC;

/* best level this CPU supports */
static int dp_simd_best(void)
{
#if DP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        return DP_SIMD_AVX2;
    return DP_SIMD_SSE;
#else
    return DP_SIMD_GENERIC;
#endif
}

/* Select a kernel level: the requested one, capped at what the CPU supports
 * (level < 0 means "best"). Returns the level in use. */
static int dp_simd_init(int level)
{
    int best = dp_simd_best();
    if (level < 0 || level > best)
        level = best;
    dp_is_zero_impl = dp_is_zero_generic;
    dp_zero_pages_impl = dp_zero_pages_generic;
    dp_find_nonzero_impl = dp_find_nonzero_u64_generic;
    dp_find_notones_impl = dp_find_notones_u64_generic;
    dp_popcount_impl = dp_popcount_u64_generic;
#if DP_X86
    if (level >= DP_SIMD_SSE) {
        dp_is_zero_impl = dp_is_zero_sse;
        dp_zero_pages_impl = dp_zero_pages_sse;
    }
    if (level >= DP_SIMD_AVX2) {
        dp_is_zero_impl = dp_is_zero_avx2;
        dp_zero_pages_impl = dp_zero_pages_avx2;
        dp_find_nonzero_impl = dp_find_nonzero_u64_avx2;
        dp_find_notones_impl = dp_find_notones_u64_avx2;
        dp_popcount_impl = dp_popcount_u64_avx2;
    }
#endif
    dp_simd_level_cur = level;
    return level;
}

static inline int dp_simd_level(void) { return dp_simd_level_cur; }

/* 1 if the n bytes at p are all zero (n == 0 counts as zero) */
static inline int dp_is_zero(const unsigned char *p, size_t n) { return dp_is_zero_impl(p, n); }

static inline void dp_zero_pages(const unsigned char *p, size_t n, size_t ps, uint64_t *w)
{
    dp_zero_pages_impl(p, n, ps, w);
}

static inline size_t dp_find_nonzero_u64(const uint64_t *w, size_t i, size_t n)
{
    return dp_find_nonzero_impl(w, i, n);
}

static inline size_t dp_find_notones_u64(const uint64_t *w, size_t i, size_t n)
{
    return dp_find_notones_impl(w, i, n);
}

/* number of set bits in n words */
static inline uint64_t dp_popcount_u64(const uint64_t *w, size_t n) { return dp_popcount_impl(w, n); }

#endif /* DP_KERNELS_H */
