"""Session state machine: streams striped over connections, reliable control, credit, replay, resume.

One :class:`Session` is N connections carrying M full-duplex streams. It is
sans-IO: bytes and the time (``now``, any monotonic clock in seconds) come in
as arguments, events come out as return values, bytes to write are pulled
with ``data_to_send``. Nothing here sleeps, reads a clock or touches a socket.

This module holds the session: its connections, the frames in and out, the
control channel, session credit, replay and resume, and the dispatch of
frames to handlers. Each stream's life (phases, the two halves, per-stream
credit, the named transitions) is in :mod:`dataplane.channel.stream_state`;
the session calls those transitions and applies what they return to the
session's totals.

How the pieces fit (details in ``docs/wire-format.md``):

* **Striping.** DATA frames are cut when a connection asks for bytes
  (``data_to_send``), round-robin over the streams that have something to
  send, so each connection takes work at the speed it drains. Every DATA
  frame carries its stream offset; the receiver reassembles, drops
  duplicates and delivers in order.
* **Control.** OPEN / OPEN_OK / OPEN_FAIL / FIN / RESET carry a session-wide
  sequence number, go over one connection at a time and are kept until the
  peer's cumulative control ack; they are processed strictly in order, so
  streams are announced in the order they were opened.
* **Credit.** The receiver advertises absolute limits (per stream: consumed
  + stream window; per session: total consumed + session window) in ACK
  frames; ``send`` accepts only what fits, and credit comes back only when
  the receiving application calls ``consumed``.
* **Replay.** Sent bytes stay in a per-stream send buffer until the peer's
  cumulative ACK covers them. The ranges in flight on a lost connection are
  queued again and go out on any other (or the next) connection; the first
  ACK on a new connection trims what the peer already has.
* **Resume.** A connection joins a session with HELLO(session id, token);
  the server checks the token in constant time *and* that the TLS identity
  is the one bound at creation. With no connection for ``grace`` seconds
  the session fails and every stream is reset.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dataplane.channel.codec import MODES, Codec, StreamCompressor, decoder_mask, decoders, make_codecs
from dataplane.channel.errors import (
    AuthError,
    ChannelError,
    ChannelTimeout,
    ErrorCode,
    FlowControlError,
    GraceExpired,
    LimitExceeded,
    ProtocolError,
    SessionClosedError,
    StreamError,
    error_from_code,
)
from dataplane.channel.events import (
    ConnectionClosed,
    DataReceived,
    Event,
    HandshakeComplete,
    PongReceived,
    SessionTerminated,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    StreamWritable,
)
from dataplane.channel.frames import (
    CODEC_MASK,
    FLAG_JOIN,
    FLAG_JOINED,
    HEADER_SIZE,
    MAX_ACK_ENTRIES,
    MAX_NAME,
    MAX_REASON,
    MAX_U32,
    MAX_VERSION,
    MIN_VERSION,
    Buffer,
    Frame,
    FrameType,
    HelloParams,
    decode_ack_entries,
    decode_text,
    encode_ack_entries,
    encode_text,
)
from dataplane.channel.protocol import Connection, ConnState, Role
from dataplane.channel.stats import SessionStats, StreamStats, count_both
from dataplane.channel.stream_state import StreamPhase, StreamState, StreamTable

if TYPE_CHECKING:
    from dataplane.channel.acceptor import Acceptor

# ====================================================================== configuration

#: Out-of-order pieces of data one stream may hold (default of ``Limits.max_reorder_pieces``).
#: Legitimate reordering comes from striping: a piece is a frame that overtook a frame still on
#: another connection. Bulk data goes in frames of up to 1 MiB, so a 16 MiB stream window holds a
#: few dozen pieces at most; 4096 leaves room for small-frame traffic (an interactive stream, the
#: postcopy return path) behind a connection that stalls for seconds. More is a peer flooding
#: tiny out-of-order frames, each of which would cost far more memory and time than its bytes
#: (credit counts bytes, not pieces): the session ends with a PROTOCOL error.
MAX_REORDER_PIECES = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound on memory and time of a session.

    ``max_frame_payload``: largest DATA payload accepted (and sent).
    ``session_memory``: per session, receive buffering plus replay buffer;
    the session receive window is ``session_memory - replay_buffer``.
    ``replay_buffer``: sent-but-unacknowledged bytes we keep (all streams).
    ``stream_window``: per-stream receive window. ``max_streams``: streams
    the peer may have open towards us at once. ``max_connections``: per
    session. ``handshake_timeout``/``grace``: seconds.
    ``max_reorder_pieces``: out-of-order pieces one stream may hold (see
    :data:`MAX_REORDER_PIECES`); beyond it the session ends with ProtocolError.

    Raises ValueError for inconsistent values.
    """

    max_frame_payload: int = 1 << 20
    session_memory: int = 64 << 20
    replay_buffer: int = 32 << 20
    stream_window: int = 16 << 20
    max_streams: int = 64
    max_connections: int = 16
    handshake_timeout: float = 10.0
    grace: float = 60.0
    max_reorder_pieces: int = MAX_REORDER_PIECES

    def __post_init__(self) -> None:
        if not 4096 <= self.max_frame_payload <= (64 << 20):
            raise ValueError(f"max_frame_payload must be in 4 KiB..64 MiB, got {self.max_frame_payload}")
        if not 0 < self.replay_buffer < self.session_memory:
            raise ValueError("replay_buffer must be positive and smaller than session_memory")
        if not 0 < self.stream_window <= (1 << 40):
            raise ValueError(f"stream_window out of range: {self.stream_window}")
        if not 1 <= self.max_streams <= 1 << 20 or not 1 <= self.max_connections <= 1024:
            raise ValueError("max_streams and max_connections must be positive")
        if self.handshake_timeout <= 0 or self.grace <= 0:
            raise ValueError("handshake_timeout and grace must be positive")
        if self.max_reorder_pieces < 1:
            raise ValueError(f"max_reorder_pieces must be positive, got {self.max_reorder_pieces}")

    @property
    def recv_window(self) -> int:
        """Session-level receive window: ``session_memory - replay_buffer``."""
        return self.session_memory - self.replay_buffer


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Tuning that does not bound memory.

    ``frame_size``: largest DATA payload we cut (capped by the peer's
    ``max_frame_payload``). ``send_batch``: default ``max_bytes`` of one
    ``data_to_send`` call. ``compression``: default mode of new streams
    (``auto``/``on``/``off``). ``codecs``: encoders we may use, in order of
    preference (``page`` = native page codec, ``zlib``). ``ack_delay``: how
    long a non-urgent ACK may wait. ``ping_interval``/``idle_timeout``:
    keepalive (seconds). ``probe_timeout``: when a connection joins, the
    other connections are pinged and dropped if silent for
    ``max(probe_timeout, 4 * srtt)`` (a reconnect often means an old
    connection is half-open). ``versions``: protocol versions we speak.

    Raises ValueError for out-of-range values.
    """

    frame_size: int = 1 << 20
    send_batch: int = 1 << 20
    compression: str = "auto"
    codecs: tuple[str, ...] = ("page",)
    ack_delay: float = 0.01
    ping_interval: float = 5.0
    idle_timeout: float = 30.0
    probe_timeout: float = 5.0
    versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION)

    def __post_init__(self) -> None:
        if not 1 <= self.frame_size <= (64 << 20) or self.send_batch < 1:
            raise ValueError("frame_size and send_batch must be positive (frame_size <= 64 MiB)")
        if self.compression not in MODES:
            raise ValueError(f"compression must be one of {MODES}")
        if self.ack_delay < 0 or min(self.ping_interval, self.idle_timeout, self.probe_timeout) <= 0:
            raise ValueError("ack_delay must be >= 0; ping_interval, idle_timeout, probe_timeout > 0")


class _Link:
    __slots__ = ("cid", "proto", "handshaken", "ready", "hello_sent", "joined", "inflight", "inflight_cap",
                 "backlogged", "last_recv", "next_ping", "pings", "ping_seq", "probe_at")

    def __init__(self, cid: int, proto: Connection, now: float) -> None:
        self.cid = cid
        self.proto = proto
        self.handshaken = False  # HELLO/WELCOME exchanged
        self.ready = False  # and the peer's first ACK received: data may flow
        self.hello_sent = False
        self.joined = False
        self.inflight: deque[tuple[StreamState, int, int]] = deque()
        self.inflight_cap = 1024
        self.backlogged = True  # until the driver says otherwise, assume the link is the bottleneck
        self.last_recv = now
        self.next_ping = float("inf")
        self.pings: dict[int, float] = {}
        self.ping_seq = 0
        self.probe_at = float("inf")  # must hear from the peer by then (liveness probe)


def _as_bytes_view(data: Buffer) -> Buffer:
    if isinstance(data, memoryview) and (data.itemsize != 1 or data.ndim != 1):
        return data.cast("B")
    return data


# ====================================================================== the session


class Session:
    """Sans-IO channel session (client or server side). Create with :meth:`client` or via :class:`Acceptor`.

    Connection-level calls take the connection id handed out by
    :meth:`connect` / :class:`Acceptor` (or use the
    :class:`ConnectionHandle` wrapper). Event-returning calls never raise
    for bad input from the peer: they report it as events. Local API misuse
    raises :class:`~dataplane.channel.errors.ChannelError` subclasses or
    ValueError, as documented per method.
    """

    def __init__(self, role: Role, *, now: float, limits: Limits | None = None,
                 config: SessionConfig | None = None, session_id: bytes | None = None, token: bytes = b"",
                 peer_identity: str | None = None) -> None:
        self.role = role
        self.limits = limits or Limits()
        self.config = config or SessionConfig()
        self.session_id: bytes | None = session_id
        self._token = token
        self._identity = peer_identity
        self._established = role == Role.SERVER
        self._terminated = False
        self.error: ChannelError | None = None
        self._now = now
        self._links: dict[int, _Link] = {}
        self._closing: dict[int, Connection] = {}
        self._next_cid = 1
        self._ready_count = 0
        self._no_link_since: float | None = now
        self._creator: int | None = None
        self._peer: HelloParams | None = None
        self._peer_session_limit = 0
        self._encoder_codec: Codec | None = None
        self._decoders = decoders()
        # streams (their state machine: stream_state.py)
        self._table = StreamTable(role == Role.CLIENT, keep_closed=4 * self.limits.max_streams,
                                  max_reorder_pieces=self.limits.max_reorder_pieces)
        self._streams = self._table.live
        self._sendable: deque[StreamState] = deque()
        self._blocked: set[int] = set()
        self._fin_wait: set[int] = set()
        # credit accounting (see docs/wire-format.md, "Flow control")
        self._sent_total = 0
        self._send_buffered = 0
        self._recv_total = 0
        self._recv_credit = 0
        self._recv_window = self.limits.recv_window
        # control channel
        self._ctl: list[tuple[int, int, int, int, int, bytes]] = []
        self._ctl_next_seq = 1
        self._ctl_unsent = 1
        self._ctl_acked = 1
        self._ctl_link: int | None = None
        self._ctl_recv_next = 1
        # acknowledgements
        self._dirty: set[int] = set()
        self._final_acks: set[int] = set()
        self._ack_urgent = False
        self._ack_due_at: float | None = None
        self._ack_sess_sent = 0
        self._deferred: list[Event] = []
        # graceful close (drain): when it must be over, and what GOAWAY then says
        self._drain_deadline: float | None = None
        self._drain_reason = ""
        self._acked_at_end = False
        self.stats = SessionStats()

    # ------------------------------------------------------------------ construction

    @classmethod
    def client(cls, now: float, *, limits: Limits | None = None,
               config: SessionConfig | None = None) -> Session:
        """A new client-side session; add connections with :meth:`connect`."""
        return cls(Role.CLIENT, now=now, limits=limits, config=config)

    # ------------------------------------------------------------------ properties

    @property
    def established(self) -> bool:
        """True once the server created the session (client: first WELCOME received)."""
        return self._established

    @property
    def terminated(self) -> bool:
        """True once the session ended (see :attr:`error`)."""
        return self._terminated

    @property
    def resume_token(self) -> bytes:
        """The session's resume token (empty until established)."""
        return self._token

    @property
    def peer_identity(self) -> str | None:
        """The peer TLS identity bound to this session."""
        return self._identity

    @property
    def connection_ids(self) -> list[int]:
        """Ids of connections not yet closed or lost."""
        return list(self._links)

    @property
    def ready_connections(self) -> int:
        """Number of connections that completed their handshake and carry data."""
        return self._ready_count

    @property
    def stream_ids(self) -> list[int]:
        """Ids of streams whose state is still held."""
        return list(self._streams)

    def stream_stats(self, stream_id: int) -> StreamStats:
        """Counters of a live stream. Raises StreamError for an unknown or freed stream."""
        return self._get(stream_id).stats

    def memory(self) -> dict[str, int]:
        """Current buffering: ``recv`` (credit-accounted receive bytes), ``reorder``, ``send`` (replay)."""
        return {
            "recv": self._recv_total - self._recv_credit,
            "reorder": sum(st.reorder.nbytes for st in self._streams.values()),
            "send": self._send_buffered,
        }

    # ------------------------------------------------------------------ connections

    def connect(self, now: float, peer_identity: str = "") -> ConnectionHandle:
        """Client: start a new connection (a stripe, or a reconnect); return its handle.

        Write ``handle.data_to_send()`` to the freshly connected transport.
        *peer_identity* is the server's TLS identity; the first connection
        binds it and later ones must match. Connections made before the
        session is established wait for the first WELCOME before sending
        their join HELLO. Raises SessionClosedError, AuthError (identity
        mismatch), LimitExceeded (``max_connections``), ValueError on a
        server session.
        """
        self._check_alive()
        if self.role != Role.CLIENT:
            raise ValueError("connect() is only for client sessions")
        if len(self._links) >= self.limits.max_connections:
            raise LimitExceeded(f"session already has {len(self._links)} connections")
        if self._identity is None:
            self._identity = peer_identity
        elif not _same_identity(self._identity, peer_identity):
            raise AuthError("server identity differs from the one this session is bound to")
        self._now = now
        proto = Connection(Role.CLIENT, max_frame_payload=self.limits.max_frame_payload,
                           versions=self.config.versions, peer_identity=peer_identity)
        link = self._new_link(proto, now)
        if self._established:
            self._send_hello(link, join=True)
        elif self._creator is None:
            self._send_hello(link, join=False)
            self._creator = link.cid
        return ConnectionHandle(self, link.cid, None)

    def _new_link(self, proto: Connection, now: float) -> _Link:
        cid = self._next_cid
        self._next_cid += 1
        link = _Link(cid, proto, now)
        self._links[cid] = link
        self.stats.connections_opened += 1
        return link

    def _params(self, session_id: bytes, token: bytes) -> HelloParams:
        lim = self.limits
        return HelloParams(session_id, token, lim.max_frame_payload, lim.max_streams, lim.stream_window,
                           lim.recv_window, decoder_mask(self._decoders))

    def _send_hello(self, link: _Link, join: bool) -> None:
        params = (self._params(self.session_id or bytes(16), self._token) if join
                  else self._params(bytes(16), bytes(32)))
        link.proto.send_frame(FrameType.HELLO, params.pack(), flags=FLAG_JOIN if join else 0)
        link.proto.handshake_deadline = self._now + self.limits.handshake_timeout
        link.hello_sent = True
        link.joined = join

    def _verify(self, token: bytes, identity: str) -> bool:
        ok_token = hmac.compare_digest(token, self._token)
        ok_identity = _same_identity(self._identity or "", identity)
        return ok_token & ok_identity

    def _attach(self, proto: Connection, hello: HelloParams, joined: bool, now: float) -> int:
        """Server: adopt a connection whose HELLO was accepted; queue WELCOME and our state."""
        self._now = now
        link = self._new_link(proto, now)
        link.joined = joined
        self.stats.wire_bytes_received += proto.bytes_in  # the preface and HELLO
        self.stats.wire_bytes_sent += proto.bytes_out
        if self._peer is None:
            self._set_peer(hello)
        token = bytes(32) if joined else self._token
        assert self.session_id is not None
        proto.send_frame(FrameType.WELCOME, self._params(self.session_id, token).pack(),
                         flags=FLAG_JOINED if joined else 0)
        proto.handshake_answered()
        proto.handshake_deadline = now + self.limits.handshake_timeout
        link.handshaken = True
        self._emit_acks(link, full=True)
        return link.cid

    def _set_peer(self, params: HelloParams) -> None:
        self._peer = params
        self._peer_session_limit = max(self._peer_session_limit, params.session_window)
        self._encoder_codec = None
        for codec in make_codecs(self.config.codecs):
            if params.codecs & (1 << codec.codec_id):
                self._encoder_codec = codec
                break

    def receive_data(self, conn_id: int, data: Buffer, now: float) -> list[Event]:
        """Feed bytes read from connection *conn_id*; return the resulting events.

        Never raises for bad input: a protocol violation yields
        :class:`SessionTerminated` (with ChecksumError, FlowControlError, ...)
        and the peer is told with GOAWAY. Unknown or closed *conn_id*: [].
        """
        self._now = now
        events = self._take_deferred()
        link = self._links.get(conn_id)
        if link is None or self._terminated:
            return events
        self.stats.wire_bytes_received += len(data)
        try:
            frames = link.proto.receive(data)
        except ChannelError as exc:
            self._terminate(exc, False, events)
            return events
        self._process(link, frames, now, events)
        return events

    def get_buffer(self, conn_id: int, sizehint: int = -1) -> memoryview:
        """A buffer to read the next bytes of *conn_id* into (``asyncio.BufferedProtocol.get_buffer``)."""
        link = self._links.get(conn_id)
        if link is None or self._terminated:
            return memoryview(bytearray(64 * 1024))
        return link.proto.get_buffer(sizehint)

    def buffer_updated(self, conn_id: int, nbytes: int, now: float) -> list[Event]:
        """*nbytes* were read into the last :meth:`get_buffer` of *conn_id*; events as for receive_data."""
        self._now = now
        events = self._take_deferred()
        link = self._links.get(conn_id)
        if link is None or self._terminated:
            return events
        self.stats.wire_bytes_received += nbytes
        try:
            frames = link.proto.buffer_updated(nbytes)
        except ChannelError as exc:
            self._terminate(exc, False, events)
            return events
        self._process(link, frames, now, events)
        return events

    def _process(self, link: _Link, frames: list[Frame], now: float, events: list[Event]) -> None:
        link.last_recv = now
        link.probe_at = float("inf")
        try:
            for f in frames:
                self._dispatch[f.type](self, link, f, events)
                if self._terminated or link.proto.closed:
                    break
        except ChannelError as exc:
            self._terminate(exc, False, events)
            return
        self._after_credit(events)
        if self._drain_deadline is not None:
            self._check_drained(events)

    def buffers_to_send(self, conn_id: int, max_bytes: int | None = None) -> list[Buffer]:
        """Pull the next bytes for connection *conn_id* as a list of buffers (for ``writelines``).

        Produces frames until about *max_bytes* (default
        ``config.send_batch``) are queued: the handshake, ACKs, PING/PONG,
        control frames (on the current control connection), then DATA
        frames round-robin over streams. Call again while the transport
        accepts more; [] means nothing to send now.
        """
        link = self._links.get(conn_id)
        if link is None:
            proto = self._closing.pop(conn_id, None)
            if proto is None:
                return []
            self.stats.wire_bytes_sent += proto.pending_output
            return proto.take()
        if link.ready and not self._terminated:
            self._fill(link, self.config.send_batch if max_bytes is None else max_bytes)
        self.stats.wire_bytes_sent += link.proto.pending_output
        return link.proto.take()

    def data_to_send(self, conn_id: int, max_bytes: int | None = None) -> bytes:
        """:meth:`buffers_to_send` joined into one bytes object."""
        return b"".join(self.buffers_to_send(conn_id, max_bytes))

    def set_send_backlog(self, conn_id: int, backlogged: bool) -> None:
        """Tell the compression policy whether *conn_id*'s send queue is backlogged (link is the bottleneck).

        Call it before pulling, e.g. ``transport.get_write_buffer_size() > 0``.
        """
        link = self._links.get(conn_id)
        if link is not None:
            link.backlogged = backlogged

    def connection_lost(self, conn_id: int, now: float) -> list[Event]:
        """The transport of *conn_id* closed or failed: requeue its in-flight data and control frames.

        A partial frame received on it is discarded. If it was the last
        connection, the grace period starts. Unknown ids are ignored.
        """
        self._now = now
        events = self._take_deferred()
        self._closing.pop(conn_id, None)
        link = self._links.get(conn_id)
        if link is not None and not self._terminated:
            self._drop_link(link, now, events)
        return events

    def _drop_link(self, link: _Link, now: float, events: list[Event], error: ChannelError | None = None,
                   notify: bool = False) -> None:
        self._links.pop(link.cid, None)
        link.proto.close()
        if link.proto.pending_output:
            self._closing[link.cid] = link.proto
        if link.ready:
            self._ready_count -= 1
            self.stats.connections = self._ready_count
            self.stats.connections_lost += 1
        for st, a, b in link.inflight:
            if st.requeue(a, b):
                self._schedule(st)
        link.inflight.clear()
        if self._ctl_link == link.cid:
            self._ctl_link = None
            self._ctl_unsent = self._ctl_acked
        if self.role == Role.CLIENT and not self._established and self._creator == link.cid:
            self._creator = None
            for other in self._links.values():
                if not other.hello_sent:
                    self._send_hello(other, join=False)
                    self._creator = other.cid
                    break
        if self._ready_count == 0 and self._no_link_since is None:
            self._no_link_since = now
        if notify:
            events.append(ConnectionClosed(link.cid, error))

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[Event]:
        """Advance the clock: handshake/keepalive timeouts, PINGs, grace expiry, ACK timer, stats.

        Call it at :meth:`next_deadline` (and whenever convenient), then
        flush every connection.
        """
        self._now = now
        events = self._take_deferred()
        if self._terminated:
            return events
        interval = self.config.ping_interval
        for link in list(self._links.values()):
            if not link.ready:
                if now >= link.proto.handshake_deadline:
                    self._drop_link(link, now, events, ChannelTimeout("handshake timed out"), notify=True)
            elif now - link.last_recv >= self.config.idle_timeout:
                self._drop_link(link, now, events, ChannelTimeout("keepalive timed out"), notify=True)
            elif now >= link.probe_at:
                self._drop_link(link, now, events,
                                ChannelTimeout("silent after the peer reconnected"), notify=True)
            elif now >= link.next_ping:
                self._send_ping(link, now)
                link.next_ping = now + interval
        if (self._ready_count == 0 and self._no_link_since is not None
                and now - self._no_link_since >= self.limits.grace):
            self._terminate(GraceExpired(f"no connection for {self.limits.grace:g} s"), False, events)
            return events
        if self._drain_deadline is not None:
            self._check_drained(events)
            if self._terminated:
                return events
        if self._drain_deadline is not None and now >= self._drain_deadline:
            n = len(self._ctl)
            ctl = f" and {n} control frame{'s' if n > 1 else ''}" if n else ""
            self._terminate(ChannelTimeout(f"graceful close timed out: {self._send_buffered} bytes{ctl} "
                                           "not acknowledged by the peer; closed anyway"), False, events)
            return events
        self.stats.recv_buffered = self._recv_total - self._recv_credit
        self.stats.send_buffered = self._send_buffered
        self.stats.sample(now)
        for st in self._streams.values():
            st.stats.sample(now)
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` should next be called (None: nothing pending)."""
        if self._deferred:
            return self._now
        if self._terminated:
            return None
        cands: list[float] = []
        if self._ack_due_at is not None and self._ready_count:
            cands.append(self._ack_due_at)
        for link in self._links.values():
            if not link.ready:
                cands.append(link.proto.handshake_deadline)
            else:
                cands.append(min(link.next_ping, link.last_recv + self.config.idle_timeout, link.probe_at))
        if self._ready_count == 0 and self._no_link_since is not None:
            cands.append(self._no_link_since + self.limits.grace)
        if self._drain_deadline is not None:
            cands.append(self._drain_deadline)
        return min(cands) if cands else None

    def ping(self, now: float) -> None:
        """Send a PING on every ready connection now (RTT comes back as :class:`PongReceived`)."""
        self._now = now
        for link in self._links.values():
            if link.ready:
                self._send_ping(link, now)

    def _send_ping(self, link: _Link, now: float) -> None:
        link.ping_seq = (link.ping_seq + 1) & MAX_U32
        link.pings[link.ping_seq] = now
        if len(link.pings) > 8:
            del link.pings[next(iter(link.pings))]
        link.proto.send_frame(FrameType.PING, aux=link.ping_seq)
        self.stats.pings_sent += 1

    # ------------------------------------------------------------------ session end

    def close(self, reason: str = "") -> None:
        """End the session at once: GOAWAY(NO_ERROR) on every connection (for an abort).

        Bytes not yet sent or acknowledged are dropped (:meth:`drain` waits
        for them) and live streams are reset; the :class:`SessionTerminated`
        event comes out of the next event-returning call. Flush and close
        every connection afterwards. No-op if already terminated.
        """
        if self._terminated:
            return
        self._terminate(None, False, self._deferred, reason=reason or "closed")

    def drain(self, now: float, timeout: float, reason: str = "") -> None:
        """Close gracefully: deliver what was handed to the session, then end it.

        From now on the session takes no new data: every stream of ours is
        half-closed (FIN after the bytes already queued, so ``send`` raises
        StreamClosedError), :meth:`open_stream` raises SessionClosedError and
        streams the peer opens are refused. Once the peer acknowledged every
        byte and control frame (:attr:`all_acknowledged`), the session sends
        a last ACK and GOAWAY(NO_ERROR, *reason*) and ends
        (:class:`SessionTerminated` without error). If that has not happened
        *timeout* seconds after *now*, :meth:`tick` ends it anyway with
        GOAWAY(TIMEOUT) and a :class:`~dataplane.channel.errors.ChannelTimeout`
        saying how much was not acknowledged. Receiving goes on meanwhile.
        A session not yet established ends at once. Calling it again only
        brings the deadline closer. Raises SessionClosedError if the session
        ended, ValueError for a negative *timeout*.
        """
        self._check_alive()
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0, got {timeout}")
        self._now = now
        deadline = now + timeout
        if self._drain_deadline is not None:
            self._drain_deadline = min(self._drain_deadline, deadline)
            return
        self._drain_deadline = deadline
        self._drain_reason = reason or "closed"
        if not self._established:
            self._terminate(None, False, self._deferred, reason=self._drain_reason)
            return
        for st in list(self._streams.values()):
            if st.phase in (StreamPhase.OPENING, StreamPhase.OPEN):
                self._queue_fin(st)
        self._check_drained(self._deferred)

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called (the session takes no new data)."""
        return self._drain_deadline is not None

    @property
    def all_acknowledged(self) -> bool:
        """True when the peer acknowledged every byte and control frame handed to the session: so far
        while it lives, at its end once it ended (False for bytes dropped by an abort)."""
        if self._terminated:
            return self._acked_at_end
        return self._send_buffered == 0 and not self._ctl

    def _check_drained(self, events: list[Event]) -> None:
        """While draining: end the session once everything is acknowledged."""
        if self._terminated or self._send_buffered or self._ctl:
            return
        for link in self._links.values():
            if link.ready:  # acknowledge what we received before saying goodbye (the peer may drain too)
                self._emit_acks(link, full=True)
        self._terminate(None, False, events, reason=self._drain_reason)

    def _terminate(self, error: ChannelError | None, remote: bool, events: list[Event],
                   reason: str = "") -> None:
        if self._terminated:
            return
        self._terminated = True
        self._acked_at_end = self._send_buffered == 0 and not self._ctl
        self.error = error
        code = error.code if error is not None else ErrorCode.NO_ERROR
        why = error.reason if error is not None else reason
        for link in self._links.values():
            if not remote and link.handshaken and link.proto.state == ConnState.OPEN:
                link.proto.send_frame(FrameType.GOAWAY, encode_text(why, MAX_REASON), aux=int(code))
            link.proto.close()
            if link.proto.pending_output:
                self._closing[link.cid] = link.proto
        self._links.clear()
        self._ready_count = 0
        self.stats.connections = 0
        for st in self._streams.values():
            if st.phase != StreamPhase.RESET:  # a reset stream was reported when it was reset
                events.append(StreamReset(st.sid, int(code), why, remote))
            st.freed()
        self._streams.clear()
        self._sendable.clear()
        self._ctl.clear()
        self._send_buffered = 0
        events.append(SessionTerminated(error, remote))

    def _check_alive(self) -> None:
        if self._terminated:
            raise SessionClosedError(f"session terminated: {self.error or 'closed'}")

    def _take_deferred(self) -> list[Event]:
        if not self._deferred:
            return []
        events = self._deferred
        self._deferred = []
        return events

    # ------------------------------------------------------------------ streams: local API

    def open_stream(self, name: str) -> int:
        """Open a stream named *name* (UTF-8, 1..1024 bytes); return its id.

        The peer application sees :class:`StreamOpened` in the order streams
        were opened; we get :class:`StreamAccepted` or :class:`StreamRefused`.
        The stream is not writable before it is accepted. Raises
        SessionClosedError (also while :meth:`drain` closes the session),
        LimitExceeded (the peer's ``max_streams`` or ids exhausted),
        ValueError for a bad name.
        """
        self._check_alive()
        if self.draining:
            raise SessionClosedError("the session is closing")
        raw = name.encode("utf-8")
        if not 1 <= len(raw) <= MAX_NAME:
            raise ValueError(f"stream name must be 1..{MAX_NAME} bytes of UTF-8")
        peer_max = self._peer.max_streams if self._peer is not None else self.limits.max_streams
        if self._table.local_open >= peer_max:
            raise LimitExceeded(f"peer allows {peer_max} concurrent streams")
        if len(self._ctl) >= 4 * (self.limits.max_streams + peer_max):
            raise LimitExceeded("too many unacknowledged control frames")
        st = self._table.open_local(name, self.limits.stream_window, self.config.compression)
        st.ack_limit = st.recv_limit()
        self._queue_control(FrameType.OPEN, st.sid, offset=st.ack_limit, payload=raw)
        return st.sid

    def accept_stream(self, stream_id: int) -> None:
        """Accept a stream announced by :class:`StreamOpened` (sends OPEN_OK with our receive credit).

        Raises StreamError if it is unknown or not awaiting an answer,
        StreamResetError if the peer already reset it, SessionClosedError.
        """
        st = self._get(stream_id)
        st.accepted()
        st.ack_limit = st.recv_limit()
        self.stats.streams_opened += 1
        self._queue_control(FrameType.OPEN_OK, stream_id, offset=st.ack_limit)
        if self.draining:
            self._queue_fin(st)  # it may receive, but we send nothing more
        if st.fin_offset is not None:
            self._check_end(st, self._deferred)

    def refuse_stream(self, stream_id: int, reason: str = "", code: int = ErrorCode.REFUSED) -> None:
        """Refuse a stream announced by :class:`StreamOpened` (OPEN_FAIL with *code* and *reason*).

        Raises StreamError if it is unknown or not awaiting an answer, SessionClosedError.
        """
        st = self._get(stream_id)
        st.refused()
        self._queue_control(FrameType.OPEN_FAIL, stream_id, aux=int(code),
                            payload=encode_text(reason, MAX_REASON))
        self._free(st, None)

    def _open_for_sending(self, stream_id: int) -> StreamState:
        """The stream, if bytes may still be queued on it; raises like :meth:`send`."""
        st = self._get(stream_id)
        st.check_sendable()
        return st

    def _mark_blocked(self, st: StreamState) -> None:
        """*st* has no credit left: it gets :class:`StreamWritable` when it has again."""
        st.blocked = True
        self._blocked.add(st.sid)

    def send(self, stream_id: int, data: Buffer) -> int:
        """Queue bytes on a stream; return how many were accepted (0..len(data)).

        Accepts only what the peer's stream and session credit and our replay
        budget allow: the rest must be offered again after
        :class:`StreamWritable`. Raises StreamResetError, StreamClosedError
        (after ``close_stream``), StreamError (unknown stream), SessionClosedError.
        """
        st = self._open_for_sending(stream_id)
        data = _as_bytes_view(data)
        total = len(data)
        n = min(self._capacity(st), total)
        if n < total:
            self._mark_blocked(st)
        if n <= 0:
            return 0
        st.sbuf.append(data if n == total else memoryview(data)[:n])
        self._written(st, n)
        return n

    def get_send_buffer(self, stream_id: int, sizehint: int = -1) -> memoryview:
        """Zero-copy :meth:`send`: a writable buffer for the stream's next bytes (e.g. for ``recv_into``).

        Write up to ``len(buffer)`` bytes into it, then call
        :meth:`send_buffer_updated` with the count before any other call on
        the stream. Its size is at most *sizehint* (if positive) and what
        :meth:`send` would accept now; an empty view means no credit (the
        stream then gets :class:`StreamWritable` like after a short ``send``).
        Raises like :meth:`send`.
        """
        st = self._open_for_sending(stream_id)
        cap = self._capacity(st)
        if cap <= 0:
            self._mark_blocked(st)
            return memoryview(b"")
        return st.sbuf.get_buffer(cap if sizehint <= 0 else min(cap, sizehint))

    def send_buffer_updated(self, stream_id: int, nbytes: int) -> int:
        """*nbytes* were written into the last :meth:`get_send_buffer` view: queue them like :meth:`send`.

        Returns the bytes :meth:`send` would still accept (0: the stream is
        blocked until :class:`StreamWritable`). Raises ValueError if
        *nbytes* exceeds that view, and like :meth:`send`.
        """
        st = self._open_for_sending(stream_id)
        st.sbuf.commit(nbytes)
        if nbytes > 0:
            self._written(st, nbytes)
        cap = self._capacity(st)
        if cap <= 0:
            self._mark_blocked(st)
        return cap

    def frame_ready(self, stream_id: int) -> bool:
        """True if the stream has at least one full DATA frame of bytes not sent yet.

        A driver that reads an application socket straight into the send
        buffer flushes at once then, so that frames are cut, checksummed and
        written while their bytes are still in the CPU cache (an event loop
        may otherwise read several MiB before its next flush). Raises
        StreamError for an unknown stream.
        """
        st = self._get(stream_id)
        return st.written - st.next_new >= self._frame_size()

    def _written(self, st: StreamState, n: int) -> None:
        st.written += n
        self._sent_total += n
        self._send_buffered += n
        if self._send_buffered > self.stats.send_buffered_peak:
            self.stats.send_buffered_peak = self._send_buffered
        self._schedule(st)

    def send_capacity(self, stream_id: int) -> int:
        """Bytes :meth:`send` would accept now. Raises StreamError for an unknown stream."""
        return self._capacity(self._get(stream_id))

    def writable(self, stream_id: int) -> bool:
        """True if :meth:`send` would accept at least one byte now."""
        return self.send_capacity(stream_id) > 0

    def _capacity(self, st: StreamState) -> int:
        credit = st.send_credit()
        if credit <= 0:
            return 0
        return max(0, min(credit,
                          self._peer_session_limit - self._sent_total,
                          self.limits.replay_buffer - self._send_buffered))

    def close_stream(self, stream_id: int) -> None:
        """Half-close: no more data from us (FIN at the current offset). Idempotent.

        Raises StreamResetError, StreamError (unknown, or not yet accepted by
        us), SessionClosedError.
        """
        st = self._get(stream_id)
        if st.begin_fin():
            self._queue_fin(st)

    def _queue_fin(self, st: StreamState) -> None:
        """Queue our FIN at the stream's current offset (unless it was queued already)."""
        if st.fin_seq or (st.fin_local is None and not st.begin_fin()):
            return
        st.fin_seq = self._queue_control(FrameType.FIN, st.sid, offset=st.written)
        self._fin_wait.add(st.sid)
        self._blocked.discard(st.sid)

    def reset_stream(self, stream_id: int, reason: str = "", code: int = ErrorCode.CANCEL) -> None:
        """Abort a stream in both directions (RESET with *code* and *reason*). No-op if already reset.

        Buffered data is dropped. Raises StreamError (unknown), SessionClosedError.
        """
        st = self._get(stream_id)
        if st.stopped:
            return
        self._local_reset(st, int(code), reason, None)
        self._maybe_free(st, self._deferred)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application wrote *n* delivered bytes of the stream to their destination: release credit.

        Ignored for streams already reset or freed. Raises ValueError if *n*
        is negative or more than was delivered and not yet consumed,
        StreamError for a stream id never opened, SessionClosedError.
        """
        self._check_alive()
        st = self._streams.get(stream_id)
        if st is None:
            if self._table.known_id(stream_id):
                return
            raise StreamError(f"unknown stream {stream_id}")
        if st.stopped:
            return
        st.consume(n)
        if n == 0:
            return
        self._recv_credit += n
        self._mark_dirty(st)
        if st.fin_offset is not None and st.consumed == st.fin_offset:
            self._maybe_free(st, self._deferred)

    def set_compression(self, stream_id: int, mode: str) -> None:
        """Set a stream's compression to ``"auto"``, ``"on"`` or ``"off"``.

        Raises ValueError for another mode, StreamError for an unknown stream.
        """
        if mode not in MODES:
            raise ValueError(f"compression mode must be one of {MODES}, got {mode!r}")
        st = self._get(stream_id)
        st.comp_mode = mode
        if st.comp is not None:
            st.comp.set_mode(mode)

    def _get(self, stream_id: int) -> StreamState:
        self._check_alive()
        st = self._streams.get(stream_id)
        if st is None:
            raise StreamError(f"unknown or closed stream {stream_id}")
        return st

    def _schedule(self, st: StreamState) -> None:
        if not st.queued and st.has_send_work():
            st.queued = True
            self._sendable.append(st)

    def _local_reset(self, st: StreamState, code: int, reason: str, events: list[Event] | None,
                     remote: bool = False) -> None:
        self._send_buffered -= st.reset()
        self._queue_control(FrameType.RESET, st.sid, aux=code, offset=st.written,
                            payload=encode_text(reason, MAX_REASON))
        self._blocked.discard(st.sid)
        self._fin_wait.discard(st.sid)
        self._dirty.discard(st.sid)
        self.stats.streams_reset += 1
        if st.fin_offset is not None:
            self._settle_recv(st, st.fin_offset)
        if events is not None:
            events.append(StreamReset(st.sid, code, reason, remote))

    def _settle_recv(self, st: StreamState, final: int) -> None:
        """Account a reset stream's receive half up to the peer's final size (frees session credit)."""
        sent, credit = st.settle(final)
        self._recv_total += sent
        self._recv_credit += credit
        self._check_session_credit()

    def _maybe_free(self, st: StreamState, events: list[Event] | None) -> None:
        if st.send_finished(self._ctl_acked) and st.recv_finished():
            self._free(st, events)

    def _free(self, st: StreamState, events: list[Event] | None) -> None:
        if not self._table.remove(st):
            return
        ended_normally = st.ended_normally()
        self._send_buffered -= st.freed()  # CLOSED: stops any scheduling
        self._blocked.discard(st.sid)
        self._fin_wait.discard(st.sid)
        self._dirty.discard(st.sid)
        self.stats.streams_closed += 1
        if ended_normally:
            # the receive half ended normally: the peer still needs our ACK of its last bytes
            assert st.fin_offset is not None
            self._table.remember_closed(st.sid, st.fin_offset)
            if st.ack_recv < st.fin_offset:
                self._final_ack(st.sid)
        if events is not None:
            events.append(StreamClosed(st.sid, st.stats))

    def _final_ack(self, sid: int) -> None:
        self._final_acks.add(sid)
        if self._ack_due_at is None:
            self._ack_due_at = self._now + self.config.ack_delay

    # ------------------------------------------------------------------ control channel

    def _queue_control(self, ftype: int, sid: int, *, aux: int = 0, offset: int = 0,
                       payload: bytes = b"") -> int:
        seq = self._ctl_next_seq
        if seq > MAX_U32:
            raise LimitExceeded("control sequence numbers exhausted")
        self._ctl_next_seq += 1
        self._ctl.append((seq, ftype, sid, aux, offset, payload))
        return seq

    def _send_control(self, link: _Link) -> None:
        ctl = self._ctl
        if not ctl or self._ctl_unsent >= self._ctl_next_seq:
            return
        if self._ctl_link is None:
            self._ctl_link = link.cid
        elif self._ctl_link != link.cid:
            return
        send = link.proto.send_frame
        for i in range(self._ctl_unsent - ctl[0][0], len(ctl)):
            seq, ftype, sid, aux, offset, payload = ctl[i]
            send(ftype, payload, stream_id=sid, aux=aux, offset=offset, seq=seq)
        self._ctl_unsent = self._ctl_next_seq

    # ------------------------------------------------------------------ acknowledgements

    def _mark_dirty(self, st: StreamState) -> None:
        self._dirty.add(st.sid)
        quarter = st.window >> 2
        if st.recv_next - st.ack_recv >= quarter or st.recv_limit() - st.ack_limit >= quarter:
            self._ack_urgent = True
        elif self._ack_due_at is None:
            self._ack_due_at = self._now + self.config.ack_delay
        self._check_session_credit()

    def _check_session_credit(self) -> None:
        if self._recv_credit + self._recv_window - self._ack_sess_sent >= self._recv_window >> 2:
            self._ack_urgent = True

    def _ack_wanted(self) -> bool:
        return self._ack_urgent or (self._ack_due_at is not None and self._now >= self._ack_due_at)

    def _emit_acks(self, link: _Link, full: bool) -> None:
        if full:
            chosen = [st for st in self._streams.values() if not st.stopped]
        else:
            chosen = [st for sid in self._dirty
                      if (st := self._streams.get(sid)) is not None and not st.stopped]
        self._dirty.clear()
        recent = self._table.recent_closed
        entries = [(sid, recent[sid], recent[sid]) for sid in self._final_acks if sid in recent]
        self._final_acks.clear()
        for st in chosen:
            lim = st.recv_limit()
            entries.append((st.sid, st.recv_next, lim))
            st.ack_recv = st.recv_next
            st.ack_limit = lim
        sess_limit = self._recv_credit + self._recv_window
        send = link.proto.send_frame
        for k in range(0, max(len(entries), 1), MAX_ACK_ENTRIES):
            send(FrameType.ACK, encode_ack_entries(entries[k:k + MAX_ACK_ENTRIES]),
                 aux=self._ctl_recv_next, offset=sess_limit)
        self._ack_sess_sent = sess_limit
        self._ack_urgent = False
        self._ack_due_at = None

    # ------------------------------------------------------------------ output

    def _fill(self, link: _Link, budget: int) -> None:
        if self._ack_wanted():
            self._emit_acks(link, full=False)
        self._send_control(link)
        proto = link.proto
        sendable = self._sendable
        while sendable and proto.pending_output < budget:
            st = sendable.popleft()
            st.queued = False
            if self._send_data_frame(link, st):
                self._schedule(st)

    def _frame_size(self) -> int:
        peer_max = self._peer.max_frame_payload if self._peer is not None else self.limits.max_frame_payload
        return min(self.config.frame_size, peer_max)

    def _send_data_frame(self, link: _Link, st: StreamState) -> bool:
        rng = st.next_range(self._frame_size())
        if rng is None:
            return False
        a, n, replay = rng
        data = st.sbuf.view(a, n)
        comp = st.comp
        if comp is None:
            comp = st.comp = StreamCompressor(self._encoder_codec, st.comp_mode)
        payload, codec_id, zero_pages = comp.encode(data, link.backlogged)
        size = link.proto.send_frame(FrameType.DATA, payload, flags=codec_id, stream_id=st.sid, aux=n,
                                     offset=a)
        inflight = link.inflight
        while inflight and inflight[0][2] <= inflight[0][0].acked:
            inflight.popleft()
        inflight.append((st, a, a + n))
        if len(inflight) > link.inflight_cap:
            link.inflight = deque(r for r in inflight if r[2] > r[0].acked and not r[0].stopped)
            link.inflight_cap = max(1024, 2 * len(link.inflight))
        ss = st.stats
        count_both(ss, self.stats, frames_sent=1, raw_data_sent=n, payload_sent=len(payload))
        ss.wire_bytes_sent += size  # the session counts its wire bytes per connection
        if codec_id:
            count_both(ss, self.stats, compressed_frames=1, zero_pages=zero_pages)
        if replay:
            count_both(ss, self.stats, replayed_bytes=n)
        else:
            count_both(ss, self.stats, bytes_sent=n)
        ss.compression = comp.state
        return True

    # ------------------------------------------------------------------ input: frame handlers

    def _on_welcome(self, link: _Link, f: Frame, events: list[Event]) -> None:
        params = HelloParams.unpack(f.payload)
        joined = bool(f.flags & FLAG_JOINED)
        if not self._established:
            if joined or link.cid != self._creator or not any(params.token) or not any(params.session_id):
                raise ProtocolError("WELCOME does not create the session we asked for")
            self.session_id = params.session_id
            self._token = params.token
            self._established = True
            self._set_peer(params)
            for other in self._links.values():
                if not other.hello_sent:
                    self._send_hello(other, join=True)
        elif not joined or params.session_id != self.session_id:
            raise ProtocolError("WELCOME for another session")
        link.handshaken = True
        self._emit_acks(link, full=True)

    def _on_refuse(self, link: _Link, f: Frame, events: list[Event]) -> None:
        err = error_from_code(f.aux, decode_text(f.payload))
        if isinstance(err, LimitExceeded) and (self._established or link.cid != self._creator):
            # a join or an extra stripe the listener has no room for: only this connection ends
            self._drop_link(link, self._now, events, err, notify=True)
            return
        self._terminate(err, True, events)

    def _on_ack(self, link: _Link, f: Frame, events: list[Event]) -> None:
        cack = f.aux
        if cack > self._ctl_next_seq:
            raise ProtocolError(f"ACK of control frame {cack - 1} that was never sent")
        if cack > self._ctl_acked:
            self._ctl_acked = cack
            ctl = self._ctl
            k = 0
            while k < len(ctl) and ctl[k][0] < cack:
                k += 1
            del ctl[:k]
            if self._ctl_unsent < cack:
                self._ctl_unsent = cack
        if f.offset > self._peer_session_limit:
            self._peer_session_limit = f.offset
        for sid, recv, limit in decode_ack_entries(f.payload):
            st = self._streams.get(sid)
            if st is None:
                if self._table.never_opened_by_us(sid):
                    raise ProtocolError(f"ACK for stream {sid} that we never opened")
                continue  # closed, or a peer stream whose OPEN we have not processed yet
            if st.stopped:
                continue
            self._send_buffered -= st.acknowledged(recv, limit)
        if not link.ready:
            self._link_ready(link, events)
        if self._fin_wait:
            for sid in list(self._fin_wait):
                st = self._streams.get(sid)
                if st is not None:
                    self._maybe_free(st, events)

    def _link_ready(self, link: _Link, events: list[Event]) -> None:
        if not link.handshaken:
            raise ProtocolError("ACK before the handshake")
        link.ready = True
        link.proto.handshake_deadline = float("inf")
        link.next_ping = self._now + self.config.ping_interval
        self._ready_count += 1
        self._no_link_since = None
        if self.stats.connections_lost:
            self.stats.reconnects += 1
        self.stats.connections = self._ready_count
        assert self.session_id is not None
        events.append(HandshakeComplete(link.cid, self.session_id, link.proto.version or 0, link.joined))
        if link.joined:
            # A join is often a reconnect: the connection that carried control frames may be half-open.
            # Move control to the new connection (resending what is unacknowledged is safe: the peer
            # drops duplicates) and make every other connection prove it is alive.
            self._ctl_link = link.cid
            self._ctl_unsent = self._ctl_acked
            srtt = self.stats.srtt or 0.0
            deadline = self._now + max(self.config.probe_timeout, 4 * srtt)
            for other in self._links.values():
                if other is not link and other.ready:
                    other.probe_at = min(other.probe_at, deadline)
                    self._send_ping(other, self._now)

    def _after_credit(self, events: list[Event]) -> None:
        if not self._blocked:
            return
        for sid in list(self._blocked):
            st = self._streams.get(sid)
            if st is None or st.stopped or st.fin_local is not None:
                self._blocked.discard(sid)
            elif self._capacity(st) > 0:
                self._blocked.discard(sid)
                st.blocked = False
                events.append(StreamWritable(sid))

    def _on_ping(self, link: _Link, f: Frame, events: list[Event]) -> None:
        if link.proto.pending_output < (1 << 20):  # never let a PING flood grow our output
            link.proto.send_frame(FrameType.PONG, aux=f.aux, offset=f.offset)

    def _on_pong(self, link: _Link, f: Frame, events: list[Event]) -> None:
        sent = link.pings.pop(f.aux, None)
        if sent is None:
            return
        rtt = max(0.0, self._now - sent)
        self.stats.pongs_received += 1
        self.stats.add_rtt(rtt)
        events.append(PongReceived(link.cid, rtt))

    def _on_goaway(self, link: _Link, f: Frame, events: list[Event]) -> None:
        err = None if f.aux == ErrorCode.NO_ERROR else error_from_code(f.aux, decode_text(f.payload))
        self._terminate(err, True, events)

    def _on_data(self, link: _Link, f: Frame, events: list[Event]) -> None:
        if not link.ready:
            raise ProtocolError("DATA before the handshake completed")
        sid = f.stream_id
        st = self._table.for_frame(sid, "DATA")
        if st is None:
            if sid in self._table.recent_closed:
                self._final_ack(sid)  # a replay of bytes we already had: acknowledge them again
            return
        if st.recv_settled:
            return
        n = f.aux
        off = f.offset
        end = off + n
        ss = st.stats
        ss.frames_received += 1
        ss.wire_bytes_received += HEADER_SIZE + len(f.payload)
        self.stats.frames_received += 1
        st.check_data(end)
        grown = st.advance_hw(end)
        if grown:
            self._recv_total += grown
            if self._recv_total > self._recv_credit + self._recv_window:
                raise FlowControlError("session credit exceeded")
            buffered = self._recv_total - self._recv_credit
            if buffered > self.stats.recv_buffered_peak:
                self.stats.recv_buffered_peak = buffered
        if st.stopped:
            return
        if end <= st.recv_next:
            count_both(ss, self.stats, duplicate_bytes=n)
            return
        codec_id = f.flags & CODEC_MASK
        if codec_id:
            codec = self._decoders.get(codec_id)
            if codec is None:
                raise ProtocolError(f"DATA compressed with codec {codec_id}, which we did not advertise")
            data: Buffer = codec.decode(f.payload, n)
        else:
            data = f.payload
        ready, dup = st.take_data(off, data)
        if dup:
            count_both(ss, self.stats, duplicate_bytes=dup)
        hold = st.phase == StreamPhase.OPENING  # our OPEN is not answered yet: report after StreamAccepted
        for o, d in ready:
            count_both(ss, self.stats, bytes_received=len(d))
            if hold:
                st.held.append((o, d))
            else:
                events.append(DataReceived(sid, o, d))
            self._mark_dirty(st)
        if st.fin_offset is not None:
            self._check_end(st, events)

    def _check_end(self, st: StreamState, events: list[Event]) -> None:
        if st.end_reached():
            events.append(StreamEnded(st.sid))
            if st.consumed == st.fin_offset:
                self._maybe_free(st, events)

    def _on_sequenced(self, link: _Link, f: Frame, events: list[Event]) -> None:
        if not link.ready:
            raise ProtocolError(f"{FrameType(f.type).name} before the handshake completed")
        if f.seq < self._ctl_recv_next:
            return  # a replay of a control frame we already processed
        if f.seq > self._ctl_recv_next:
            raise ProtocolError(f"control frame {f.seq} out of sequence (expected {self._ctl_recv_next})")
        self._ctl_recv_next += 1
        if self._ack_due_at is None:
            self._ack_due_at = self._now + self.config.ack_delay
        self._control_handlers[f.type](self, f, events)

    def _on_open(self, f: Frame, events: list[Event]) -> None:
        sid = f.stream_id
        name = decode_text(f.payload)
        closing = self.draining
        st = self._table.open_remote(sid, name, self.limits.stream_window, self.config.compression,
                                     0 if closing else self.limits.max_streams)
        if st is None:
            code, reason = ((ErrorCode.REFUSED, "the session is closing") if closing
                            else (ErrorCode.LIMIT, f"too many streams (max {self.limits.max_streams})"))
            self._queue_control(FrameType.OPEN_FAIL, sid, aux=code, payload=encode_text(reason, MAX_REASON))
            return
        st.raise_peer_limit(f.offset)
        events.append(StreamOpened(sid, name))

    def _on_open_ok(self, f: Frame, events: list[Event]) -> None:
        st = self._table.for_frame(f.stream_id, "OPEN_OK")
        if st is None or st.phase == StreamPhase.RESET:
            return
        held = st.open_confirmed(f.offset)
        self.stats.streams_opened += 1
        events.append(StreamAccepted(st.sid))
        for off, data in held:
            events.append(DataReceived(st.sid, off, data))
        if st.blocked:
            self._blocked.add(st.sid)

    def _on_open_fail(self, f: Frame, events: list[Event]) -> None:
        st = self._table.for_frame(f.stream_id, "OPEN_FAIL")
        if st is None:
            return
        notify = st.open_failed()
        self._free(st, None)
        if notify:
            events.append(StreamRefused(st.sid, f.aux, decode_text(f.payload)))

    def _on_fin(self, f: Frame, events: list[Event]) -> None:
        st = self._table.for_frame(f.stream_id, "FIN")
        if st is None or st.recv_settled:
            return
        final = f.offset
        st.fin_received(final)
        if st.stopped:
            self._settle_recv(st, final)
            self._maybe_free(st, events)
            return
        self._check_end(st, events)

    def _on_reset(self, f: Frame, events: list[Event]) -> None:
        st = self._table.for_frame(f.stream_id, "RESET")
        if st is None:
            return
        final = f.offset
        st.check_reset_size(final)
        if not st.stopped:
            self._local_reset(st, f.aux, decode_text(f.payload), events, remote=True)
        self._settle_recv(st, final)
        self._maybe_free(st, events)

    _dispatch: dict[int, Callable[[Session, _Link, Frame, list[Event]], None]] = {
        FrameType.DATA: _on_data,
        FrameType.ACK: _on_ack,
        FrameType.PING: _on_ping,
        FrameType.PONG: _on_pong,
        FrameType.GOAWAY: _on_goaway,
        FrameType.WELCOME: _on_welcome,
        FrameType.REFUSE: _on_refuse,
        FrameType.OPEN: _on_sequenced,
        FrameType.OPEN_OK: _on_sequenced,
        FrameType.OPEN_FAIL: _on_sequenced,
        FrameType.FIN: _on_sequenced,
        FrameType.RESET: _on_sequenced,
    }
    _control_handlers: dict[int, Callable[[Session, Frame, list[Event]], None]] = {
        FrameType.OPEN: _on_open,
        FrameType.OPEN_OK: _on_open_ok,
        FrameType.OPEN_FAIL: _on_open_fail,
        FrameType.FIN: _on_fin,
        FrameType.RESET: _on_reset,
    }


def _same_identity(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# ====================================================================== server side and handles


class ConnectionHandle:
    """One transport connection as the driver sees it; methods forward to the session (or acceptor).

    Obtained from :meth:`Session.connect` (client) or :meth:`Acceptor.accept`
    (server). ``session`` is None on a server connection until its HELLO is
    accepted.
    """

    __slots__ = ("_session", "_cid", "_acceptor", "_proto", "_closed_pending")

    def __init__(self, session: Session | None, cid: int | None, acceptor: Acceptor | None = None,
                 proto: Connection | None = None) -> None:
        self._session = session
        self._cid = cid
        self._acceptor = acceptor
        self._proto = proto
        self._closed_pending = False

    def _bind(self, session: Session, cid: int) -> None:
        self._session = session
        self._cid = cid
        self._proto = None

    @property
    def session(self) -> Session | None:
        """The session this connection belongs to (None while a server handshake is pending)."""
        return self._session

    @property
    def conn_id(self) -> int | None:
        """The connection id within its session (None while pending)."""
        return self._cid

    @property
    def closed(self) -> bool:
        """True when the core gave up this connection: flush ``data_to_send()`` and close the transport."""
        if self._session is None:
            return self._proto is None or self._proto.closed
        return self._session.terminated or self._cid not in self._session._links

    @property
    def handshake_deadline(self) -> float:
        """When a still-pending server handshake times out (``inf`` once bound)."""
        return self._proto.handshake_deadline if self._session is None and self._proto else float("inf")

    def receive_data(self, data: Buffer, now: float) -> list[Event]:
        """Feed bytes read from the transport; return events (see :meth:`Session.receive_data`)."""
        if self._session is not None:
            assert self._cid is not None
            return self._session.receive_data(self._cid, data, now)
        proto = self._proto
        if proto is None or proto.closed:
            return []
        try:
            frames = proto.receive(data)
        except ChannelError as exc:
            proto.close()
            return [ConnectionClosed(None, exc)]
        assert self._acceptor is not None
        return self._acceptor._handshake(self, frames, now)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Buffer for the next read (``asyncio.BufferedProtocol``)."""
        if self._session is not None:
            assert self._cid is not None
            return self._session.get_buffer(self._cid, sizehint)
        if self._proto is None or self._proto.closed:
            return memoryview(bytearray(64 * 1024))
        return self._proto.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int, now: float) -> list[Event]:
        """*nbytes* were read into the last :meth:`get_buffer`; return events."""
        if self._session is not None:
            assert self._cid is not None
            return self._session.buffer_updated(self._cid, nbytes, now)
        proto = self._proto
        if proto is None or proto.closed:
            return []
        try:
            frames = proto.buffer_updated(nbytes)
        except ChannelError as exc:
            proto.close()
            return [ConnectionClosed(None, exc)]
        assert self._acceptor is not None
        return self._acceptor._handshake(self, frames, now)

    def buffers_to_send(self, max_bytes: int | None = None) -> list[Buffer]:
        """Next bytes to write, as buffers (see :meth:`Session.buffers_to_send`)."""
        if self._session is not None:
            assert self._cid is not None
            return self._session.buffers_to_send(self._cid, max_bytes)
        return self._proto.take() if self._proto is not None else []

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Next bytes to write, joined."""
        return b"".join(self.buffers_to_send(max_bytes))

    def set_send_backlog(self, backlogged: bool) -> None:
        """Report whether the transport's send queue is backlogged (input to adaptive compression)."""
        if self._session is not None and self._cid is not None:
            self._session.set_send_backlog(self._cid, backlogged)

    def connection_lost(self, now: float) -> list[Event]:
        """The transport closed; return events (see :meth:`Session.connection_lost`)."""
        if self._session is not None:
            assert self._cid is not None
            return self._session.connection_lost(self._cid, now)
        if self._proto is not None:
            self._proto.close()
        return []

    def tick(self, now: float) -> list[Event]:
        """Pending server handshake only: close it once ``handshake_deadline`` passed.

        Bound connections are timed by :meth:`Session.tick`.
        """
        proto = self._proto
        pending = self._session is None and proto is not None and not proto.closed
        if pending and proto is not None and now >= proto.handshake_deadline:
            proto.close()
            return [ConnectionClosed(None, ChannelTimeout("handshake timed out"))]
        return []
