"""Session pairs wired in memory over simulated connections: streams, striping, credit, resume, errors.

``python tests/test_channel_session.py`` runs a microbenchmark instead (1 MiB DATA frames through a
client/server pair in one process).
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable

import pytest

from dataplane.channel import (
    Acceptor,
    ChannelTimeout,
    ChecksumError,
    ConnectionClosed,
    ConnectionHandle,
    DataReceived,
    ErrorCode,
    Event,
    FlowControlError,
    GraceExpired,
    HandshakeComplete,
    LimitExceeded,
    Limits,
    PongReceived,
    ProtocolError,
    ResumeRefused,
    Session,
    SessionClosedError,
    SessionConfig,
    SessionTerminated,
    StreamAccepted,
    StreamClosed,
    StreamClosedError,
    StreamEnded,
    StreamError,
    StreamOpened,
    StreamRefused,
    StreamReset,
    StreamResetError,
    StreamWritable,
    TokenBucket,
    VersionError,
)
from dataplane.channel.codec import CompressionPolicy, ZlibCodec, native_available, native_import_error
from dataplane.channel.errors import CompressionError
from dataplane.channel.frames import (
    FLAG_JOIN,
    PREFACE_SIZE,
    FrameDecoder,
    FrameType,
    HelloParams,
    encode_preface,
    frame_bytes,
)

MiB = 1 << 20


# ====================================================================== in-memory pump


class Side:
    """One end's application: records events, accepts streams, collects and consumes data."""

    def __init__(self, auto_accept: bool = True, auto_consume: bool = True) -> None:
        self.session: Session | None = None
        self.events: list[Event] = []
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.unconsumed: dict[int, int] = defaultdict(int)
        self.auto_accept = auto_accept
        self.auto_consume = auto_consume

    def handle(self, events: list[Event]) -> None:
        for e in events:
            self.events.append(e)
            if isinstance(e, StreamOpened) and self.auto_accept:
                assert self.session is not None
                self.session.accept_stream(e.stream_id)
            elif isinstance(e, DataReceived):
                buf = self.data[e.stream_id]
                assert e.offset == len(buf), "data must arrive in order, exactly once"
                buf += e.data
                if self.auto_consume:
                    assert self.session is not None
                    self.session.consumed(e.stream_id, len(e.data))
                else:
                    self.unconsumed[e.stream_id] += len(e.data)

    def of(self, cls: type) -> list:
        return [e for e in self.events if isinstance(e, cls)]

    def consume_all(self) -> None:
        assert self.session is not None
        for sid, n in list(self.unconsumed.items()):
            if n:
                self.session.consumed(sid, n)
                self.unconsumed[sid] = 0


class Wire:
    """A simulated TCP connection: two ordered pipes of chunks."""

    def __init__(self, ch: ConnectionHandle, sh: ConnectionHandle) -> None:
        self.ch = ch
        self.sh = sh
        self.c2s: deque[bytes] = deque()
        self.s2c: deque[bytes] = deque()
        self.alive = True
        self.bytes = 0


class Writer:
    """An application pushing a buffer into a stream as fast as credit allows."""

    def __init__(self, session: Session, sid: int, data: bytes, close: bool) -> None:
        self.session, self.sid, self.data, self.pos, self.close = session, sid, memoryview(data), 0, close

    def push(self, chunk: int) -> bool:
        if self.session.terminated:
            return True
        try:
            while self.pos < len(self.data):
                n = self.session.send(self.sid, self.data[self.pos:self.pos + chunk])
                if n == 0:
                    return False
                self.pos += n
        except StreamResetError:
            return True
        if self.close:
            self.session.close_stream(self.sid)
        return True


