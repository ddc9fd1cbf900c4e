"""Wire format: frame round trips, checksums, bounded incremental decoding, preface and versions."""

from __future__ import annotations

import ctypes
import ctypes.util
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.channel.errors import ChecksumError, FrameSizeError, ProtocolError, VersionError
from dataplane.channel.frames import (
    CODEC_PAGE,
    CODEC_RAW,
    FLAG_JOIN,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_HANDSHAKE_FRAME,
    MAX_NAME,
    PREFACE_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    HelloParams,
    alloc,
    decode_ack_entries,
    decode_preface,
    encode_ack_entries,
    encode_frame,
    encode_preface,
    encode_text,
    frame_bytes,
    negotiate_version,
    version_refusal,
)
from dataplane.channel.protocol import Connection, ConnState, Role
from dataplane.native.checksum import frame_checksum, xxh3_64

MAX = 1 << 20


def one_frame(ftype: int, payload: bytes = b"", **fields: int) -> Frame:
    frames = FrameDecoder(MAX).feed(frame_bytes(ftype, payload, **fields))
    assert len(frames) == 1
    return frames[0]


HELLO = HelloParams(bytes(range(16)), bytes(range(32)), 1 << 20, 64, 16 << 20, 32 << 20, 0b111).pack()

# one valid instance of every frame type: (type, payload, fields)
EXAMPLES: list[tuple[int, bytes, dict[str, int]]] = [
    (FrameType.DATA, b"payload" * 100, dict(stream_id=3, aux=700, offset=123456789)),
    (FrameType.DATA, b"\x01compressed", dict(stream_id=1, aux=5000, offset=0, flags=CODEC_PAGE)),
    (FrameType.ACK, encode_ack_entries([(1, 10, 20), (2, 0, 5)]), dict(aux=7, offset=99)),
    (FrameType.ACK, b"", dict(aux=1, offset=1 << 40)),
    (FrameType.PING, b"", dict(aux=42)),
    (FrameType.PONG, b"", dict(aux=42, offset=5)),
    (FrameType.GOAWAY, b"bye", dict(aux=2)),
    (FrameType.HELLO, HELLO, dict(flags=FLAG_JOIN)),
    (FrameType.WELCOME, HELLO, dict()),
    (FrameType.REFUSE, "nope \u2603".encode(), dict(aux=8)),
    (FrameType.OPEN, b"migration/ram", dict(stream_id=5, seq=1, offset=1 << 24)),
    (FrameType.OPEN_OK, b"", dict(stream_id=5, seq=2, offset=1 << 24)),
    (FrameType.OPEN_FAIL, b"no disk", dict(stream_id=7, seq=3, aux=13)),
    (FrameType.FIN, b"", dict(stream_id=5, seq=4, offset=1000)),
    (FrameType.RESET, b"cancelled", dict(stream_id=5, seq=5, aux=12, offset=999)),
]


@pytest.mark.parametrize("ftype,payload,fields", EXAMPLES, ids=lambda v: getattr(v, "name", None))
def test_round_trip_every_frame_type(ftype, payload, fields):
    f = one_frame(ftype, payload, **fields)
    assert f.type == ftype
    assert bytes(f.payload) == payload
    for name in ("flags", "stream_id", "aux", "offset", "seq"):
        assert getattr(f, name) == fields.get(name, 0)


def test_every_type_is_covered():
    assert {t for t, _, _ in EXAMPLES} == set(FrameType)


def test_many_frames_in_one_chunk_and_byte_by_byte():
    blob = b"".join(frame_bytes(t, p, **kw) for t, p, kw in EXAMPLES)
    whole = FrameDecoder(MAX).feed(blob)
    dec = FrameDecoder(MAX)
    trickled: list[Frame] = []
    for i in range(len(blob)):
        trickled += dec.feed(blob[i:i + 1])
    assert [(f.type, bytes(f.payload)) for f in whole] == [(t, p) for t, p, _ in EXAMPLES]
    assert [(f.type, bytes(f.payload)) for f in trickled] == [(t, p) for t, p, _ in EXAMPLES]
    assert dec.buffered == 0


def test_truncated_input_waits_for_more():
    blob = frame_bytes(FrameType.DATA, b"x" * 5000, stream_id=1, aux=5000)
    dec = FrameDecoder(MAX)
    assert dec.feed(blob[:10]) == []
    assert dec.feed(blob[10:HEADER_SIZE + 100]) == []
    assert dec.buffered == HEADER_SIZE + 100
    frames = dec.feed(blob[HEADER_SIZE + 100:])
    assert len(frames) == 1 and bytes(frames[0].payload) == b"x" * 5000


