"""Fuzzing the frame decoder and the session input path with hypothesis.

Properties: only the documented exceptions (decoder) or events (session) come out, nothing crashes,
buffers stay within their limits, and bytes delivered to a stream are always the bytes that were sent.
``DATAPLANE_FUZZ_EXAMPLES`` raises the number of examples (default 200).
"""

from __future__ import annotations

import dataclasses
import os
import random
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.channel import events as ev
from dataplane.channel.acceptor import Acceptor
from dataplane.channel.errors import ChannelError, ProtocolError
from dataplane.channel.frames import (
    ACK_ENTRY,
    HEADER_SIZE,
    PREFACE_SIZE,
    FrameDecoder,
    FrameType,
    HelloParams,
    encode_frame,
    frame_bytes,
)
from dataplane.channel.session import ConnectionHandle, Limits, Session, SessionConfig

EXAMPLES = int(os.environ.get("DATAPLANE_FUZZ_EXAMPLES", "200"))
fuzz = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

EVENT_TYPES = tuple(cls for cls in vars(ev).values()
                    if isinstance(cls, type) and issubclass(cls, ev.Event) and cls is not ev.Event)
LIMITS = Limits(max_frame_payload=64 * 1024, session_memory=4 << 20, replay_buffer=2 << 20,
                stream_window=1 << 20)
CONFIG = SessionConfig(frame_size=16 * 1024, codecs=("zlib",))


# ====================================================================== decoder


@fuzz
@given(st.binary(max_size=8192), st.integers(1, 100))
def test_decoder_random_bytes_only_raise_protocol_errors(data, chunk):
    dec = FrameDecoder(64 * 1024)
    try:
        for i in range(0, len(data), chunk):
            for f in dec.feed(data[i:i + chunk]):
                assert f.type in set(FrameType)
            assert dec.allocated <= HEADER_SIZE + 64 * 1024
    except ProtocolError:
        pass


frame_types = st.sampled_from(list(FrameType))


@st.composite
def frames(draw):
    t = draw(frame_types)
    fields = dict(
        flags=draw(st.sampled_from([0, 0, 1, 2, 3, 0x80])),
        stream_id=draw(st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF])),
        aux=draw(st.integers(0, 0xFFFFFFFF)),
        offset=draw(st.integers(0, 2**64 - 1)),
        seq=draw(st.sampled_from([0, 1, 2, 7])),
    )
    payload = draw(st.binary(max_size=300))
    return t, payload, fields


@fuzz
@given(st.lists(frames(), max_size=12), st.lists(st.integers(1, 500), min_size=1, max_size=20))
def test_decoder_decodes_what_was_encoded_or_rejects_it(items, cuts):
    blob = b"".join(frame_bytes(t, p, **f) for t, p, f in items)
    dec = FrameDecoder(64 * 1024)
    got = []
    pos = k = 0
    try:
        while pos < len(blob):
            n = cuts[k % len(cuts)]
            k += 1
            got += dec.feed(blob[pos:pos + n])
            pos += n
    except ProtocolError:
        pass
    for f, (t, p, fields) in zip(got, items, strict=False):
        assert (f.type, bytes(f.payload)) == (t, p)
        assert all(getattr(f, name) == value for name, value in fields.items())


@fuzz
@given(st.binary(min_size=1, max_size=64), st.integers(0, 2000), st.integers(0, 7))
def test_decoder_detects_every_single_bit_flip(payload, where, bit):
    blob = bytearray(frame_bytes(FrameType.OPEN_FAIL, payload, stream_id=3, seq=1, aux=2))
    blob[where % len(blob)] ^= 1 << bit
    dec = FrameDecoder(1 << 20)
    try:
        got = dec.feed(bytes(blob))
    except ProtocolError:
        return
    # a flip in the length field makes the frame look longer: the decoder waits, it delivers nothing
    assert got == [] and dec.buffered > 0, "a flipped bit went unnoticed"


# ====================================================================== session input path


def check_events(events: list[ev.Event]) -> None:
    for e in events:
        assert isinstance(e, EVENT_TYPES), e
        if isinstance(e, ev.SessionTerminated | ev.ConnectionClosed) and e.error is not None:
            assert isinstance(e.error, ChannelError)


