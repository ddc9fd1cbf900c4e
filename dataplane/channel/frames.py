"""Wire format of the channel: preface, frame header, frame types, encoders and a bounded decoder.

A connection starts with a 16-byte :data:`PREFACE` from each side (magic and
the range of protocol versions it speaks), followed by frames. Every frame is
a fixed 32-byte header and a payload of ``length`` bytes::

    type u8 | flags u8 | reserved u16 | length u32 | stream_id u32 | aux u32 |
    offset u64 | seq u32 | check u32

all big-endian. ``check`` covers the first 28 header bytes and the payload:
the low 32 bits of ``XXH3_64(payload, seed=XXH3_64(header[0:28]))``
(:func:`dataplane.native.checksum.frame_checksum`, the system libxxhash,
~30 GB/s with AVX2). Version 1 used zlib's CRC-32, three times slower. The
complete table of frame types and fields is in ``docs/wire-format.md``; this
module is its executable form.

:class:`FrameDecoder` parses frames incrementally. It checks a header's
type and length *before* buffering any payload, so a length field from the
peer can never make it allocate more than ``HEADER_SIZE + max_data_payload``
bytes; it verifies the checksum and every per-type field rule before
returning a frame. It raises only :class:`~dataplane.channel.errors.ProtocolError`
subclasses.
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from dataplane.channel.errors import ChecksumError, ErrorCode, FrameSizeError, ProtocolError
from dataplane.native.checksum import frame_checksum

Buffer = bytes | bytearray | memoryview


def _uninit_allocator() -> Callable[[int], bytearray]:
    try:
        fn = ctypes.pythonapi.PyByteArray_FromStringAndSize
        fn.restype = ctypes.py_object
        fn.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
        if len(fn(None, 16)) != 16:
            raise OSError("unexpected result")
    except (AttributeError, OSError, TypeError):  # pragma: no cover - not CPython
        return bytearray
    return lambda n: fn(None, n)


#: ``alloc(n)``: a new bytearray of *n* bytes whose contents are undefined (not zeroed: it is about
#: to be overwritten by a socket read). Falls back to ``bytearray(n)`` outside CPython.
alloc = _uninit_allocator()

# ------------------------------------------------------------------ preface and versions

#: Lowest and highest protocol version this implementation speaks (version 1 had CRC-32 checksums).
MIN_VERSION = 2
MAX_VERSION = 2

#: First 8 bytes on every connection, from both sides (0x89 catches 7-bit and text mangling).
MAGIC = b"\x89DPCHAN\n"
#: Preface: magic, min_version u16, max_version u16, reserved u32 (zero).
PREFACE = struct.Struct("!8sHHI")
PREFACE_SIZE = PREFACE.size


def encode_preface(min_version: int = MIN_VERSION, max_version: int = MAX_VERSION) -> bytes:
    """The 16-byte connection preface announcing versions ``min_version..max_version``.

    Raises ValueError for an empty or out-of-range version range.
    """
    if not 1 <= min_version <= max_version <= 0xFFFF:
        raise ValueError(f"bad version range {min_version}..{max_version}")
    return PREFACE.pack(MAGIC, min_version, max_version, 0)


def decode_preface(data: Buffer) -> tuple[int, int]:
    """Parse a 16-byte preface and return the peer's ``(min_version, max_version)``.

    Raises ProtocolError if the magic is wrong (not a channel peer), the
    reserved field is not zero or the range is empty.
    """
    magic, lo, hi, reserved = PREFACE.unpack(bytes(data))
    if magic != MAGIC:
        raise ProtocolError("not a dataplane channel peer (bad preface magic)")
    if reserved != 0 or lo == 0 or lo > hi:
        raise ProtocolError(f"malformed preface (versions {lo}..{hi}, reserved {reserved})")
    return lo, hi


def negotiate_version(ours: tuple[int, int], theirs: tuple[int, int]) -> int | None:
    """The highest version in both ranges, or None if they do not overlap."""
    hi = min(ours[1], theirs[1])
    return hi if hi >= max(ours[0], theirs[0]) else None


# ------------------------------------------------------------------ frame header

#: The full 32-byte header.
HEADER = struct.Struct("!BBHIIIQII")
HEADER_SIZE = HEADER.size
_HEAD = struct.Struct("!BBHIIIQI")  # the 28 bytes that seed the checksum
_CHECK = struct.Struct("!I")
_CHECK_AT = _HEAD.size

MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF


class FrameType(IntEnum):
    """Frame types (the header's ``type`` byte)."""

    DATA = 0x01
    ACK = 0x02
    PING = 0x03
    PONG = 0x04
    GOAWAY = 0x05
    HELLO = 0x10
    WELCOME = 0x11
    REFUSE = 0x12
    OPEN = 0x20
    OPEN_OK = 0x21
    OPEN_FAIL = 0x22
    FIN = 0x23
    RESET = 0x24


#: Frames that carry a control sequence number and are delivered reliably, in order.
SEQUENCED = frozenset({
    FrameType.OPEN, FrameType.OPEN_OK, FrameType.OPEN_FAIL, FrameType.FIN, FrameType.RESET,
})

# DATA flags: bits 0-1 name the codec of the payload.
CODEC_MASK = 0x03
CODEC_RAW = 0
CODEC_PAGE = 1  # dataplane.native.codec body (zero-page elision + LZ4)
CODEC_ZLIB = 2  # zlib stream (a stdlib codec, for tests and as a fallback)
# HELLO flag: the HELLO joins (or resumes) the session named in it.
FLAG_JOIN = 0x01
# WELCOME flag: the connection joined an existing session.
FLAG_JOINED = 0x01

MAX_NAME = 1024  # OPEN payload (stream name, UTF-8)
MAX_REASON = 1024  # REFUSE / GOAWAY / OPEN_FAIL / RESET payload (UTF-8 reason)
#: The largest frame (header included) a peer may send before the channel handshake completes:
#: HELLO and WELCOME carry 80 bytes, REFUSE a reason of at most MAX_REASON bytes. A decoder
#: expecting a handshake frame checks type and size in the header, before reading any payload.
MAX_HANDSHAKE_FRAME = HEADER_SIZE + MAX_REASON
#: Frame types that may open a connection's frame sequence (see FrameDecoder.expect).
HANDSHAKE_TYPES = frozenset({FrameType.HELLO, FrameType.WELCOME, FrameType.REFUSE})
ACK_ENTRY = struct.Struct("!IIQQ")  # stream_id, reserved, received offset, limit
MAX_ACK_ENTRIES = 2048
MAX_ACK_PAYLOAD = ACK_ENTRY.size * MAX_ACK_ENTRIES


@dataclass(frozen=True, slots=True)
class _Rule:
    max_len: int  # -1: the decoder's max_data_payload
    min_len: int
    stream: bool  # stream_id must be non-zero (else zero)
    flags: int  # allowed flag bits


_RULES: dict[int, _Rule] = {
    FrameType.DATA: _Rule(-1, 1, True, CODEC_MASK),
    FrameType.ACK: _Rule(MAX_ACK_PAYLOAD, 0, False, 0),
    FrameType.PING: _Rule(0, 0, False, 0),
    FrameType.PONG: _Rule(0, 0, False, 0),
    FrameType.GOAWAY: _Rule(MAX_REASON, 0, False, 0),
    FrameType.HELLO: _Rule(80, 80, False, FLAG_JOIN),
    FrameType.WELCOME: _Rule(80, 80, False, FLAG_JOINED),
    FrameType.REFUSE: _Rule(MAX_REASON, 0, False, 0),
    FrameType.OPEN: _Rule(MAX_NAME, 1, True, 0),
    FrameType.OPEN_OK: _Rule(0, 0, True, 0),
    FrameType.OPEN_FAIL: _Rule(MAX_REASON, 0, True, 0),
    FrameType.FIN: _Rule(0, 0, True, 0),
    FrameType.RESET: _Rule(MAX_REASON, 0, True, 0),
}


class Frame(NamedTuple):
    """One decoded frame. ``payload`` is a bytes-like object owned by the frame (never reused)."""

    type: int
    flags: int
    stream_id: int
    aux: int
    offset: int
    seq: int
    payload: Buffer


def encode_frame(
    ftype: int,
    payload: Buffer = b"",
    *,
    flags: int = 0,
    stream_id: int = 0,
    aux: int = 0,
    offset: int = 0,
    seq: int = 0,
) -> tuple[bytes, Buffer]:
    """Encode one frame as ``(header, payload)`` without copying the payload.

    Write both parts (``writelines``) or join them. The payload must be a
    byte buffer (``len`` counts bytes). Raises struct.error if a field is out
    of its range.
    """
    head = _HEAD.pack(ftype, flags, 0, len(payload), stream_id, aux, offset, seq)
    return head + _CHECK.pack(frame_checksum(head, payload)), payload


def version_refusal(reason: bytes, peer_max_version: int) -> bytes:
    """A REFUSE (code ``VERSION``, payload *reason*) readable by a peer speaking up to *peer_max_version*.

    The header layout and REFUSE are frozen across versions, but the
    checksum is not: a peer that speaks only version 1 gets the version-1
    checksum (zlib's CRC-32 over the same bytes), so a peer that reads on
    after the preface can still check it and read why.
    Raises ValueError if *reason* is longer than a REFUSE allows.
    """
    if len(reason) > MAX_REASON:
        raise ValueError(f"reason of {len(reason)} bytes (limit {MAX_REASON})")
    if peer_max_version >= 2:
        return frame_bytes(FrameType.REFUSE, reason, aux=ErrorCode.VERSION)
    head = _HEAD.pack(FrameType.REFUSE, 0, 0, len(reason), 0, ErrorCode.VERSION, 0, 0)
    return head + _CHECK.pack(zlib.crc32(reason, zlib.crc32(head))) + reason


def frame_bytes(ftype: int, payload: Buffer = b"", **fields: int) -> bytes:
    """:func:`encode_frame` joined into one bytes object (convenient for small frames and tests)."""
    head, body = encode_frame(ftype, payload, **fields)
    return head + bytes(body) if body else head


# ------------------------------------------------------------------ payload structures

_HELLO = struct.Struct("!16s32sIIQQII")


@dataclass(frozen=True, slots=True)
class HelloParams:
    """Payload of HELLO (client) and WELCOME (server): 80 bytes.

    ``session_id``/``token``: 16 and 32 bytes, all zero in a HELLO that
    creates a session (and in the WELCOME of a join). The rest advertises
    the sender's receive limits and the codecs it can decode (bit *i* set
    means codec id *i* is understood).
    """

    session_id: bytes = bytes(16)
    token: bytes = bytes(32)
    max_frame_payload: int = 1 << 20
    max_streams: int = 64
    stream_window: int = 16 << 20
    session_window: int = 32 << 20
    codecs: int = 1 << CODEC_RAW

    def pack(self) -> bytes:
        """Serialise to 80 bytes. Raises ValueError for a wrong-sized id/token."""
        if len(self.session_id) != 16 or len(self.token) != 32:
            raise ValueError("session_id must be 16 bytes and token 32 bytes")
        return _HELLO.pack(self.session_id, self.token, self.max_frame_payload, self.max_streams,
                           self.stream_window, self.session_window, self.codecs, 0)

    @classmethod
    def unpack(cls, payload: Buffer) -> HelloParams:
        """Parse an 80-byte payload. Raises ProtocolError for a bad size or absurd values."""
        if len(payload) != _HELLO.size:
            raise FrameSizeError(f"handshake payload is {len(payload)} bytes, expected {_HELLO.size}")
        sid, token, mfp, mstreams, swin, sesswin, codecs, reserved = _HELLO.unpack(payload)
        if reserved != 0:
            raise ProtocolError("handshake reserved field is not zero")
        if mfp < 4096 or mstreams < 1 or swin < 1 or sesswin < 1:
            raise ProtocolError(
                f"handshake advertises unusable limits (max_frame_payload={mfp}, max_streams={mstreams}, "
                f"stream_window={swin}, session_window={sesswin})")
        return cls(sid, token, mfp, mstreams, swin, sesswin, codecs)


def encode_ack_entries(entries: list[tuple[int, int, int]]) -> bytes:
    """Pack ``(stream_id, received, limit)`` triples into an ACK payload."""
    pack = ACK_ENTRY.pack
    return b"".join(pack(sid, 0, recv, limit) for sid, recv, limit in entries)


def decode_ack_entries(payload: Buffer) -> list[tuple[int, int, int]]:
    """Unpack an ACK payload into ``(stream_id, received, limit)`` triples.

    Raises ProtocolError for a length that is not a whole number of entries,
    a zero stream id, a non-zero reserved field or received > limit.
    """
    if len(payload) % ACK_ENTRY.size:
        raise FrameSizeError(f"ACK payload of {len(payload)} bytes is not a multiple of {ACK_ENTRY.size}")
    out = []
    for sid, reserved, recv, limit in ACK_ENTRY.iter_unpack(payload):
        if sid == 0 or reserved != 0 or recv > limit:
            raise ProtocolError(f"malformed ACK entry (stream {sid}, received {recv}, limit {limit})")
        out.append((sid, recv, limit))
    return out


def encode_text(text: str, limit: int) -> bytes:
    """UTF-8 encode *text*, truncated (on a character boundary) to at most *limit* bytes."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def decode_text(payload: Buffer) -> str:
    """Decode a UTF-8 name or reason (invalid sequences replaced, never raises)."""
    return bytes(payload).decode("utf-8", "replace")


# ------------------------------------------------------------------ decoder

#: Payloads at least this large are received straight into their own buffer
#: by :meth:`FrameDecoder.get_buffer` (zero-copy path for asyncio.BufferedProtocol).
DIRECT_MIN = 64 * 1024


class FrameDecoder:
    """Incremental, bounded frame parser for one connection (after the preface).

    Two ways to feed it:

    * :meth:`feed` with any bytes-like chunk (payloads lying whole inside an
      immutable ``bytes`` chunk are returned as views, others are copied);
    * :meth:`get_buffer` / :meth:`buffer_updated`, the shape of
      ``asyncio.BufferedProtocol``: large payloads are read by the socket
      straight into their final buffer, together with the header of the
      next frame (a buffer of ``length + HEADER_SIZE`` bytes), so that a
      run of large frames is received with no copy in user space at all;
      while such a run lasts, a header that was not read along with the
      previous payload is read on its own.

    Memory held between calls is at most one partial frame
    (``2 * HEADER_SIZE + max_data_payload``) plus a fixed scratch buffer,
    allocated on the first :meth:`get_buffer`. While :meth:`expect` restricts
    the frame types, a frame of another type, or larger than
    :data:`MAX_HANDSHAKE_FRAME`, is refused from its header, before any of its
    payload is read. After an error the decoder stays failed and raises
    ProtocolError on any input.
    """

    __slots__ = ("max_data_payload", "_hdr", "_hfill", "_fields", "_headbytes", "_payload", "_plen",
                 "_pfill", "_scratch", "_scratch_size", "_direct", "_bulk", "_failed", "_expect",
                 "_expect_next", "_expect_first")

    def __init__(self, max_data_payload: int, *, scratch_size: int = 256 * 1024) -> None:
        if max_data_payload < 1 or max_data_payload > MAX_U32:
            raise ValueError(f"max_data_payload out of range: {max_data_payload}")
        self.max_data_payload = max_data_payload
        self._hdr = bytearray(HEADER_SIZE)
        self._hfill = 0
        self._fields: tuple[int, ...] | None = None
        self._headbytes = b""
        self._payload: bytearray | None = None  # buffer of the partial payload: _plen bytes (+ slack)
        self._plen = 0
        self._pfill = 0
        self._scratch: memoryview | None = None  # allocated by the first get_buffer
        self._scratch_size = max(scratch_size, HEADER_SIZE)
        self._direct = False
        self._bulk = False  # the last frame completed was a large one
        self._failed: ProtocolError | None = None
        self._expect: frozenset[int] | None = None  # frame types allowed next (None: any)
        self._expect_next: frozenset[int] | None = None  # ... and after that one
        self._expect_first = False  # _expect applies to the first frame since expect()

    def expect(self, first: frozenset[int] | None, then: frozenset[int] | None = None) -> None:
        """Allow only the types in *first* for the next frame, then only those in *then*, until the
        next call (None: any type; an empty set: no frame at all).

        While types are restricted a frame must also fit :data:`MAX_HANDSHAKE_FRAME`. Both checks
        are made on the header, before any of the payload is read: that is how a connection takes
        only small handshake frames before its handshake completes. Raises nothing itself; the
        feeding calls raise ProtocolError (FrameSizeError for the size).
        """
        self._expect = first
        self._expect_next = then
        self._expect_first = True

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame currently held."""
        return self._hfill if self._payload is None else HEADER_SIZE + self._pfill

    @property
    def allocated(self) -> int:
        """Bytes allocated for an incomplete frame (header plus its payload buffer)."""
        return HEADER_SIZE + (len(self._payload) if self._payload is not None else 0)

    def feed(self, data: Buffer) -> list[Frame]:
        """Parse *data* and return the frames it completes, in order.

        Raises ProtocolError (ChecksumError, FrameSizeError, ...) on the first
        invalid frame; frames completed earlier in the same chunk are then lost
        (the connection is dead anyway).
        """
        if self._failed is not None:
            raise ProtocolError(f"decoder already failed: {self._failed}")
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self._failed = exc
            self._payload = None
            raise

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer for the next socket read (``asyncio.BufferedProtocol.get_buffer``).

        Follow every call with :meth:`buffer_updated`. The returned view is
        only valid until then.
        """
        p = self._payload
        self._direct = False
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = memoryview(bytearray(self._scratch_size))
        if p is not None:
            if len(p) > self._plen:  # a large payload: read the rest in place, plus the next header
                self._direct = True
                return memoryview(p)[self._pfill:]
            if self._bulk:  # a small frame within a run of large ones: up to the next header only
                return scratch[:self._plen - self._pfill + HEADER_SIZE]
        elif self._bulk:  # in a run of large frames: the header alone, its payload then goes in place
            return scratch[:HEADER_SIZE - self._hfill]
        return scratch

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Account for *nbytes* written into the last :meth:`get_buffer` view; return completed frames.

        Raises ProtocolError like :meth:`feed`, ValueError if *nbytes* is
        larger than the buffer handed out.
        """
        if self._failed is not None:
            raise ProtocolError(f"decoder already failed: {self._failed}")
        if not self._direct:
            scratch = self._scratch
            if scratch is None or not 0 <= nbytes <= len(scratch):
                raise ValueError(f"buffer_updated({nbytes}) beyond the buffer")
            return self.feed(scratch[:nbytes])
        self._direct = False
        p = self._payload
        assert p is not None
        if not 0 <= nbytes <= len(p) - self._pfill:
            raise ValueError(f"buffer_updated({nbytes}) beyond the buffer")
        fill = self._pfill = self._pfill + nbytes
        plen = self._plen
        if fill < plen:
            return []
        self._payload = None
        self._bulk = True
        try:
            frames = [self._finish(memoryview(p)[:plen])]
            if fill > plen:  # the start of the next frame's header
                frames += self._feed(memoryview(p)[plen:fill])
        except ProtocolError as exc:
            self._failed = exc
            self._payload = None
            raise
        return frames

    # -- internals

    def _feed(self, data: Buffer) -> list[Frame]:
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        immutable = isinstance(data, bytes)
        n = len(mv)
        view_min = n >> 2  # hand out views only when they pin at most 4x their size
        frames: list[Frame] = []
        pos = 0
        unpack = HEADER.unpack_from
        while pos < n:
            if self._payload is None:
                # ---- header
                if self._hfill == 0 and n - pos >= HEADER_SIZE:
                    fields = unpack(mv, pos)
                    head = bytes(mv[pos:pos + _CHECK_AT])
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - self._hfill, n - pos)
                    self._hdr[self._hfill:self._hfill + take] = mv[pos:pos + take]
                    self._hfill += take
                    pos += take
                    if self._hfill < HEADER_SIZE:
                        break
                    self._hfill = 0
                    fields = unpack(self._hdr)
                    head = bytes(self._hdr[:_CHECK_AT])
                length = self._check_header(fields)
                self._fields = fields
                self._headbytes = head
                if n - pos >= length:
                    if length == 0:
                        payload: Buffer = b""
                    elif immutable and length >= view_min:
                        payload = mv[pos:pos + length]
                    else:
                        payload = bytes(mv[pos:pos + length])
                    pos += length
                    if fields[0] == FrameType.DATA:  # a run of large DATA frames goes on through ACKs
                        self._bulk = length >= DIRECT_MIN
                    frames.append(self._finish(payload))
                    continue
                # a large payload gets room for the next header: the socket may read it along
                self._payload = alloc(length + HEADER_SIZE if length >= DIRECT_MIN else length)
                self._plen = length
                self._pfill = 0
            # ---- payload continuation
            p = self._payload
            plen = self._plen
            take = min(plen - self._pfill, n - pos)
            p[self._pfill:self._pfill + take] = mv[pos:pos + take]
            self._pfill += take
            pos += take
            if self._pfill == plen:
                self._payload = None
                if self._fields is not None and self._fields[0] == FrameType.DATA:
                    self._bulk = plen >= DIRECT_MIN
                frames.append(self._finish(p if len(p) == plen else memoryview(p)[:plen]))
        return frames

    def _check_header(self, fields: tuple[int, ...]) -> int:
        ftype, length = fields[0], fields[3]
        rule = _RULES.get(ftype)
        if rule is None:
            raise ProtocolError(f"unknown frame type 0x{ftype:02x}")
        limit = self.max_data_payload if rule.max_len < 0 else rule.max_len
        allowed = self._expect
        if allowed is not None:
            if ftype not in allowed:
                name = FrameType(ftype).name
                if not self._expect_first and ftype in HANDSHAKE_TYPES:
                    raise ProtocolError(f"{name} frame after the handshake")
                wanted = "/".join(FrameType(t).name for t in sorted(allowed)) or "nothing before our answer"
                raise ProtocolError(f"unexpected {name} frame during the handshake (expected {wanted})")
            limit = min(limit, MAX_HANDSHAKE_FRAME - HEADER_SIZE)
            self._expect = self._expect_next
            self._expect_first = False
        if length > limit:
            raise FrameSizeError(
                f"{FrameType(ftype).name} frame of {length} bytes exceeds the limit of {limit}")
        return length

    def _finish(self, payload: Buffer) -> Frame:
        fields = self._fields
        assert fields is not None
        ftype, flags, reserved, length, sid, aux, offset, seq, check = fields
        if frame_checksum(self._headbytes, payload) != check:
            raise ChecksumError(f"{_type_name(ftype)} frame checksum mismatch")
        rule = _RULES[ftype]
        if length < rule.min_len:
            raise FrameSizeError(f"{_type_name(ftype)} frame of {length} bytes is too short")
        if reserved != 0 or flags & ~rule.flags:
            raise ProtocolError(f"{_type_name(ftype)} frame has reserved bits set")
        if rule.stream != (sid != 0):
            raise ProtocolError(
                f"{_type_name(ftype)} frame {'needs' if rule.stream else 'must not have'} a stream id")
        if (ftype in SEQUENCED) != (seq != 0):
            raise ProtocolError(f"{_type_name(ftype)} frame has a bad sequence number {seq}")
        if ftype == FrameType.DATA:
            if aux > self.max_data_payload or aux == 0:
                raise FrameSizeError(
                    f"DATA frame declares {aux} decoded bytes (limit {self.max_data_payload})")
            if flags & CODEC_MASK == CODEC_RAW and aux != length:
                raise ProtocolError(f"raw DATA frame declares {aux} bytes but carries {length}")
            if offset + aux > MAX_U64:
                raise ProtocolError("DATA frame offset overflows")
        return Frame(ftype, flags, sid, aux, offset, seq, payload)


def _type_name(ftype: int) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"0x{ftype:02x}"