def test_payload_corruption_is_a_checksum_error():
    blob = bytearray(frame_bytes(FrameType.DATA, b"abcdef" * 1000, stream_id=1, aux=6000))
    blob[HEADER_SIZE + 1234] ^= 0x40
    with pytest.raises(ChecksumError):
        FrameDecoder(MAX).feed(bytes(blob))


@pytest.mark.parametrize("byte", [1, 8, 12, 16, 24, 28, 31])
def test_header_corruption_is_detected(byte):
    blob = bytearray(frame_bytes(FrameType.FIN, b"", stream_id=5, seq=4, offset=1000))
    blob[byte] ^= 0x01
    with pytest.raises(ProtocolError):
        FrameDecoder(MAX).feed(bytes(blob))


def test_huge_length_rejected_from_the_header_alone_without_allocating():
    head = struct.pack("!BBHIIIQII", FrameType.DATA, 0, 0, 0xFFFFFFFF, 1, 1, 0, 0, 0)
    dec = FrameDecoder(MAX)
    with pytest.raises(FrameSizeError):
        dec.feed(head)  # no payload byte was sent: the header alone is refused
    assert dec.allocated == HEADER_SIZE
    # control frames have their own small limits
    head = struct.pack("!BBHIIIQII", FrameType.OPEN, 0, 0, MAX_NAME + 1, 1, 0, 0, 1, 0)
    with pytest.raises(FrameSizeError):
        FrameDecoder(MAX).feed(head)


def test_just_over_the_data_limit_is_rejected():
    dec = FrameDecoder(4096)
    with pytest.raises(FrameSizeError):
        dec.feed(frame_bytes(FrameType.DATA, b"x" * 4097, stream_id=1, aux=4097))
    assert len(FrameDecoder(4096).feed(frame_bytes(FrameType.DATA, b"x" * 4096, stream_id=1, aux=4096))) == 1


def test_unknown_type_rejected():
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder(MAX).feed(frame_bytes(0x7F, b""))


@pytest.mark.parametrize("ftype,payload,fields,match", [
    (FrameType.DATA, b"abc", dict(stream_id=0, aux=3), "stream id"),
    (FrameType.ACK, b"", dict(stream_id=3), "stream id"),
    (FrameType.OPEN, b"x", dict(stream_id=1, seq=0), "sequence"),
    (FrameType.PING, b"", dict(seq=9), "sequence"),
    (FrameType.PING, b"", dict(flags=0x80), "reserved"),
    (FrameType.DATA, b"abc", dict(stream_id=1, aux=4), "declares"),
    (FrameType.DATA, b"abc", dict(stream_id=1, aux=0, flags=CODEC_PAGE), "declares"),
    (FrameType.HELLO, b"short", dict(), "too short"),
    (FrameType.OPEN, b"", dict(stream_id=1, seq=1), "too short"),
    (FrameType.ACK, b"x" * 23, dict(), None),
])
def test_field_rules(ftype, payload, fields, match):
    with pytest.raises(ProtocolError, match=match):
        f = one_frame(ftype, payload, **fields)
        if f.type == FrameType.ACK:
            decode_ack_entries(f.payload)


def test_decoder_stays_failed():
    dec = FrameDecoder(MAX)
    with pytest.raises(ProtocolError):
        dec.feed(frame_bytes(0x7F))
    with pytest.raises(ProtocolError, match="already failed"):
        dec.feed(frame_bytes(FrameType.PING))


def test_encode_frame_does_not_copy_the_payload():
    payload = memoryview(bytearray(b"z" * 10000))
    head, body = encode_frame(FrameType.DATA, payload, stream_id=1, aux=10000)
    assert body is payload
    fields = HEADER.unpack(head)
    assert fields[3] == 10000
    assert fields[-1] == xxh3_64(payload, xxh3_64(head[:28])) & 0xFFFFFFFF


def test_payload_views_only_for_large_payloads_of_immutable_chunks():
    big = frame_bytes(FrameType.DATA, b"b" * 100_000, stream_id=1, aux=100_000)
    small = frame_bytes(FrameType.PING)
    frames = FrameDecoder(MAX).feed(big + small)
    assert isinstance(frames[0].payload, memoryview)
    frames = FrameDecoder(MAX).feed(bytearray(big))
    assert isinstance(frames[0].payload, bytes)  # mutable input: copied