class Pair:
    """A client Session and a server Acceptor joined by *n* simulated connections, with a fake clock."""

    def __init__(self, n: int = 1, *, limits: Limits | None = None, config: SessionConfig | None = None,
                 slimits: Limits | None = None, sconfig: SessionConfig | None = None, seed: int = 0,
                 server_consume: bool = True, client_consume: bool = True, buffered: bool = False,
                 settle: bool = True) -> None:
        self.t = 0.0
        self.rng = random.Random(seed)
        self.client = Session.client(self.t, limits=limits, config=config)
        self.acceptor = Acceptor(slimits or limits, sconfig or config, rng=random.Random(seed + 1).randbytes)
        self.c = Side(auto_consume=client_consume)
        self.c.session = self.client
        self.s = Side(auto_consume=server_consume)
        self.wires: list[Wire] = []
        self.writers: list[Writer] = []
        self.buffered = buffered
        self.max_reorder = 0
        for _ in range(n):
            self.connect()
        if settle:
            self.run()

    @property
    def server(self) -> Session:
        assert self.s.session is not None
        return self.s.session

    def connect(self, client_identity: str = "client-fp", server_identity: str = "server-fp") -> Wire:
        w = Wire(self.client.connect(self.t, server_identity), self.acceptor.accept(client_identity, self.t))
        self.wires.append(w)
        return w

    def live(self) -> list[Wire]:
        return [w for w in self.wires if w.alive]

    def write(self, session: Session, sid: int, data: bytes, close: bool = False) -> None:
        self.writers.append(Writer(session, sid, data, close))

    def pull(self, max_bytes: int | None = None) -> int:
        self.writers = [w for w in self.writers if not w.push(self.rng.choice((4096, 100_000, 1 << 20)))]
        moved = 0
        for w in self.live():
            a = w.ch.data_to_send(max_bytes)
            b = w.sh.data_to_send(max_bytes)
            if a:
                w.c2s.append(a)
            if b:
                w.s2c.append(b)
            moved += len(a) + len(b)
            w.bytes += len(a) + len(b)
        return moved

    def _feed(self, handle: ConnectionHandle, chunk: bytes) -> list[Event]:
        if not self.buffered:
            return handle.receive_data(chunk, self.t)
        events: list[Event] = []
        mv = memoryview(chunk)
        while mv:
            buf = handle.get_buffer(-1)
            n = min(len(buf), len(mv), self.rng.randint(1, 300_000))
            buf[:n] = mv[:n]
            mv = mv[n:]
            events += handle.buffer_updated(n, self.t)
        return events

    def deliver(self, shuffle: bool = False) -> None:
        pipes = [(w, True) for w in self.live()] + [(w, False) for w in self.live()]
        if shuffle:
            self.rng.shuffle(pipes)
        for w, c2s in pipes:
            if shuffle and self.rng.random() < 0.3:
                continue  # this connection is slow this round: its bytes arrive later
            q = w.c2s if c2s else w.s2c
            while q and w.alive:
                chunk = q.popleft()
                if c2s:
                    events = self._feed(w.sh, chunk)
                    if self.s.session is None and w.sh.session is not None:
                        self.s.session = w.sh.session
                    self.s.handle(events)
                else:
                    self.c.handle(self._feed(w.ch, chunk))
        for sess in (self.client, self.s.session):
            if sess is not None and not sess.terminated:
                self.max_reorder = max(self.max_reorder, sess.memory()["reorder"])

    def tick(self, dt: float = 0.001) -> None:
        self.t += dt
        self.c.handle(self.client.tick(self.t))
        if self.s.session is not None:
            self.s.handle(self.s.session.tick(self.t))

    def run(self, *, shuffle: bool = False, max_bytes: int | None = None,
            until: Callable[[], bool] | None = None, max_rounds: int = 50_000) -> None:
        idle = 0
        for _ in range(max_rounds):
            moved = self.pull(max_bytes)
            pending = any(w.c2s or w.s2c for w in self.live())
            self.deliver(shuffle)
            self.tick()
            if until is not None and until():
                return
            if moved or pending:
                idle = 0
            else:
                idle += 1
                if idle > 40:
                    return
        raise AssertionError("the pair did not settle")

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let fake time pass while the connections keep moving bytes."""
        end = self.t + seconds
        while self.t < end:
            self.pull()
            self.deliver()
            self.tick(step)

    def drop(self, w: Wire, partial: bool = True) -> None:
        """Connection *w* dies: bytes in flight are lost, maybe after a truncated frame got through."""
        if partial and w.c2s:
            chunk = w.c2s[0]
            self.s.handle(w.sh.receive_data(chunk[:len(chunk) // 2 + 7], self.t))
        w.c2s.clear()
        w.s2c.clear()
        w.alive = False
        self.c.handle(w.ch.connection_lost(self.t))
        self.s.handle(w.sh.connection_lost(self.t))

    def open(self, name: str) -> int:
        sid = self.client.open_stream(name)
        self.run(until=lambda: any(e.stream_id == sid for e in self.c.of(StreamAccepted)))
        return sid


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# ====================================================================== handshake and basic streams


def test_handshake_creates_one_session_on_both_sides():
    p = Pair()
    (hc,) = p.c.of(HandshakeComplete)
    (hs,) = p.s.of(HandshakeComplete)
    assert hc.session_id == hs.session_id == p.client.session_id == p.server.session_id
    assert not hc.joined and hc.version == 2
    assert p.client.established and p.client.resume_token == p.server.resume_token
    assert p.client.ready_connections == p.server.ready_connections == 1
    assert p.acceptor.sessions == [p.server]


def test_stream_round_trip_with_half_close_and_cleanup():
    p = Pair()
    sid = p.open("ram")
    data = payload(3 * MiB + 123, 1)
    p.write(p.client, sid, data, close=True)
    p.run()
    assert bytes(p.s.data[sid]) == data
    assert [e.stream_id for e in p.s.of(StreamEnded)] == [sid]
    assert p.c.of(StreamClosed) == []  # the server has not closed its half yet
    p.server.close_stream(sid)
    p.run()
    assert [e.stream_id for e in p.c.of(StreamEnded)] == [sid]
    assert [e.stream_id for e in p.c.of(StreamClosed)] == [sid]
    assert [e.stream_id for e in p.s.of(StreamClosed)] == [sid]
    assert p.client.stream_ids == p.server.stream_ids == []
    assert p.client.stats.bytes_sent == p.server.stats.bytes_received == len(data)
    assert p.client.memory() == {"recv": 0, "reorder": 0, "send": 0}
    assert p.server.memory() == {"recv": 0, "reorder": 0, "send": 0}


def test_return_path_after_peer_half_close():
    """QEMU's postcopy return path: the target keeps sending after the source's FIN."""
    p = Pair()
    sid = p.open("migration")
    fwd, back = payload(MiB, 2), payload(300_000, 3)
    p.write(p.client, sid, fwd, close=True)
    p.run()
    assert p.s.of(StreamEnded) and not p.c.of(StreamEnded)
    with pytest.raises(StreamClosedError):
        p.client.send(sid, b"late")
    p.write(p.server, sid, back, close=True)
    p.run()
    assert bytes(p.s.data[sid]) == fwd and bytes(p.c.data[sid]) == back
    assert len(p.c.of(StreamClosed)) == len(p.s.of(StreamClosed)) == 1


def test_empty_stream_open_and_close_at_once():
    p = Pair()
    sid = p.client.open_stream("empty")
    p.client.close_stream(sid)
    p.run()
    assert [type(e) for e in p.s.events if getattr(e, "stream_id", None) == sid] == [
        StreamOpened, StreamEnded]
    p.server.close_stream(sid)
    p.run()
    assert p.c.of(StreamClosed) and p.s.of(StreamClosed)


def test_open_order_is_preserved_across_connections():
    p = Pair(3)
    names = [f"multifd/{k}" for k in range(8)]
    sids = [p.client.open_stream(n) for n in names]
    p.run(shuffle=True)
    assert [(e.stream_id, e.name) for e in p.s.of(StreamOpened)] == list(zip(sids, names, strict=True))
    assert [e.stream_id for e in p.c.of(StreamAccepted)] == sids


def test_open_waits_for_acknowledgement_driver_style():
    p = Pair(2)
    for k in range(4):
        sid = p.open(f"s{k}")  # open, then wait for OPEN_OK before the next, as the driver does
        assert p.s.of(StreamOpened)[-1].stream_id == sid
    assert [e.stream_id for e in p.s.of(StreamOpened)] == [1, 3, 5, 7]


def test_refused_stream_reports_reason_and_frees_state():
    p = Pair()
    p.s.auto_accept = False
    sid = p.client.open_stream("/dev/nope")
    p.run()
    (req,) = p.s.of(StreamOpened)
    p.server.refuse_stream(req.stream_id, "no such disk")
    p.run()
    (ref,) = p.c.of(StreamRefused)
    assert (ref.stream_id, ref.code, ref.reason) == (sid, ErrorCode.REFUSED, "no such disk")
    assert p.client.stream_ids == [] and p.server.stream_ids == []
    with pytest.raises(StreamError):
        p.client.send(sid, b"x")


def test_stream_not_writable_before_acceptance():
    p = Pair()
    p.s.auto_accept = False
    sid = p.client.open_stream("x")
    p.run()
    assert p.client.send_capacity(sid) == 0 and p.client.send(sid, b"abc") == 0
    p.server.accept_stream(sid)
    p.run()
    assert p.client.writable(sid)
    assert [type(e) for e in p.c.events[-2:]] == [StreamAccepted, StreamWritable]


def test_server_opened_stream_and_both_directions_concurrently():
    p = Pair(2)
    a = p.open("c->s")
    b = p.server.open_stream("s->c")
    p.run()
    assert p.c.of(StreamOpened)[0].stream_id == b == 2
    datas = {k: payload(MiB + k, k) for k in range(4)}
    p.write(p.client, a, datas[0], close=True)
    p.write(p.server, a, datas[1], close=True)
    p.write(p.client, b, datas[2], close=True)
    p.write(p.server, b, datas[3], close=True)
    p.run(max_bytes=256 * 1024)
    assert bytes(p.s.data[a]) == datas[0] and bytes(p.c.data[a]) == datas[1]
    assert bytes(p.s.data[b]) == datas[2] and bytes(p.c.data[b]) == datas[3]
    assert len(p.c.of(StreamClosed)) == len(p.s.of(StreamClosed)) == 2


def test_joining_connections_made_before_the_session_exists():
    p = Pair(3)
    hcs = p.c.of(HandshakeComplete)
    assert sorted(h.joined for h in hcs) == [False, True, True]
    assert len({h.session_id for h in hcs}) == 1 and len(p.acceptor.sessions) == 1
    assert p.client.ready_connections == 3


# ====================================================================== striping and reordering


def test_striping_over_three_connections_with_reordering_keeps_exact_order():
    cfg = SessionConfig(frame_size=16 * 1024)
    p = Pair(3, config=cfg, seed=7)
    sids = [p.open(f"s{k}") for k in range(3)]
    datas = {sid: payload(2 * MiB + sid * 1000, sid) for sid in sids}
    back = payload(MiB, 99)
    for sid, d in datas.items():
        p.write(p.client, sid, d, close=True)
    p.write(p.server, sids[0], back)
    p.run(shuffle=True, max_bytes=48 * 1024)
    for sid, d in datas.items():
        assert bytes(p.s.data[sid]) == d
    assert bytes(p.c.data[sids[0]]) == back
    assert all(w.bytes > MiB for w in p.wires), [w.bytes for w in p.wires]
    assert p.max_reorder > 0, "the shuffle did not reorder anything: the test would prove nothing"


def test_buffered_protocol_receive_path():
    p = Pair(2, buffered=True, seed=3)
    sid = p.open("x")
    data = payload(3 * MiB, 5)
    p.write(p.client, sid, data, close=True)
    p.write(p.server, sid, data[::-1], close=True)
    p.run(shuffle=True, max_bytes=600 * 1024)
    assert bytes(p.s.data[sid]) == data and bytes(p.c.data[sid]) == data[::-1]


# ====================================================================== reorder buffer bound


@pytest.fixture
def reorder_peak(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``[peak]``: the most out-of-order pieces any stream held after any insert, while the test runs."""
    from dataplane.channel.buffers import _Reorder

    peak = [0]
    insert = _Reorder.insert

    def counting(self: _Reorder, off: int, data: bytes) -> int:
        try:
            return insert(self, off, data)
        finally:
            peak[0] = max(peak[0], len(self))

    monkeypatch.setattr(_Reorder, "insert", counting)
    return peak


