"""Native byte-level kernels of the data plane (Cython, built from ``ext/``).

Four extension modules, re-exported here:

``dataplane.native.zero``
    :func:`is_zero`, :func:`zero_pages` - vectorised zero-page detection
    (SSE baseline, AVX2 chosen at run time).
``dataplane.native.bitmap``
    :class:`Bitmap` - dirty bitmaps (one bit per ``granularity`` bytes) with
    byte-range updates, OR / AND-NOT merging, fast extent listing and a
    checksummed serialisation.
``dataplane.native.codec``
    :class:`PageEncoder`, :func:`encode`, :func:`decode`, :func:`decode_into`,
    :func:`decoded_size`, :func:`max_encoded_size` - the page codec (zero-page
    elision plus adaptive LZ4 through the system liblz4), and the raw LZ4
    block helpers :func:`lz4_compress_block` / :func:`lz4_decompress_block`.
``dataplane.native.checksum``
    :func:`frame_checksum` - the channel's frame checksum (XXH3 through the
    system libxxhash), and :func:`xxh3_64`.

Every function takes any buffer-protocol object (bytes, bytearray,
memoryview, mmap, array, ...) without copying it, read-only buffers
included, and runs its byte loops without the GIL (the frame checksum: from
64 KiB of payload; shorter ones are not worth the switch). Non-contiguous buffers
are rejected with ValueError. Formats are documented in ``docs/native.md``.
"""

from dataplane.native.bitmap import Bitmap
from dataplane.native.checksum import frame_checksum, xxh3_64
from dataplane.native.codec import (
    CodecError,
    PageEncoder,
    decode,
    decode_into,
    decoded_size,
    encode,
    lz4_compress_block,
    lz4_decompress_block,
    max_encoded_size,
)
from dataplane.native.zero import is_zero, simd_level, zero_pages

__all__ = [
    "Bitmap",
    "CodecError",
    "PageEncoder",
    "decode",
    "decode_into",
    "decoded_size",
    "encode",
    "frame_checksum",
    "is_zero",
    "lz4_compress_block",
    "lz4_decompress_block",
    "max_encoded_size",
    "simd_level",
    "xxh3_64",
    "zero_pages",
]