class Server:
    """An acceptor-side application that accepts streams, consumes data and checks it."""

    def __init__(self, expected: bytes | None) -> None:
        self.acceptor = Acceptor(LIMITS, CONFIG, rng=random.Random(1).randbytes)
        self.handle = self.acceptor.accept("client-fp", 0.0)
        self.expected = expected
        self.got: dict[int, bytearray] = {}

    def feed(self, chunk: bytes, now: float, drain: bool = True) -> list[ev.Event]:
        events = self.handle.receive_data(chunk, now)
        check_events(events)
        s = self.handle.session
        for e in events:
            if isinstance(e, ev.StreamOpened) and s is not None and not s.terminated:
                s.accept_stream(e.stream_id)
            elif isinstance(e, ev.DataReceived):
                buf = self.got.setdefault(e.stream_id, bytearray())
                assert e.offset == len(buf)
                buf += e.data
                if self.expected is not None:
                    assert bytes(buf) == self.expected[:len(buf)], "corrupt bytes reached a stream"
                if s is not None and not s.terminated:
                    s.consumed(e.stream_id, len(e.data))
        if s is not None and not s.terminated:
            mem = s.memory()
            assert mem["recv"] <= LIMITS.recv_window and mem["reorder"] <= LIMITS.recv_window
        if drain:
            self.handle.data_to_send()
        return events