def tiny_frames(sid: int, offsets: list[int], size: int = 2) -> bytes:
    return b"".join(frame_bytes(FrameType.DATA, bytes(size), stream_id=sid, aux=size, offset=o)
                    for o in offsets)


def test_flood_of_tiny_out_of_order_frames_ends_the_session(reorder_peak):
    """200,000 two-byte frames, each ahead of a gap and in descending order (the worst case for a
    sorted insert): refused once a stream holds MAX_REORDER_PIECES pieces, the rest never looked at."""
    from dataplane.channel.session import MAX_REORDER_PIECES

    p = Pair()
    sid = p.open("x")
    flood = tiny_frames(sid, [4 * k + 2 for k in reversed(range(200_000))])
    h = p.wires[0].sh
    events: list[Event] = []
    for k in range(0, len(flood), 256 * 1024):
        events += h.receive_data(flood[k:k + 256 * 1024], p.t)
    p.s.handle(events)
    (term,) = p.s.of(SessionTerminated)
    assert isinstance(term.error, ProtocolError) and term.error.code == ErrorCode.PROTOCOL
    assert f"stream {sid}: more than {MAX_REORDER_PIECES} pieces" in term.error.reason
    assert "out of order" in term.error.reason
    assert 0 < reorder_peak[0] <= MAX_REORDER_PIECES
    assert reorder_peak[0] == MAX_REORDER_PIECES  # the bound was reached, not something else
    assert p.server.stats.frames_received == MAX_REORDER_PIECES + 1  # nothing after the offending one
    assert not p.s.of(DataReceived)
    p.c.handle(p.wires[0].ch.receive_data(h.data_to_send(), p.t))  # the GOAWAY tells the peer why
    (cterm,) = p.c.of(SessionTerminated)
    assert cterm.remote and cterm.error is not None and cterm.error.code == ErrorCode.PROTOCOL


def test_reorder_bound_holds_exactly_max_pieces_and_delivers_them_in_order(reorder_peak):
    p = Pair(limits=Limits(max_reorder_pieces=8))
    sid = p.open("x")
    h = p.wires[0].sh
    p.s.handle(h.receive_data(tiny_frames(sid, [4 * k + 2 for k in reversed(range(8))]), p.t))
    assert reorder_peak[0] == 8 and not p.server.terminated and not p.s.of(DataReceived)
    gaps = b"".join(frame_bytes(FrameType.DATA, b"\x01\x01", stream_id=sid, aux=2, offset=4 * k)
                    for k in range(8))
    p.s.handle(h.receive_data(gaps, p.t))  # every gap filled: all 32 bytes, in order, exactly once
    assert bytes(p.s.data[sid]) == b"\x01\x01\x00\x00" * 8
    assert p.server.memory()["reorder"] == 0 and not p.server.terminated
    p.s.handle(h.receive_data(tiny_frames(sid, [32 + 4 * k + 2 for k in range(9)]), p.t))
    (term,) = p.s.of(SessionTerminated)
    assert isinstance(term.error, ProtocolError) and "more than 8 pieces" in term.error.reason
    assert reorder_peak[0] == 8


def test_small_frames_striped_and_reordered_stay_within_the_bound(reorder_peak):
    """Normal out-of-order delivery across striped connections, many small frames: all of it
    arrives, in order, and the reorder buffer held pieces without reaching the bound."""
    from dataplane.channel.session import MAX_REORDER_PIECES

    p = Pair(3, config=SessionConfig(frame_size=512), seed=11)
    sids = [p.open(f"s{k}") for k in range(2)]
    datas = {sid: payload(300_000 + sid, sid) for sid in sids}
    for sid, d in datas.items():
        p.write(p.client, sid, d, close=True)
    p.run(shuffle=True, max_bytes=16 * 1024)
    for sid, d in datas.items():
        assert bytes(p.s.data[sid]) == d
    assert not p.server.terminated
    assert 1 < reorder_peak[0] < MAX_REORDER_PIECES


# ====================================================================== flow control


def test_stalled_receiver_backpressures_sender_and_bounds_memory():
    limits = Limits(session_memory=8 * MiB, replay_buffer=4 * MiB, stream_window=3 * MiB)
    p = Pair(2, limits=limits, server_consume=False)
    a, b = p.open("a"), p.open("b")
    p.write(p.client, a, payload(20 * MiB, 1))
    p.write(p.client, b, payload(20 * MiB, 2))
    p.run(max_bytes=512 * 1024)
    assert p.client.send_capacity(a) == p.client.send_capacity(b) == 0
    got_a, got_b = len(p.s.data[a]), len(p.s.data[b])
    assert got_a <= 3 * MiB and got_b <= 3 * MiB
    assert got_a + got_b == limits.recv_window  # exactly the session window, no more
    mem = p.server.memory()
    assert mem["recv"] <= limits.recv_window and mem["reorder"] == 0
    assert p.server.stats.recv_buffered_peak <= limits.recv_window
    assert p.client.memory()["send"] <= limits.replay_buffer
    assert p.client.stats.send_buffered_peak <= limits.replay_buffer
    # the target drains: credit comes back, the sender is told, data flows again
    p.s.consume_all()
    p.run(max_bytes=512 * 1024)
    assert {e.stream_id for e in p.c.of(StreamWritable)} == {a, b}
    assert len(p.s.data[a]) + len(p.s.data[b]) == 2 * limits.recv_window


def test_send_accepts_only_what_fits():
    limits = Limits(session_memory=4 * MiB, replay_buffer=2 * MiB, stream_window=MiB)
    p = Pair(limits=limits, server_consume=False)
    sid = p.open("x")
    assert p.client.send_capacity(sid) == MiB
    assert p.client.send(sid, bytes(3 * MiB)) == MiB
    assert p.client.send(sid, b"more") == 0


def test_peer_exceeding_credit_is_a_flow_control_error():
    p = Pair(limits=Limits(stream_window=64 * 1024))
    sid = p.open("x")
    frame = frame_bytes(FrameType.DATA, bytes(1000), stream_id=sid, aux=1000, offset=64 * 1024)
    events = p.wires[0].sh.receive_data(frame, p.t)
    (term,) = [e for e in events if isinstance(e, SessionTerminated)]
    assert isinstance(term.error, FlowControlError) and not term.remote


# ====================================================================== resume and replay


def test_connection_drop_mid_transfer_then_resume_gives_identical_bytes():
    p = Pair(1, config=SessionConfig(frame_size=64 * 1024))
    sid = p.open("ram")
    up, down = payload(6 * MiB, 11), payload(2 * MiB, 12)
    p.write(p.client, sid, up, close=True)
    p.write(p.server, sid, down, close=True)
    p.run(max_bytes=256 * 1024, until=lambda: len(p.s.data[sid]) > MiB and len(p.c.data[sid]) > 256 * 1024)
    p.pull(256 * 1024)  # these bytes are in flight when the connection dies
    p.drop(p.wires[0])
    assert p.client.ready_connections == 0
    p.tick(5.0)  # well within the grace period
    w = p.connect()
    p.run(max_bytes=256 * 1024)
    assert bytes(p.s.data[sid]) == up and bytes(p.c.data[sid]) == down
    assert p.client.stats.replayed_bytes > 0 and p.server.stats.replayed_bytes > 0
    assert p.client.stats.reconnects == p.server.stats.reconnects == 1
    assert p.client.stats.connections_lost == 1
    assert p.c.of(HandshakeComplete)[-1].joined and p.c.of(HandshakeComplete)[-1].conn_id == w.ch.conn_id
    assert p.s.of(DataReceived) and not p.s.of(SessionTerminated) and not p.c.of(SessionTerminated)


