# The subset of the system liblz4 C API (lz4.h, stable section) the codec uses:
# plain LZ4 block compression and safe (bounds-checked) decompression.


cdef extern from "lz4.h" nogil:
    int LZ4_MAX_INPUT_SIZE

    int LZ4_versionNumber()
    const char *LZ4_versionString()
    int LZ4_compressBound(int inputSize)
    int LZ4_compress_fast(const char *src, char *dst, int srcSize, int dstCapacity, int acceleration)
    int LZ4_sizeofState()
    # Same as LZ4_compress_fast() with caller-owned state (no per-call stack/heap state);
    # the state is (re)initialised by each call, so every block is independent.
    int LZ4_compress_fast_extState(void *state, const char *src, char *dst,
                                   int srcSize, int dstCapacity, int acceleration)
    # Never writes past dstCapacity nor reads past compressedSize; < 0 on malformed input.
    int LZ4_decompress_safe(const char *src, char *dst, int compressedSize, int dstCapacity)