@cache
def recorded_client_stream() -> tuple[tuple[bytes, ...], bytes]:
    """The chunks a real client sends for one compressed stream transfer, and the stream's data."""
    rng = random.Random(5)
    data = b"".join(rng.choice([bytes(4096), rng.randbytes(4096), b"abcd" * 1024]) for _ in range(40))
    client = Session.client(0.0, limits=LIMITS, config=dataclasses.replace(CONFIG, compression="on"))
    ch = client.connect(0.0, "server-fp")
    server = Server(data)
    chunks: list[bytes] = []
    sid = None
    accepted = closed = False
    pos = 0
    t = 0.0
    for _ in range(3000):
        if client.established and sid is None:
            sid = client.open_stream("disk0")
        if sid is not None and accepted and pos < len(data):
            pos += client.send(sid, data[pos:pos + 30_000])
        if sid is not None and pos == len(data) and not closed:
            client.close_stream(sid)
            closed = True
        out = ch.data_to_send(40_000)
        if out:
            chunks.append(out)
            server.feed(out, t, drain=False)
        back = server.handle.data_to_send()
        for e in ch.receive_data(back, t) if back else []:
            accepted |= isinstance(e, ev.StreamAccepted)
        t += 0.005
        client.tick(t)
        server.handle.session and server.handle.session.tick(t)
        if closed and sid is not None and len(server.got.get(sid, b"")) == len(data) and not out and not back:
            break
    assert sid is not None and bytes(server.got[sid]) == data, "the recording itself must be a valid transfer"
    return tuple(chunks), data


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("drop"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("dup"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
)


@fuzz
@given(st.lists(mutation, min_size=1, max_size=4), st.one_of(st.integers(13, 97), st.integers(1000, 70_000)))
def test_mutated_valid_stream_gives_only_documented_events_and_never_corrupt_data(mutations, rechunk):
    chunks, data = recorded_client_stream()
    chunks = list(chunks)
    for kind, where, arg in mutations:
        i = where % len(chunks)
        c = chunks[i]
        if kind == "flip":
            if c:  # an earlier cut may have emptied it
                b = bytearray(c)
                b[(where // 7) % len(b)] ^= arg or 1
                chunks[i] = bytes(b)
        elif kind == "drop":
            del chunks[i]
        elif kind == "dup":
            chunks.insert(i, c)
        elif kind == "cut":
            chunks[i] = c[:arg % (len(c) + 1)]
        else:
            chunks.insert(i, bytes([arg]) * (1 + where % 40))
        if not chunks:
            return
    blob = b"".join(chunks)
    server = Server(data)
    t = 0.0
    for k in range(0, len(blob), rechunk):
        t += 0.001
        server.feed(blob[k:k + rechunk], t)
        server.handle.tick(t)
        if server.handle.session is not None:
            check_events(server.handle.session.tick(t))


def test_recorded_stream_replays_cleanly_into_a_fresh_server():
    chunks, data = recorded_client_stream()
    server = Server(data)
    events = [e for c in chunks for e in server.feed(c, 0.0)]
    assert len(server.got[1]) == len(data)
    assert any(isinstance(e, ev.StreamEnded) for e in events)
    assert not any(isinstance(e, ev.SessionTerminated) for e in events)


def _established_pair() -> tuple[Session, ConnectionHandle, Session, ConnectionHandle]:
    client = Session.client(0.0, limits=LIMITS, config=CONFIG)
    ch = client.connect(0.0, "server-fp")
    acc = Acceptor(LIMITS, CONFIG, rng=random.Random(3).randbytes)
    sh = acc.accept("client-fp", 0.0)
    for _ in range(4):
        sh.receive_data(ch.data_to_send(), 0.0)
        ch.receive_data(sh.data_to_send(), 0.0)
    server = sh.session
    assert server is not None and client.ready_connections == server.ready_connections == 1
    sid = client.open_stream("a")
    for _ in range(4):
        for e in sh.receive_data(ch.data_to_send(), 0.0):
            if isinstance(e, ev.StreamOpened):
                server.accept_stream(e.stream_id)
        ch.receive_data(sh.data_to_send(), 0.0)
    client.send(sid, b"hello" * 1000)
    sh.receive_data(ch.data_to_send(), 0.0)
    return client, ch, server, sh


SESSION_LEVEL = frozenset({FrameType.ACK, FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.HELLO,
                           FrameType.WELCOME, FrameType.REFUSE})


@st.composite
def session_frames(draw):
    t = draw(frame_types)
    if t == FrameType.ACK:
        n = draw(st.integers(0, 3))
        recvs = draw(st.lists(st.integers(0, 1 << 21), min_size=n, max_size=n))
        payload = b"".join(
            ACK_ENTRY.pack(draw(st.sampled_from([1, 2, 3, 5])), 0, r, r + draw(st.integers(0, 1 << 21)))
            for r in recvs)
    elif t in (FrameType.HELLO, FrameType.WELCOME):
        payload = HelloParams().pack()
    else:
        payload = draw(st.binary(min_size=1 if t in (FrameType.DATA, FrameType.OPEN) else 0, max_size=200))
    fields = dict(
        flags=draw(st.sampled_from([0, 0, 0, 1, 2, 3])) if t == FrameType.DATA else 0,
        stream_id=draw(st.sampled_from([1, 1, 2, 3, 4, 5, 77])) if t not in SESSION_LEVEL else 0,
        aux=len(payload) if t == FrameType.DATA and draw(st.booleans()) else draw(st.integers(0, 1 << 20)),
        offset=draw(st.sampled_from([0, 1, 5000, 1 << 20, (1 << 20) - 1, 1 << 40])),
        seq=draw(st.integers(1, 4)) if t in (FrameType.OPEN, FrameType.OPEN_OK, FrameType.OPEN_FAIL,
                                               FrameType.FIN, FrameType.RESET) else 0,
    )
    return b"".join(bytes(x) for x in encode_frame(t, payload, **fields))


@fuzz
@given(st.lists(session_frames(), min_size=1, max_size=12), st.booleans())
def test_established_sessions_survive_arbitrary_well_formed_frames(blobs, to_server):
    client, ch, server, sh = _established_pair()
    target, handle = (server, sh) if to_server else (client, ch)
    t = 0.0
    for blob in blobs:
        t += 0.01
        events = handle.receive_data(blob, t)
        check_events(events)
        for e in events:
            if isinstance(e, ev.StreamOpened) and not target.terminated:
                target.accept_stream(e.stream_id)
        handle.data_to_send()
        check_events(target.tick(t))
        if not target.terminated:
            mem = target.memory()
            assert mem["recv"] <= LIMITS.recv_window and mem["send"] <= LIMITS.replay_buffer
    assert target.terminated or target.ready_connections == 1


@fuzz
@given(st.binary(max_size=400))
def test_acceptor_handles_garbage_after_a_valid_preface(tail):
    acc = Acceptor(LIMITS, CONFIG)
    h = acc.accept("x", 0.0)
    preface = h.data_to_send()[:PREFACE_SIZE]
    check_events(h.receive_data(preface + tail, 0.0))
    h.data_to_send()
    assert len(acc.sessions) <= 1