def test_losing_one_of_three_connections_requeues_its_frames_on_the_others():
    p = Pair(3, config=SessionConfig(frame_size=32 * 1024), seed=5)
    sid = p.open("disk")
    data = payload(5 * MiB, 21)
    p.write(p.client, sid, data, close=True)
    p.run(max_bytes=128 * 1024, until=lambda: len(p.s.data[sid]) > MiB)
    p.pull(128 * 1024)
    p.drop(p.wires[1])
    p.run(max_bytes=128 * 1024, shuffle=True)
    assert bytes(p.s.data[sid]) == data
    assert p.client.stats.replayed_bytes > 0
    assert p.client.ready_connections == 2


def test_data_written_while_disconnected_flows_after_resume():
    p = Pair(2)
    sid = p.open("x")
    for w in list(p.live()):
        p.drop(w)
    data = payload(MiB, 3)
    p.write(p.client, sid, data, close=True)
    p.pull()
    p.connect()
    p.run()
    assert bytes(p.s.data[sid]) == data


def test_half_open_connection_is_probed_when_the_client_reconnects():
    """The client saw its connection die, the server did not: the server must not wait for idle_timeout."""
    p = Pair(1, config=SessionConfig(frame_size=32 * 1024))
    sid = p.open("return-path")
    data = payload(2 * MiB, 8)
    p.write(p.server, sid, data, close=True)
    p.run(until=lambda: len(p.c.data[sid]) > 256 * 1024, max_bytes=128 * 1024)
    old = p.wires[0]
    p.pull(128 * 1024)
    old.s2c.clear()  # lost in the network
    old.alive = False  # and the server never hears about it
    p.c.handle(old.ch.connection_lost(p.t))
    p.connect()
    p.advance(6.0)
    (closed,) = p.s.of(ConnectionClosed)
    assert closed.conn_id == old.sh.conn_id and "reconnected" in closed.error.reason
    p.run()
    assert bytes(p.c.data[sid]) == data
    assert p.server.stats.replayed_bytes > 0 and p.t < 12.0


def _raw_join(p: Pair, token: bytes, identity: str) -> tuple[list[Event], bytes]:
    hello = HelloParams(p.server.session_id or b"", token).pack()
    h = p.acceptor.accept(identity, p.t)
    events = h.receive_data(encode_preface() + frame_bytes(FrameType.HELLO, hello, flags=FLAG_JOIN), p.t)
    return events, h.data_to_send()


def test_resume_with_wrong_token_or_identity_is_refused():
    p = Pair()
    good = p.server.resume_token
    for token, identity in ((bytes(32), "client-fp"), (good[:-1] + b"\x00", "client-fp"), (good, "mallory")):
        events, out = _raw_join(p, token, identity)
        (closed,) = events
        assert isinstance(closed, ConnectionClosed) and isinstance(closed.error, ResumeRefused)
        (refuse,) = FrameDecoder(1 << 20).feed(out[PREFACE_SIZE:])
        assert refuse.type == FrameType.REFUSE and refuse.aux == ErrorCode.RESUME_REFUSED
    events, _ = _raw_join(p, good, "client-fp")  # the right token from the right identity joins
    assert events == [] and len(p.server.connection_ids) == 2
    assert not p.server.terminated


def test_reconnect_from_another_identity_ends_the_client_session():
    p = Pair()
    sid = p.open("x")
    p.drop(p.wires[0])
    p.connect(client_identity="mallory")
    p.run()
    (term,) = p.c.of(SessionTerminated)
    assert isinstance(term.error, ResumeRefused) and term.remote
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in p.c.events)
    assert not p.server.terminated  # the real session is untouched by the intruder


def test_client_refuses_a_different_server_identity():
    p = Pair()
    with pytest.raises(Exception, match="identity"):
        p.client.connect(p.t, "other-server")


def test_grace_expiry_resets_streams_on_both_sides():
    p = Pair(2, limits=Limits(grace=30.0))
    sid = p.open("x")
    for w in list(p.live()):
        p.drop(w)
    start = p.t
    p.t = start + 29.0
    p.c.handle(p.client.tick(p.t))
    p.s.handle(p.server.tick(p.t))
    assert not p.client.terminated and not p.server.terminated
    assert p.client.next_deadline() == pytest.approx(start + 30.0)
    p.t = start + 30.5
    p.c.handle(p.client.tick(p.t))
    p.s.handle(p.server.tick(p.t))
    for side in (p.c, p.s):
        (term,) = side.of(SessionTerminated)
        assert isinstance(term.error, GraceExpired) and not term.remote
        (reset,) = side.of(StreamReset)
        assert reset.stream_id == sid and reset.code == ErrorCode.GRACE_EXPIRED
    assert p.acceptor.sessions == []
    with pytest.raises(SessionClosedError):
        p.client.open_stream("y")


# ====================================================================== errors


def test_version_mismatch_is_refused_with_a_reason():
    p = Pair(config=SessionConfig(versions=(3, 4)), sconfig=SessionConfig())
    (term,) = p.c.of(SessionTerminated)
    assert isinstance(term.error, VersionError) and "2..2" in term.error.reason
    (closed,) = p.s.of(ConnectionClosed)
    assert closed.conn_id is None and isinstance(closed.error, VersionError)
    assert p.acceptor.sessions == []


def test_version_refusal_frame_on_the_wire():
    h = Acceptor().accept("x", 0.0)
    h.receive_data(encode_preface(7, 9), 0.0)
    out = h.data_to_send()
    (refuse,) = FrameDecoder(1 << 20).feed(out[PREFACE_SIZE:])
    assert refuse.type == FrameType.REFUSE and refuse.aux == ErrorCode.VERSION
    assert b"peer speaks 7..9" in bytes(refuse.payload)
    assert h.closed