def test_buffered_protocol_path_reads_large_payloads_in_place():
    payload = bytes(range(256)) * 1024  # 256 KiB
    blob = frame_bytes(FrameType.DATA, payload, stream_id=1, aux=len(payload)) + frame_bytes(FrameType.PING)
    dec = FrameDecoder(MAX, scratch_size=4096)
    frames: list[Frame] = []
    pos = 0
    direct_reads = 0
    while pos < len(blob):
        buf = dec.get_buffer(-1)
        if len(buf) > 4096:
            direct_reads += 1
        n = min(len(buf), len(blob) - pos, 70_000)
        buf[:n] = blob[pos:pos + n]
        pos += n
        frames += dec.buffer_updated(n)
    assert direct_reads > 0
    assert [f.type for f in frames] == [FrameType.DATA, FrameType.PING]
    assert bytes(frames[0].payload) == payload


def _libxxhash_xxh3(data: bytes, seed: int) -> int:
    """XXH3-64 straight from the system library's portable entry point (not the dispatching one we use)."""
    lib = ctypes.CDLL(ctypes.util.find_library("xxhash") or "libxxhash.so.0")
    fn = lib.XXH3_64bits_withSeed
    fn.restype = ctypes.c_uint64
    fn.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64)
    return fn(data, len(data), seed)


def test_xxh3_known_answers():
    assert xxh3_64(b"") == 0x2D06800538D394C2  # the XXH3-64 of nothing, seed 0 (xxHash's test vector)
    rng = random.Random(5)
    for n in (0, 1, 3, 16, 17, 128, 129, 240, 241, 1024, 65535, 65536, (1 << 20) + 3):
        data = rng.randbytes(n)
        seed = rng.getrandbits(64)
        assert xxh3_64(data, seed) == _libxxhash_xxh3(data, seed), n


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=28, max_size=28), st.binary(max_size=5000), st.integers(0, 64))
def test_frame_checksum_covers_header_and_payload(head, data, skip):
    """Any data, unaligned views: the value is the specified one; a bit flip at either end of the header
    or of the payload changes it."""
    want = xxh3_64(data, xxh3_64(head)) & 0xFFFFFFFF
    assert frame_checksum(head, data) == want
    view = memoryview(data)[skip:]
    assert frame_checksum(memoryview(head), view) == xxh3_64(view, xxh3_64(head)) & 0xFFFFFFFF
    for blob, where in ((head, 0), (head, 27), (data, 0), (data, len(data) - 1)):
        if not blob:
            continue
        flipped = bytearray(blob)
        flipped[where] ^= 0x10
        h, d = (bytes(flipped), data) if blob is head else (head, bytes(flipped))
        assert frame_checksum(h, d) != want


def test_frame_checksum_rejects_non_buffers():
    with pytest.raises(TypeError):
        frame_checksum("text", b"")
    with pytest.raises(TypeError):
        frame_checksum(b"", 5)


def test_server_refuses_a_version_1_client_with_a_crc32_checked_refusal():
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    with pytest.raises(VersionError, match="peer speaks 1..1"):
        server.receive(encode_preface(1, 1))
    pending = server.pending_output
    out = b"".join(server.take())
    assert pending == len(out)  # the refusal is counted like any queued frame
    refusal = out[PREFACE_SIZE:]
    fields = HEADER.unpack(refusal[:HEADER_SIZE])
    assert fields[0] == FrameType.REFUSE and fields[5] == VersionError.code and fields[3] == len(refusal) - 32
    assert fields[-1] == zlib.crc32(refusal[HEADER_SIZE:], zlib.crc32(refusal[:28]))  # version 1's checksum
    assert b"no common protocol version" in refusal[HEADER_SIZE:]
    # a peer speaking 1..3 negotiates 2; one speaking only 3..4 gets a version-2 (XXH3) refusal
    assert negotiate_version((2, 2), (1, 3)) == 2
    newer = Connection(Role.SERVER, max_frame_payload=MAX)
    with pytest.raises(VersionError):
        newer.receive(encode_preface(3, 4))
    (refuse,) = FrameDecoder(MAX).feed(b"".join(newer.take())[PREFACE_SIZE:])
    assert refuse.type == FrameType.REFUSE


def test_version_refusal_is_readable_by_a_version_1_peer():
    """Version 1 checked frames with zlib's CRC-32: its refusal carries that checksum, later ones XXH3."""
    old = version_refusal(b"no common protocol version", 1)
    fields = HEADER.unpack(old[:HEADER_SIZE])
    assert fields[0] == FrameType.REFUSE and fields[5] == VersionError.code
    assert fields[-1] == zlib.crc32(old[HEADER_SIZE:], zlib.crc32(old[:28]))
    (new,) = FrameDecoder(MAX).feed(version_refusal(b"no common protocol version", 3))
    assert new.type == FrameType.REFUSE and bytes(new.payload) == b"no common protocol version"


