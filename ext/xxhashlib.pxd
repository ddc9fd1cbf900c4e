# The subset of the system libxxhash C API (xxhash 0.8, xxh_x86dispatch.h) the frame checksum uses.
# The *_dispatch entry points pick the widest vector kernel the CPU has at run time (AVX2 here:
# ~30 GB/s on cache-resident data), so one build runs everywhere.
from libc.stdint cimport uint64_t


cdef extern from "xxh_x86dispatch.h" nogil:
    ctypedef uint64_t XXH64_hash_t
    XXH64_hash_t XXH3_64bits_dispatch(const void *data, size_t length)
    XXH64_hash_t XXH3_64bits_withSeed_dispatch(const void *data, size_t length, XXH64_hash_t seed)