def test_corrupt_frame_ends_the_session_and_is_never_delivered():
    p = Pair()
    sid = p.open("x")
    p.client.send(sid, payload(200_000, 1))
    chunk = bytearray(p.wires[0].ch.data_to_send())
    chunk[len(chunk) // 2] ^= 0xFF
    events = p.wires[0].sh.receive_data(bytes(chunk), p.t)
    p.s.handle(events)
    assert not p.s.of(DataReceived)
    (term,) = p.s.of(SessionTerminated)
    assert isinstance(term.error, ChecksumError)
    assert [e.stream_id for e in p.s.of(StreamReset)] == [sid]
    goaway = p.wires[0].sh.data_to_send()
    p.c.handle(p.wires[0].ch.receive_data(goaway, p.t))
    (cterm,) = p.c.of(SessionTerminated)
    assert isinstance(cterm.error, ChecksumError) and cterm.remote


def test_frame_for_unknown_stream_ends_the_session():
    p = Pair()
    events = p.wires[0].sh.receive_data(frame_bytes(FrameType.DATA, b"x", stream_id=41, aux=1), p.t)
    (term,) = [e for e in events if isinstance(e, SessionTerminated)]
    assert isinstance(term.error, ProtocolError) and "unknown stream" in term.error.reason


def test_garbage_instead_of_a_preface_closes_the_connection_only():
    p = Pair()
    h = p.acceptor.accept("x", p.t)
    (closed,) = h.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", p.t)
    assert isinstance(closed, ConnectionClosed) and isinstance(closed.error, ProtocolError)
    assert h.closed and not p.server.terminated


def test_acceptor_caps_the_connections_in_their_handshake():
    from dataplane.channel.acceptor import MAX_PENDING_HANDSHAKES, refusal

    assert Acceptor().max_pending == MAX_PENDING_HANDSHAKES == 128
    acc = Acceptor(max_pending=2)
    a, b = acc.accept("x", 0.0), acc.accept("x", 0.0)
    assert acc.pending == 2
    with pytest.raises(LimitExceeded, match="2 connections are already in their handshake"):
        acc.accept("x", 0.0)
    a.connection_lost(0.5)  # one goes away: room for one more
    c = acc.accept("x", 0.5)
    assert acc.pending == 2
    assert c.tick(20.0) and acc.pending == 1  # one times out
    client = Session.client(0.0)
    ch = client.connect(0.0)
    b.receive_data(ch.data_to_send(), 1.0)  # one completes its HELLO: bound, no longer pending
    assert b.session is not None and acc.pending == 0
    # what a refused connection is told
    wire = b"".join(refusal(LimitExceeded("busy")))
    assert wire[:PREFACE_SIZE] == encode_preface()
    (refuse,) = FrameDecoder(1 << 20).feed(wire[PREFACE_SIZE:])
    assert (refuse.type, refuse.aux, bytes(refuse.payload)) == (FrameType.REFUSE, ErrorCode.LIMIT, b"busy")


def test_a_stripe_refused_for_lack_of_room_ends_only_that_connection():
    """Before the session exists, a LIMIT refusal of an extra stripe drops that stripe alone; the
    creating connection goes on and the session is established."""
    from dataplane.channel.acceptor import refusal

    p = Pair(2, settle=False)
    stripe = p.wires[1]
    wire = b"".join(refusal(LimitExceeded("128 connections are already in their handshake")))
    events = stripe.ch.receive_data(wire, p.t)  # the listener had no room for it
    (closed,) = [e for e in events if isinstance(e, ConnectionClosed)]
    assert closed.conn_id == stripe.ch.conn_id and isinstance(closed.error, LimitExceeded)
    assert stripe.ch.closed and not p.client.terminated
    stripe.alive = False
    p.run()
    assert p.client.established and p.client.ready_connections == 1 and not p.c.of(SessionTerminated)


def test_reset_stream_mid_transfer_restores_session_credit():
    limits = Limits(session_memory=6 * MiB, replay_buffer=3 * MiB, stream_window=2 * MiB)
    p = Pair(limits=limits, server_consume=False)
    sid = p.open("x")
    p.write(p.client, sid, payload(10 * MiB, 1))
    p.run()
    assert p.client.send_capacity(sid) == 0
    p.client.reset_stream(sid, "operator abort")
    p.run()
    (reset,) = p.s.of(StreamReset)
    assert (reset.stream_id, reset.reason, reset.remote, reset.code) == (sid, "operator abort", True,
                                                                         ErrorCode.CANCEL)
    assert [e.stream_id for e in p.c.of(StreamClosed)] == [sid]
    assert [e.stream_id for e in p.s.of(StreamClosed)] == [sid]
    with pytest.raises(StreamError):
        p.client.send(sid, b"x")
    assert p.server.memory() == {"recv": 0, "reorder": 0, "send": 0}
    assert p.client.memory()["send"] == 0
    again = p.open("y")
    assert p.client.send_capacity(again) == 2 * MiB  # no session credit leaked by the reset


def test_crossing_resets_free_both_sides_and_keep_credit():
    limits = Limits(session_memory=6 * MiB, replay_buffer=3 * MiB, stream_window=2 * MiB)
    p = Pair(limits=limits, server_consume=False, client_consume=False)
    sid = p.open("x")
    p.write(p.client, sid, payload(4 * MiB, 1))
    p.write(p.server, sid, payload(4 * MiB, 2))
    p.run()
    p.client.reset_stream(sid, "client")
    p.server.reset_stream(sid, "server")  # before either RESET arrived
    p.run()
    assert p.client.stream_ids == [] and p.server.stream_ids == []
    assert p.client.memory() == p.server.memory() == {"recv": 0, "reorder": 0, "send": 0}
    again = p.open("y")
    assert p.client.send_capacity(again) == 2 * MiB
    p.server.send(again, b"x")  # and the other direction has its credit back too
    assert p.server.send_capacity(again) == 2 * MiB - 1


@pytest.mark.parametrize("answer", ["accept", "refuse"])
def test_reset_while_opening(answer):
    p = Pair()
    p.s.auto_accept = False
    sid = p.client.open_stream("x")
    p.run()
    p.client.reset_stream(sid, "changed my mind")
    if answer == "accept":
        p.server.accept_stream(sid)
    else:
        p.server.refuse_stream(sid, "no")
    p.run()
    assert p.client.stream_ids == [] and p.server.stream_ids == []
    assert not p.c.of(StreamAccepted) and not p.c.of(StreamRefused)


def test_acceptor_resets_a_stream_it_never_accepted():
    p = Pair()
    p.s.auto_accept = False
    sid = p.client.open_stream("x")
    p.run()
    p.server.reset_stream(sid, "busy")
    p.run()
    (reset,) = p.c.of(StreamReset)
    assert reset.stream_id == sid and reset.remote and reset.reason == "busy"
    assert p.client.stream_ids == [] and p.server.stream_ids == []


def test_lost_final_ack_is_answered_after_replay():
    """The receiver frees a finished stream at once; if its last ACK is lost, a replay is acked again."""
    p = Pair()
    sid = p.open("x")
    p.server.close_stream(sid)  # the server's half finishes first
    p.run()
    data = payload(500_000, 3)
    assert p.client.send(sid, data) == len(data)
    p.client.close_stream(sid)
    w = p.wires[0]
    p.pull()
    p.deliver()
    assert p.server.stream_ids == []  # all data and the FIN consumed: freed before acknowledging
    p.tick(0.05)
    p.pull()
    assert w.s2c, "the final ACK must have been sent..."
    w.s2c.clear()  # ...and it is lost with the connection
    p.drop(w, partial=False)
    assert p.client.stream_ids == [sid]
    p.connect()
    p.run()
    assert bytes(p.s.data[sid]) == data
    assert p.client.stats.replayed_bytes > 0
    assert p.client.stream_ids == [] and len(p.c.of(StreamClosed)) == 1


def test_repeated_reconnects_during_a_striped_transfer():
    p = Pair(3, config=SessionConfig(frame_size=16 * 1024), seed=11)
    a, b = p.open("a"), p.open("b")
    up, down = payload(4 * MiB, 1), payload(3 * MiB, 2)
    p.write(p.client, a, up, close=True)
    p.write(p.server, b, down, close=True)
    for k in range(4):
        target = (k + 1) * 700_000
        p.run(shuffle=True, max_bytes=64 * 1024,
              until=lambda t=target: len(p.s.data[a]) + len(p.c.data[b]) > t)
        p.pull(64 * 1024)
        victims = p.live() if k == 2 else [p.rng.choice(p.live())]  # once, all of them at the same time
        for w in victims:
            p.drop(w)
        p.tick(1.0)
        while len(p.live()) < 3:
            p.connect()
    p.run(shuffle=True, max_bytes=64 * 1024)
    assert bytes(p.s.data[a]) == up and bytes(p.c.data[b]) == down
    assert p.client.stats.reconnects >= 4 and not p.client.terminated
    assert p.client.stats.replayed_bytes > 0 and p.server.stats.replayed_bytes > 0


def test_peer_reset_is_reported_and_send_raises():
    p = Pair()
    sid = p.open("x")
    p.server.reset_stream(sid, "target gone", code=ErrorCode.CANCEL)
    p.run()
    (reset,) = p.c.of(StreamReset)
    assert reset.remote and reset.reason == "target gone"
    with pytest.raises(StreamError):
        p.client.send(sid, b"x")


def test_graceful_close():
    p = Pair(2)
    p.open("x")
    p.client.close("done")
    p.run()
    (cterm,) = p.c.of(SessionTerminated)
    (sterm,) = p.s.of(SessionTerminated)
    assert cterm.error is None and not cterm.remote
    assert sterm.error is None and sterm.remote
    assert all(w.ch.closed and w.sh.closed for w in p.wires)


def test_drain_delivers_what_was_handed_over_just_before_then_ends_the_session():
    data = payload(3 * MiB + 17, 4)
    # for contrast: an abrupt close drops what is not on the wire yet
    q = Pair(2)
    sid = q.open("x")
    assert q.client.send(sid, data) == len(data)
    q.client.close("now")
    q.run()
    assert len(q.s.data[sid]) < len(data) and not q.client.all_acknowledged

    p = Pair(2)
    sid = p.open("x")
    assert p.client.send(sid, data) == len(data)  # handed over, not one byte on the wire yet
    assert not p.client.all_acknowledged
    p.client.drain(p.t, 5.0, "done")
    assert p.client.draining and not p.client.terminated
    with pytest.raises(StreamClosedError):
        p.client.send(sid, b"more")  # no new data
    with pytest.raises(SessionClosedError, match="closing"):
        p.client.open_stream("late")
    p.run()
    assert bytes(p.s.data[sid]) == data
    assert [e.stream_id for e in p.s.of(StreamEnded)] == [sid]  # the stream ended orderly (FIN)
    (cterm,) = p.c.of(SessionTerminated)
    (sterm,) = p.s.of(SessionTerminated)
    assert cterm.error is None and not cterm.remote and sterm.error is None and sterm.remote
    assert p.client.all_acknowledged and p.client.stats.bytes_sent == len(data)
    assert all(w.ch.closed and w.sh.closed for w in p.wires)


def test_drain_answers_the_peer_and_refuses_its_new_streams():
    p = Pair()
    p.c.auto_accept = False
    mine = p.open("mine")
    pending = p.server.open_stream("early")
    p.run()
    assert [e.stream_id for e in p.c.of(StreamOpened)] == [pending]
    back = payload(200_000, 6)
    p.client.drain(p.t, 5.0)
    late = p.server.open_stream("late")
    p.client.accept_stream(pending)  # still answered; it may carry data to us, we send nothing
    p.write(p.server, pending, back)
    p.run()
    assert bytes(p.c.data[pending]) == back
    (refused,) = p.s.of(StreamRefused)
    assert (refused.stream_id, refused.code) == (late, ErrorCode.REFUSED)
    assert refused.reason == "the session is closing"
    assert sorted(e.stream_id for e in p.s.of(StreamEnded)) == [mine, pending]  # our FIN on both
    (cterm,) = p.c.of(SessionTerminated)
    assert cterm.error is None and p.client.all_acknowledged and p.server.terminated


def test_drain_times_out_and_says_so():
    p = Pair()
    sid = p.open("x")
    p.client.send(sid, payload(MiB, 1))
    p.drop(p.wires[0], partial=False)  # nothing can be acknowledged any more
    p.client.drain(p.t, 2.0)
    assert p.client.next_deadline() == pytest.approx(p.t + 2.0)
    p.tick(1.9)
    assert not p.client.terminated
    p.tick(0.2)
    (cterm,) = p.c.of(SessionTerminated)
    assert isinstance(cterm.error, ChannelTimeout) and cterm.error.code == ErrorCode.TIMEOUT
    assert re.match(rf"graceful close timed out: {MiB} bytes( and \d+ control frames?)? not acknowledged "
                    "by the peer; closed anyway$", cterm.error.reason), cterm.error.reason
    assert not p.client.all_acknowledged


def test_drain_before_the_session_exists_ends_it_at_once():
    s = Session.client(0.0)
    s.connect(0.0)
    s.drain(0.0, 5.0)
    assert s.terminated and [type(e) for e in s.tick(0.0)] == [SessionTerminated]
    with pytest.raises(SessionClosedError):
        s.drain(0.0, 5.0)


def test_max_connections_refusal_keeps_the_session():
    p = Pair(2, slimits=Limits(max_connections=2), limits=Limits())
    p.connect()
    p.run()
    (closed,) = p.c.of(ConnectionClosed)
    assert isinstance(closed.error, LimitExceeded)
    assert not p.client.terminated and p.client.ready_connections == 2


def test_peer_max_streams_is_enforced_locally():
    p = Pair(slimits=Limits(max_streams=2), limits=Limits())
    p.open("a")
    p.open("b")
    with pytest.raises(LimitExceeded):
        p.client.open_stream("c")


def test_api_misuse_raises_documented_errors():
    p = Pair()
    sid = p.open("x")
    with pytest.raises(ValueError):
        p.client.open_stream("")
    with pytest.raises(StreamError):
        p.client.send(999, b"x")
    with pytest.raises(ValueError):
        p.server.consumed(sid, 1)
    with pytest.raises(ValueError):
        p.client.set_compression(sid, "maybe")
    p.client.close_stream(sid)
    with pytest.raises(StreamClosedError):
        p.client.send(sid, b"x")
    p.client.reset_stream(sid)
    with pytest.raises(StreamResetError):
        p.client.send(sid, b"x")
    p.client.close()
    with pytest.raises(SessionClosedError):
        p.client.open_stream("y")


# ====================================================================== time: RTT, keepalive, timeouts


def test_ping_pong_rtt_with_injected_clock():
    p = Pair()
    p.t = 100.0
    p.client.ping(p.t)
    p.pull()
    p.deliver()  # the PING reaches the server at t=100
    p.t = 100.25
    p.pull()
    p.deliver()  # its PONG reaches the client at t=100.25
    (pong,) = p.c.of(PongReceived)
    assert pong.rtt == pytest.approx(0.25)
    assert p.client.stats.rtt == pytest.approx(0.25) and p.client.stats.rtt_min == pytest.approx(0.25)
    assert p.client.stats.pings_sent == p.client.stats.pongs_received == 1


def test_keepalive_pings_and_idle_timeout():
    cfg = SessionConfig(ping_interval=1.0, idle_timeout=3.0)
    p = Pair(config=cfg, sconfig=cfg)
    p.advance(2.5)
    assert p.client.ready_connections == 1  # pings kept the idle connection alive
    assert p.client.stats.pongs_received >= 1 and p.server.stats.pongs_received >= 1
    assert p.client.next_deadline() is not None
    # the network goes silent: nothing is delivered any more
    for _ in range(5):
        p.t += 1.0
        p.c.handle(p.client.tick(p.t))
    (closed,) = p.c.of(ConnectionClosed)
    assert isinstance(closed.error, ChannelTimeout) and "keepalive" in closed.error.reason
    assert p.client.ready_connections == 0 and not p.client.terminated


def test_handshake_timeouts():
    acc = Acceptor(Limits(handshake_timeout=2.0))
    h = acc.accept("x", 0.0)
    assert h.tick(1.0) == [] and h.handshake_deadline == 2.0
    (closed,) = h.tick(2.0)
    assert isinstance(closed.error, ChannelTimeout) and h.closed
    s = Session.client(0.0, limits=Limits(handshake_timeout=2.0))
    ch = s.connect(0.0, "srv")
    (closed,) = s.tick(2.5)
    assert closed.conn_id == ch.conn_id and isinstance(closed.error, ChannelTimeout)


# ====================================================================== compression

native = pytest.mark.skipif(not native_available(),
                            reason=f"dataplane.native.codec is not importable: {native_import_error()}")


def ram_like(n_pages: int, seed: int) -> bytes:
    rng = random.Random(seed)
    pages = []
    for _ in range(n_pages):
        kind = rng.random()
        if kind < 0.4:
            pages.append(bytes(4096))
        elif kind < 0.8:
            pages.append((b"kernel text %d " % rng.randrange(50)) * 256)
        else:
            pages.append(rng.randbytes(4096))
    return b"".join(pages)


@native
def test_native_page_codec_compresses_and_elides_zero_pages():
    p = Pair(config=SessionConfig(compression="on"))
    sid = p.open("ram")
    data = ram_like(1024, 1)
    p.write(p.client, sid, data, close=True)
    p.run()
    assert bytes(p.s.data[sid]) == data
    st = p.client.stats
    assert st.compressed_frames > 0 and st.zero_pages > 100
    assert st.compression_ratio > 2.0
    assert st.wire_bytes_sent < len(data) / 2


@native
def test_native_auto_mode_sends_incompressible_data_raw_and_backs_off_on_idle_link():
    p = Pair()
    a, b = p.open("random"), p.open("zeros")
    p.write(p.client, a, payload(8 * MiB, 1))
    p.run()
    sa = p.client.stream_stats(a)
    assert sa.compression_ratio < 1.01 and sa.compressed_frames == 0
    # the page probe finds nothing compressible: the frames go raw without an LZ4 attempt
    assert sa.compression == "auto:off(incompressible)"
    text = b"".join(b"line %d of a log that compresses well\n" % i for i in range(300_000))
    p.write(p.client, a, text, close=True)  # text on the same stream compresses again at once
    p.run()
    sa = p.client.stream_stats(a)
    assert sa.compression == "auto:on" and sa.compressed_frames >= 1
    assert bytes(p.s.data[a]) == payload(8 * MiB, 1) + text
    for cid in p.client.connection_ids:
        p.client.set_send_backlog(cid, False)  # the link drains faster than we produce
    p.write(p.client, b, bytes(4 * MiB), close=True)
    p.run()
    sb = p.client.stream_stats(b)
    assert sb.compression == "auto:off(idle-link)"
    assert 0 < sb.compressed_frames < sb.frames_sent
    for cid in p.client.connection_ids:
        p.client.set_send_backlog(cid, True)
    assert bytes(p.s.data[b]) == bytes(4 * MiB)


def test_zlib_codec_through_the_session_and_forced_off():
    cfg = SessionConfig(codecs=("zlib",), compression="on")
    p = Pair(config=cfg, sconfig=SessionConfig())
    a, b = p.open("z"), p.open("raw")
    p.client.set_compression(b, "off")
    data = b"abc" * 300_000
    p.write(p.client, a, data, close=True)
    p.write(p.client, b, data, close=True)
    p.run()
    assert bytes(p.s.data[a]) == data and bytes(p.s.data[b]) == data
    assert p.client.stream_stats(a).compression_ratio > 20
    assert p.client.stream_stats(b).compressed_frames == 0


def test_corrupt_compressed_payload_is_a_compression_error():
    with pytest.raises(CompressionError):
        ZlibCodec().decode(b"not zlib", 100)
    with pytest.raises(CompressionError):
        ZlibCodec().decode(ZlibCodec().new_encoder("on").encode(b"x" * 200), 100)


def test_compression_policy_decisions():
    pol = CompressionPolicy("auto", idle_frames=3, backoff_min=1000, backoff_max=4000)
    assert pol.decide(8192, True)
    pol.record(8192, 1000)
    for _ in range(2):
        assert pol.decide(8192, False)
    assert not pol.decide(8192, False) and pol.state == "auto:off(idle-link)"
    assert pol.decide(8192, True) and pol.state == "auto:on"
    pol.record(8192, 8000)  # did not pay: back off 1000 bytes
    assert not pol.decide(8192, True) and pol.state == "auto:off(incompressible)"
    assert pol.decide(8192, True)
    pol.record(8192, 8100)  # again: back-off doubles
    assert not pol.decide(1000 * 8, True)
    assert pol.decide(8192, True)
    assert not pol.decide(100, True)  # too small to bother
    pol.mode = "on"
    assert pol.decide(8192, False)
    pol.mode = "off"
    assert not pol.decide(8192, True)
    with pytest.raises(ValueError):
        CompressionPolicy("sometimes")


# ====================================================================== stats and helpers


def test_stats_are_counted():
    p = Pair(2)
    sid = p.open("x")
    data = payload(2 * MiB, 4)
    p.write(p.client, sid, data, close=True)
    p.run(until=lambda: len(p.s.data[sid]) == len(data))
    for _ in range(3):
        p.tick(1.0)
    cs, ss = p.client.stats, p.server.stats
    assert cs.bytes_sent == ss.bytes_received == len(data)
    assert cs.wire_bytes_sent > cs.bytes_sent and ss.wire_bytes_received == cs.wire_bytes_sent
    assert cs.frames_sent == ss.frames_received
    assert cs.connections == 2 and cs.streams_opened == ss.streams_opened == 1
    st = p.client.stream_stats(sid)
    assert st.bytes_sent == len(data) and st.frames_sent >= 8
    assert st.as_dict()["compression_ratio"] >= 1.0 and "send_rate" in cs.as_dict()
    assert cs.send_rate > 0 or st.send_rate >= 0


def test_token_bucket():
    tb = TokenBucket(1000.0, 500.0, now=0.0)
    assert tb.take(500, 0.0) == 0.0
    assert tb.take(500, 0.0) == pytest.approx(0.5)
    assert tb.available(0.5) == pytest.approx(0.0)
    assert tb.take(100, 1.0) == 0.0  # refilled 500 at 1000 B/s, capped at burst
    tb.set_rate(2000.0, 1.0)
    assert tb.rate == 2000.0
    assert tb.take(10_000, 1.0) > 4.0
    tb.set_rate(None, 2.0)
    assert tb.take(1 << 30, 2.0) == 0.0 and tb.rate is None
    with pytest.raises(ValueError):
        TokenBucket(-1.0)
    with pytest.raises(ValueError):
        tb.take(-1, 3.0)


def test_limits_validation():
    with pytest.raises(ValueError):
        Limits(replay_buffer=64 << 20, session_memory=64 << 20)
    with pytest.raises(ValueError):
        Limits(max_frame_payload=100)
    with pytest.raises(ValueError):
        SessionConfig(compression="maybe")
    assert Limits().recv_window == 32 << 20 and Limits().grace == 60.0


# ====================================================================== microbenchmark


def bench(total: int = 1 << 30, frame: int = MiB, data: bytes | None = None,
          compression: str = "off") -> tuple[float, float]:
    """Move *total* bytes client->server in 1 MiB frames; return (MB/s, frames/s) of encode+decode."""
    cfg = SessionConfig(frame_size=frame, send_batch=frame, compression=compression)
    limits = Limits(max_frame_payload=frame)
    p = Pair(limits=limits, config=cfg)
    sid = p.open("bench")
    client, ch, sh, server = p.client, p.wires[0].ch, p.wires[0].sh, p.server
    block = data if data is not None else os.urandom(frame)
    sent = received = 0
    t0 = time.perf_counter()
    while received < total:
        while sent < total and client.send(sid, block) == len(block):
            sent += len(block)
        for buf in ch.buffers_to_send(frame):  # the zero-copy BufferedProtocol path, one memcpy per byte
            mv = memoryview(buf)
            while mv:
                dst = sh.get_buffer(-1)
                n = min(len(dst), len(mv))
                dst[:n] = mv[:n]
                mv = mv[n:]
                for e in sh.buffer_updated(n, 0.0):
                    if isinstance(e, DataReceived):
                        received += len(e.data)
                        server.consumed(sid, len(e.data))
        ch.receive_data(sh.data_to_send(), 0.0)
    dt = time.perf_counter() - t0
    return total / dt / 1e6, total / frame / dt


if __name__ == "__main__":
    total = int(sys.argv[1]) << 20 if len(sys.argv) > 1 else 1 << 30
    mbs, fps = bench(total)
    print(f"raw 1 MiB frames:        {mbs:8.0f} MB/s  {fps:7.0f} frames/s")
    if native_available():
        mbs, fps = bench(total, data=ram_like(256, 1), compression="on")
        print(f"page codec, RAM-like:    {mbs:8.0f} MB/s  {fps:7.0f} frames/s (application bytes)")


# ====================================================================== zero-copy send buffer


def test_send_buffer_mixes_copies_references_and_in_place_writes():
    from dataplane.channel.buffers import _SendBuffer

    rng = random.Random(9)
    buf = _SendBuffer()
    expect = bytearray()
    for _ in range(300):
        kind = rng.random()
        if kind < 0.3:  # small write: copied into the tail chunk
            data = rng.randbytes(rng.randint(1, 5000))
            buf.append(data)
        elif kind < 0.4:  # large immutable write: kept by reference
            data = rng.randbytes(rng.randint(64 * 1024, 300_000))
            buf.append(data)
        elif kind < 0.5:  # large mutable write: copied
            data = rng.randbytes(rng.randint(64 * 1024, 300_000))
            buf.append(bytearray(data))
        else:  # in place, like recv_into
            view = buf.get_buffer(rng.randint(1, 1 << 20))
            n = rng.randint(0, len(view))
            data = rng.randbytes(n)
            view[:n] = data
            buf.commit(n)
        expect += data
    assert buf.end == len(expect)
    frozen = bytes(expect)
    released = 0
    views = []
    while released < len(expect):
        off = released
        while off < len(expect):
            n = min(rng.randint(1, 1 << 20), len(expect) - off)
            c = buf.contiguous(off)
            assert c >= 1
            v = buf.view(off, min(n, c))
            if n <= c:
                assert not isinstance(v, bytes) or len(v) == c  # one chunk: a view (or the whole chunk)
            views.append((off, v))
            assert bytes(buf.view(off, n)) == frozen[off:off + n]  # across chunks: joined
            off += n
        released = min(len(expect), released + rng.randint(1, 3 << 20))
        buf.release(released)
        buf.get_buffer(1000)  # later writes never touch bytes handed out before
        buf.commit(0)
    assert all(bytes(v) == frozen[off:off + len(v)] for off, v in views)
    with pytest.raises(ValueError):
        buf.get_buffer(10)
        buf.commit(11)


def test_frame_ready_says_when_a_full_frame_waits():
    p = Pair(config=SessionConfig(frame_size=64 * 1024))
    sid = p.open("x")
    assert not p.client.frame_ready(sid)
    p.client.send(sid, bytes(60_000))
    assert not p.client.frame_ready(sid)
    p.client.send(sid, bytes(10_000))
    assert p.client.frame_ready(sid)
    p.pull()  # frames cut and taken by the connection
    assert not p.client.frame_ready(sid)
    with pytest.raises(StreamError):
        p.client.frame_ready(99)


def test_zero_copy_send_round_trip_and_credit():
    limits = Limits(session_memory=4 * MiB, replay_buffer=2 * MiB, stream_window=MiB)
    p = Pair(limits=limits, server_consume=False)
    sid = p.open("x")
    data = payload(MiB + 1000, 4)
    view = p.client.get_send_buffer(sid, 300_000)
    assert 0 < len(view) <= 300_000  # in-place chunks start small and grow while they fill up
    pos = 0
    sizes = []
    while True:
        view = p.client.get_send_buffer(sid)  # no hint: up to what the credit allows
        assert 0 < len(view) <= MiB - pos
        sizes.append(len(view))
        view[:] = data[pos:pos + len(view)]
        if pos + len(view) == MiB:
            with pytest.raises(ValueError):
                p.client.send_buffer_updated(sid, len(view) + 1)
            assert p.client.send_buffer_updated(sid, len(view)) == 0  # blocked: StreamWritable follows
            break
        pos += len(view)
        assert p.client.send_buffer_updated(sid, len(view)) == MiB - pos
    assert sizes[:-1] == sorted(sizes[:-1]) and max(sizes) > sizes[0]  # (the last one: credit)
    assert len(p.client.get_send_buffer(sid)) == 0
    p.run()
    assert bytes(p.s.data[sid]) == data[:MiB]
    p.s.consume_all()
    p.run()
    assert any(e.stream_id == sid for e in p.c.of(StreamWritable))
    view = p.client.get_send_buffer(sid, 1000)
    view[:] = data[MiB:]
    p.client.send_buffer_updated(sid, 1000)
    p.client.close_stream(sid)
    with pytest.raises(StreamClosedError):
        p.client.get_send_buffer(sid)
    p.run()
    p.s.consume_all()
    p.run()
    assert bytes(p.s.data[sid]) == data
    assert p.s.of(StreamEnded)


def test_zero_copy_frames_never_straddle_chunks(monkeypatch):
    from dataplane.channel.buffers import _SendBuffer

    cut = []
    orig = _SendBuffer.view

    def view(self, off, n):
        v = orig(self, off, n)
        cut.append(v)
        return v

    monkeypatch.setattr(_SendBuffer, "view", view)
    p = Pair()
    sid = p.open("x")
    data = payload(5 * MiB, 6)
    pos = 0
    while pos < len(data):
        view = p.client.get_send_buffer(sid, 700_000)
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos:pos + n]
        p.client.send_buffer_updated(sid, n)
        pos += n
    p.run()
    assert bytes(p.s.data[sid]) == data
    assert len(cut) >= 5 and all(isinstance(v, memoryview) for v in cut)  # views: never joined copies