def test_alloc_gives_a_fresh_writable_bytearray():
    a, b = alloc(1000), alloc(1000)
    assert isinstance(a, bytearray) and len(a) == 1000 and a is not b
    a[:] = b"x" * 1000
    memoryview(b)[:3] = b"abc"
    assert a == b"x" * 1000 and b[:3] == b"abc"


def test_runs_of_large_frames_are_received_without_any_copy():
    """Large payloads go straight into their buffer, with the next header read along; no bulk copies."""
    rng = random.Random(3)
    sizes = [200_000, 1 << 20, 70_000, 1 << 20, 100, 300_000, 0, (1 << 20) - 5, 65_536]
    frames_in = []
    blob = bytearray()
    for i, n in enumerate(sizes):
        if n == 0:
            blob += frame_bytes(FrameType.PING, aux=i)
            frames_in.append((FrameType.PING, b""))
            continue
        data = rng.randbytes(n)
        blob += frame_bytes(FrameType.DATA, data, stream_id=1, aux=n, offset=i)
        frames_in.append((FrameType.DATA, data))
    for max_read in (1 << 30, 1 << 20, 100_000, 4097):
        dec = FrameDecoder(MAX, scratch_size=64 * 1024)
        got: list[Frame] = []
        pos = 0
        scratch_bytes = 0
        while pos < len(blob):
            buf = dec.get_buffer(-1)
            n = min(len(buf), len(blob) - pos, max_read)
            buf[:n] = blob[pos:pos + n]
            if not dec._direct:
                scratch_bytes += n
            pos += n
            got += dec.buffer_updated(n)
        assert [(f.type, bytes(f.payload)) for f in got] == frames_in
        assert dec.buffered == 0
        # only headers, small frames and the first bytes of a run go through the scratch buffer
        assert scratch_bytes < 64 * 1024 + 100 + 20 * HEADER_SIZE, (max_read, scratch_bytes)


def test_direct_payload_views_are_never_overwritten():
    payload = bytes(range(256)) * 1024
    blob = frame_bytes(FrameType.DATA, payload, stream_id=1, aux=len(payload)) * 3
    dec = FrameDecoder(MAX, scratch_size=4096)
    got: list[Frame] = []
    pos = 0
    while pos < len(blob):
        buf = dec.get_buffer(-1)
        n = min(len(buf), len(blob) - pos)
        buf[:n] = blob[pos:pos + n]
        pos += n
        got += dec.buffer_updated(n)
    assert len(got) == 3 and all(bytes(f.payload) == payload for f in got)


def test_hello_params_round_trip_and_validation():
    p = HelloParams.unpack(HELLO)
    assert p.session_id == bytes(range(16)) and p.token == bytes(range(32))
    assert (p.max_frame_payload, p.max_streams, p.codecs) == (1 << 20, 64, 0b111)
    with pytest.raises(ProtocolError):
        HelloParams.unpack(HelloParams(max_frame_payload=10).pack())
    with pytest.raises(ValueError):
        HelloParams(session_id=b"short").pack()


def test_ack_entries_round_trip():
    entries = [(1, 0, 10), (3, 5, 5), (0xFFFFFFFF, 1 << 50, 1 << 51)]
    assert decode_ack_entries(encode_ack_entries(entries)) == entries
    with pytest.raises(ProtocolError):
        decode_ack_entries(encode_ack_entries([(1, 11, 10)]))


def test_preface_and_version_negotiation():
    assert len(encode_preface()) == PREFACE_SIZE
    assert decode_preface(encode_preface(1, 3)) == (1, 3)
    with pytest.raises(ProtocolError, match="magic"):
        decode_preface(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError):
        decode_preface(MAGIC + struct.pack("!HHI", 3, 1, 0))
    assert negotiate_version((1, 3), (2, 5)) == 3
    assert negotiate_version((1, 1), (2, 3)) is None


def test_connection_version_mismatch_refused_with_reason():
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    client = Connection(Role.CLIENT, max_frame_payload=MAX, versions=(3, 4))
    with pytest.raises(VersionError, match="3..4"):
        server.receive(b"".join(client.take()))
    out = b"".join(server.take())
    assert out[:PREFACE_SIZE] == encode_preface()
    (refuse,) = FrameDecoder(MAX).feed(out[PREFACE_SIZE:])
    assert refuse.type == FrameType.REFUSE and refuse.aux == VersionError.code
    assert b"no common protocol version" in bytes(refuse.payload)
    with pytest.raises(VersionError):
        client.receive(out)