# ====================================================================== one stream's state machine


def test_stream_state_transitions_and_the_ones_refused():
    from dataplane.channel.stream_state import RecvState, StreamPhase, StreamState, StreamTable

    table = StreamTable(client=True, keep_closed=4, max_reorder_pieces=16)
    local = table.open_local("ram", window=1000, comp_mode="off")
    assert (local.sid, local.phase, local.recv) == (1, StreamPhase.OPENING, RecvState.OPEN)
    assert local.send_credit() == 0  # no credit before OPEN_OK
    local.held.append((0, b"early"))
    assert local.open_confirmed(500) == [(0, b"early")] and local.held == []
    assert local.phase == StreamPhase.OPEN and local.send_credit() == 500
    with pytest.raises(ProtocolError):
        local.open_confirmed(500)  # a second OPEN_OK
    with pytest.raises(ProtocolError):
        local.open_failed()  # OPEN_FAIL after OPEN_OK
    assert local.begin_fin() and not local.begin_fin()  # idempotent
    with pytest.raises(StreamClosedError):
        local.check_sendable()
    assert local.send_finished(ctl_acked=local.fin_seq + 1)  # nothing written: FIN alone, acknowledged

    with pytest.raises(ProtocolError):
        table.open_remote(4, "x", 1000, "off", max_streams=2)  # the peer's first id is 2
    remote = table.open_remote(2, "nbd", 1000, "off", max_streams=2)
    assert remote is not None and remote.phase == StreamPhase.PENDING and remote.recv_limit() == 0
    with pytest.raises(StreamError):
        remote.begin_fin()  # must be answered first
    remote.fin_received(0)
    assert remote.recv == RecvState.FIN and not remote.end_reached()  # not accepted yet
    remote.accepted()
    assert remote.end_reached() and remote.recv == RecvState.ENDED
    with pytest.raises(StreamError):
        remote.accepted()
    assert remote.reset() == 0 and remote.phase == StreamPhase.RESET and remote.stopped
    with pytest.raises(StreamResetError):
        remote.accepted()
    assert remote.settle(0) == (0, 0) and remote.recv_settled and remote.recv_finished()

    refused = table.open_remote(4, "y", 1000, "off", max_streams=2)
    assert refused is not None
    refused.refused()
    assert refused.phase == StreamPhase.CLOSED and refused.recv_settled
    assert table.remove(refused) and not table.remove(refused)
    assert table.open_remote(6, "z", 1000, "off", max_streams=1) is None  # over the limit: refuse it
    assert table.known_id(6) and not table.known_id(8) and table.never_opened_by_us(3)

    crossing = table.open_local("late", window=1000, comp_mode="off")
    crossing.reset()
    assert crossing.open_failed() is False  # OPEN_FAIL crossing our RESET: the application knows
    assert crossing.phase == StreamPhase.CLOSED
    bare = StreamState(99, "n", True, 1000, "off", 16)
    with pytest.raises(ProtocolError):
        bare.fin_received(2000)  # beyond our credit