def test_connection_enforces_handshake_order():
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    with pytest.raises(ProtocolError, match="during the handshake"):
        server.receive(encode_preface() + frame_bytes(FrameType.PING))
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    frames = server.receive(encode_preface() + frame_bytes(FrameType.HELLO, HELLO))
    assert server.state == ConnState.OPEN and frames[0].type == FrameType.HELLO
    with pytest.raises(ProtocolError, match="after the handshake"):
        server.receive(frame_bytes(FrameType.HELLO, HELLO))


def test_connection_preface_split_and_buffered_path():
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    blob = encode_preface() + frame_bytes(FrameType.HELLO, HELLO)
    got: list[Frame] = []
    pos = 0
    while pos < len(blob):
        buf = server.get_buffer(-1)
        n = min(len(buf), 7, len(blob) - pos)
        buf[:n] = blob[pos:pos + n]
        pos += n
        got += server.buffer_updated(n)
    assert [f.type for f in got] == [FrameType.HELLO]


def test_connection_refuses_a_non_handshake_frame_from_its_header():
    """Before the handshake a DATA header claiming 1 MiB is refused at once: no payload buffer."""
    head = frame_bytes(FrameType.DATA, bytes(MAX), stream_id=1, aux=MAX)[:HEADER_SIZE]
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    with pytest.raises(ProtocolError, match="unexpected DATA frame during the handshake .expected HELLO"):
        server.receive(encode_preface() + head)
    assert server.buffered == 0
    client = Connection(Role.CLIENT, max_frame_payload=MAX)
    with pytest.raises(ProtocolError, match="expected WELCOME/REFUSE"):
        client.receive(encode_preface() + head)


def test_connection_takes_only_small_handshake_frames_in_small_reads():
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    sizes = []
    blob = encode_preface() + frame_bytes(FrameType.HELLO, HELLO)
    pos = 0
    while server.state != ConnState.OPEN:
        buf = server.get_buffer(-1)
        sizes.append(len(buf))
        n = min(len(buf), len(blob) - pos)
        buf[:n] = blob[pos:pos + n]
        pos += n
        server.buffer_updated(n)
    assert max(sizes) <= MAX_HANDSHAKE_FRAME == HEADER_SIZE + 1024
    # a REFUSE is the largest handshake frame: its limit, and one byte more in the header
    client = Connection(Role.CLIENT, max_frame_payload=MAX)
    (refuse,) = client.receive(encode_preface() + frame_bytes(FrameType.REFUSE, b"r" * 1024, aux=9))
    assert len(refuse.payload) == 1024
    head = bytearray(frame_bytes(FrameType.REFUSE, b"r")[:HEADER_SIZE])
    struct.pack_into("!I", head, 4, MAX_HANDSHAKE_FRAME - HEADER_SIZE + 1)
    with pytest.raises(FrameSizeError):
        Connection(Role.CLIENT, max_frame_payload=MAX).receive(encode_preface() + bytes(head))


def test_server_connection_takes_nothing_after_hello_until_it_answered():
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    with pytest.raises(ProtocolError, match="PING frame during the handshake .expected nothing"):
        server.receive(encode_preface() + frame_bytes(FrameType.HELLO, HELLO) + frame_bytes(FrameType.PING))
    server = Connection(Role.SERVER, max_frame_payload=MAX)
    server.receive(encode_preface() + frame_bytes(FrameType.HELLO, HELLO))
    server.handshake_answered()
    assert [f.type for f in server.receive(frame_bytes(FrameType.PING))] == [FrameType.PING]
    # the client takes the server's first ACK right behind its WELCOME
    client = Connection(Role.CLIENT, max_frame_payload=MAX)
    welcome = frame_bytes(FrameType.WELCOME, HELLO)
    frames = client.receive(encode_preface() + welcome + frame_bytes(FrameType.ACK))
    assert [f.type for f in frames] == [FrameType.WELCOME, FrameType.ACK]


def test_encode_text_truncates_on_a_character_boundary():
    assert encode_text("\u00e9" * 10, 5) == "\u00e9\u00e9".encode()
    assert encode_text("ok", 5) == b"ok"


def test_codec_flag_values():
    assert CODEC_RAW == 0 and CODEC_PAGE == 1
