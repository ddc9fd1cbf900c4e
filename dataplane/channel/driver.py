"""asyncio driver of the channel: sockets, TLS, timers, pacing and reconnects around the sans-IO core.

The core (:mod:`dataplane.channel.session`) does everything that decides
anything; this module only moves bytes and time in and out of it:

* every TCP/TLS connection is a :class:`asyncio.BufferedProtocol` whose
  ``get_buffer``/``buffer_updated`` go straight to the core's decoder;
* after every batch of events or local API call the session's
  connections are *flushed*: while the transport is not paused, pull
  ``buffers_to_send`` and ``writelines`` them, paced by a
  :class:`~dataplane.channel.shaping.TokenBucket` when a bandwidth cap is
  set; the flush is coalesced to once per event-loop iteration;
* one timer per session fires at ``session.next_deadline()`` and calls
  ``tick``;
* :class:`ChannelClient` keeps N connections up (``connections``), redialling
  each lost one with exponential backoff until the session's grace period
  runs out (the core then resets every stream and reports
  :class:`~dataplane.channel.errors.GraceExpired`);
* :class:`ChannelServer` listens, hands each connection to an
  :class:`~dataplane.channel.session.Acceptor` and drives every session that
  results.

Applications see a session's streams as :class:`ChannelStream` objects and
receive their events through a :class:`StreamHandler`. See
``docs/channel.md`` for the architecture, the reconnect and grace semantics
and the statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from dataplane.aio import first_done
from dataplane.channel.addr import format_hostport
from dataplane.channel.errors import (
    AuthError,
    ChannelError,
    ConnectError,
    ErrorCode,
    GraceExpired,
    LimitExceeded,
    SessionClosedError,
    StateError,
)
from dataplane.channel.events import (
    ConnectionClosed,
    DataReceived,
    Event,
    HandshakeComplete,
    SessionTerminated,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    StreamWritable,
)
from dataplane.channel.frames import Buffer
from dataplane.channel.session import Acceptor, ConnectionHandle, Limits, Session, SessionConfig
from dataplane.channel.shaping import TokenBucket
from dataplane.channel.stats import StreamStats
from dataplane.channel.tls import (
    TLSConfig,
    client_context,
    describe_tls_error,
    peer_fingerprint,
    peer_identity,
    server_context,
    warn_plaintext,
)
from dataplane.units import format_rate

__all__ = [
    "ChannelClient",
    "ChannelServer",
    "ChannelStream",
    "ConnectError",
    "StreamHandler",
    "lost_reason",
    "os_error_text",
    "tune_socket",
]

log = logging.getLogger("dataplane.channel")

#: Seconds after which a silently cut connection is declared dead by the kernel (TCP_USER_TIMEOUT,
#: and keepalive probes on an idle connection).
LIVENESS_TIMEOUT = 5.0
#: Transport write-buffer watermarks of channel connections (bytes).
WRITE_HIGH = 4 << 20
WRITE_LOW = 1 << 20
#: The link counts as the bottleneck (adaptive compression on) while bytes wait in the transport,
#: while at least this many wait unsent in the kernel's send queue, while TCP has a full congestion
#: window in flight, or while the connection moved less than COMPRESSOR_RATE over the last
#: RATE_WINDOW seconds (bytes acknowledged by the peer): then the network, not us, sets the pace,
#: and compressing costs no time.
BACKLOG_BYTES = 64 << 10
#: Bytes/s the page codec compresses text-like data at on one core of a modest machine (LZ4 at
#: acceleration 1 measured 365-420 MB/s on the 2-core development VM): a link slower than this
#: cannot outrun the compressor.
COMPRESSOR_RATE = 300e6
RATE_WINDOW = 0.2
#: ``struct tcp_info`` (linux/tcp.h): the prefix we read and the offsets of the fields we use.
_TCP_INFO_LEN = 152
# struct tcp_info (<linux/tcp.h>): tcpi_unacked at 24, tcpi_snd_cwnd at 80, tcpi_bytes_acked at 120,
# tcpi_notsent_bytes at 144
_TCPI_FIELDS = struct.Struct("<24xI52xI36xQ16xI")
#: Bytes pulled from the core per ``buffers_to_send`` call.
PULL_BATCH = 1 << 20
#: Smallest pull while paced (a frame is cut anyway, the bucket absorbs the difference).
PACED_MIN_PULL = 64 << 10
#: A transport we closed is aborted if it has not finished flushing after this many seconds.
CLOSE_LINGER = 5.0
#: The same for a connection closed because of an error whose last frame is still queued.
ERROR_LINGER = 1.0
#: Recently ended sessions / closed streams kept for the statistics.
KEEP_ENDED_SESSIONS = 16
KEEP_CLOSED_STREAMS = 64


def tune_socket(sock: Any, liveness_timeout: float = LIVENESS_TIMEOUT) -> None:
    """Set TCP_NODELAY, keepalive and TCP_USER_TIMEOUT on a channel socket; never raises.

    A connection whose peer vanished silently (a cut link: no RST, no FIN)
    is then reported dead by the kernel after about *liveness_timeout*
    seconds: unacknowledged data times out (TCP_USER_TIMEOUT) and an idle
    connection is probed (keepalive after ``liveness_timeout / 3`` idle
    seconds, every second).
    """
    opts = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", 4), max(1, int(liveness_timeout / 3))),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", 5), 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", 6), max(1, int(liveness_timeout))),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), int(liveness_timeout * 1000)),
    ]
    for level, opt, value in opts:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(level, opt, value)


def _peer_label(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_hostport(str(peer[0]), int(peer[1]))
    return str(peer) if peer else "?"


def lost_reason(exc: BaseException | None) -> str:
    """Words for why an established connection ended (the ``exc`` of ``connection_lost``). Never raises."""
    if exc is None:
        return "closed by the peer"
    if isinstance(exc, ssl.SSLError):
        return describe_tls_error(exc)
    if isinstance(exc, OSError):
        if exc.errno == errno.ETIMEDOUT:
            return "the peer stopped answering (timed out: is the link cut?)"
        if exc.errno == errno.ECONNRESET:
            return "reset by the peer"
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"the peer is unreachable ({exc.strerror})"
        return os_error_text(exc)
    return f"{type(exc).__name__}: {exc}"


def os_error_text(exc: OSError) -> str:
    """The system's words for an OSError (``Address already in use``), else its message. Never raises."""
    if exc.errno:
        with contextlib.suppress(ValueError, OverflowError):
            return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _describe(error: ChannelError | None) -> str:
    if error is None:
        return "closed in an orderly way"
    text = error.reason or type(error).__name__
    return f"{text} ({error.code.name})"


# =============================================================================== streams


class StreamHandler:
    """Callbacks of one stream; subclass and override what you need (the defaults do nothing).

    Called from the event loop, in the order the core reports events. A
    callback may call any :class:`ChannelStream` method. An exception in a
    callback is logged and resets the stream.
    """

    def on_accepted(self, stream: ChannelStream) -> None:
        """Our stream was accepted by the peer: it is writable now."""

    def on_refused(self, stream: ChannelStream, code: int, reason: str) -> None:
        """Our stream was refused by the peer (or could not be opened); it is gone."""

    def on_data(self, stream: ChannelStream, data: Buffer) -> None:
        """Bytes of the stream, in order; call ``stream.consumed(len(data))`` once they are delivered."""

    def on_eof(self, stream: ChannelStream) -> None:
        """The peer half-closed the stream: no more data will come."""

    def on_writable(self, stream: ChannelStream) -> None:
        """Send credit is back after a short :meth:`ChannelStream.send`."""

    def on_reset(self, stream: ChannelStream, code: int, reason: str, remote: bool) -> None:
        """The stream was reset (by the peer, by us, or because the session ended): it is dead."""

    def on_closed(self, stream: ChannelStream, stats: StreamStats) -> None:
        """Both directions finished normally and the stream's state is freed."""


class ChannelStream:
    """One stream of a session as the application sees it.

    ``state``: ``queued`` (waiting for its turn to be opened: streams are
    opened one at a time, in order), ``opening`` (OPEN sent), ``pending``
    (opened by the peer, awaiting :meth:`accept` / :meth:`refuse`),
    ``open``, ``refused``, ``reset``, ``closed``. Methods raise the core's
    errors: :class:`~dataplane.channel.errors.StreamResetError`,
    :class:`~dataplane.channel.errors.StreamClosedError`,
    :class:`~dataplane.channel.errors.StreamError` (wrong state or unknown),
    :class:`~dataplane.channel.errors.SessionClosedError`.
    """

    __slots__ = ("_drv", "sid", "name", "local", "state", "handler", "core_stats")

    def __init__(self, drv: _SessionDriver, sid: int, name: str, local: bool) -> None:
        self._drv = drv
        self.sid = sid
        self.name = name
        self.local = local
        self.state = "queued" if local else "pending"
        self.handler: StreamHandler | None = None
        self.core_stats: StreamStats | None = None  # the core's live counters (kept after the end)

    def __repr__(self) -> str:
        return f"<ChannelStream {self.sid} {self.name!r} {self.state}>"

    @property
    def session_id(self) -> str:
        """Hex id of the session (empty before it is established)."""
        return self._drv.session_hex

    def accept(self, handler: StreamHandler) -> None:
        """Accept a stream the peer opened; its events go to *handler* from now on."""
        self.handler = handler
        self._drv.session.accept_stream(self.sid)
        self.state = "open"
        self._drv.kick()

    def refuse(self, reason: str, code: int = ErrorCode.REFUSED) -> None:
        """Refuse a stream the peer opened (OPEN_FAIL with *code* and *reason*)."""
        self._drv.session.refuse_stream(self.sid, reason, code)
        self.state = "refused"
        self._drv.forget(self)
        self._drv.kick()

    def send(self, data: Buffer) -> int:
        """Queue bytes; return how many were accepted (the rest after ``on_writable``)."""
        n = self._drv.session.send(self.sid, data)
        if n:
            self._drv.kick()
        return n

    def get_send_buffer(self, sizehint: int = -1) -> memoryview:
        """Zero-copy :meth:`send`: a writable buffer for the next bytes (read a socket straight into it).

        Follow with :meth:`send_buffer_updated`. Empty when there is no credit
        (``on_writable`` follows).
        """
        return self._drv.session.get_send_buffer(self.sid, sizehint)

    def send_buffer_updated(self, n: int) -> int:
        """*n* bytes were written into the last :meth:`get_send_buffer`: queue them; return the credit.

        When a full frame of bytes waits, every connection is flushed before
        this returns (what is pending is framed, a partial tail included, and
        written), so a handler calling it must not rely on the write happening
        later.
        """
        session = self._drv.session
        left = session.send_buffer_updated(self.sid, n)
        if n:
            if session.frame_ready(self.sid):
                # Cut and write the frame now, while its bytes are in the cache: the event loop may
                # read the application socket many times before a scheduled flush (the entry end's
                # checksum went from 11-13 % to 8 % of its CPU on loopback).
                self._drv.service()
            else:
                self._drv.kick()
        return left

    def consumed(self, n: int) -> None:
        """*n* received bytes reached their destination: give the peer that much credit back."""
        if n:
            self._drv.session.consumed(self.sid, n)
            self._drv.kick()

    def close(self) -> None:
        """Half-close: we send no more (FIN after the queued bytes)."""
        self._drv.session.close_stream(self.sid)
        self._drv.kick()

    def reset(self, reason: str = "", code: int = ErrorCode.CANCEL) -> None:
        """Abort the stream in both directions (a queued or finished one is just dropped). Never raises."""
        drv = self._drv
        if self.state == "queued":
            drv.unqueue(self)
            self.state = "reset"
            return
        if self.state in ("refused", "reset", "closed") or drv.session.terminated:
            return
        with contextlib.suppress(ChannelError):
            drv.session.reset_stream(self.sid, reason, code)
        self.state = "reset"
        drv.kick()

    def set_compression(self, mode: str) -> None:
        """``auto``, ``on`` or ``off`` for this stream's sending half. Raises ValueError for another mode."""
        self._drv.session.set_compression(self.sid, mode)

    def stats(self) -> dict[str, object]:
        """The stream's counters (see :class:`~dataplane.channel.stats.StreamStats`), state and direction."""
        cs = self.core_stats
        base: dict[str, object] = (cs.as_dict() if cs is not None
                                   else {"stream_id": self.sid, "name": self.name})
        base["state"] = self.state
        base["opened_locally"] = self.local
        return base


# =============================================================================== connections


class _ChannelConnection(asyncio.BufferedProtocol):
    """One TCP/TLS connection of a session (base of the client and server flavours)."""

    def __init__(self, tls: TLSConfig | None, liveness_timeout: float) -> None:
        self.tls = tls
        self.liveness_timeout = liveness_timeout
        self.transport: asyncio.Transport | None = None
        self.handle: ConnectionHandle | None = None
        self.driver: _SessionDriver | None = None
        self.peer = "?"
        self.identity = ""
        self.paused = False
        self.ready = False
        self.got_bytes = False
        self.closing = False
        self.failed = False  # closed because of an error: stop reading, abort soon
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._sock: Any = None  # the transport's TCP socket, for the kernel's send-queue depth (TCP_INFO)
        self._rate: float | None = None  # bytes/s the peer acknowledged over the last RATE_WINDOW
        self._rate_at: float | None = None
        self._rate_acked = 0
        self._sink = memoryview(bytearray(64 * 1024))
        self._abort_handle: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- asyncio callbacks

    def _setup(self, transport: asyncio.BaseTransport) -> bool:
        """Common connection_made work; False if the peer identity cannot be read (transport aborted)."""
        tr = self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        self.peer = _peer_label(tr)
        sock = tr.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock, self.liveness_timeout)
            self._sock = sock
        tr.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        if self.tls is not None:
            try:
                self.identity = peer_fingerprint(tr)
            except (ssl.SSLError, TypeError) as exc:
                log.warning("connection from %s has no usable TLS identity: %s", self.peer, exc)
                tr.abort()
                return False
        return True

    def get_buffer(self, sizehint: int) -> memoryview:
        h = self.handle
        if h is None or self.closing:
            return self._sink
        return h.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        h = self.handle
        if h is None or self.closing or nbytes <= 0:
            return
        self.got_bytes = True
        self.on_events(h.buffer_updated(nbytes, time.monotonic()))

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.driver is not None:
            self.driver.kick()
        else:
            self.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        if self._abort_handle is not None:
            self._abort_handle.cancel()
        h = self.handle
        drv = self.driver
        if h is not None:
            events = h.connection_lost(time.monotonic())
            if drv is not None:
                drv.remove_connection(self)
                drv.handle_events(events)
                drv.kick()
        if not self.lost.done():
            self.lost.set_result(exc)

    # ---------------------------------------------------------------- driving

    def on_events(self, events: list[Event]) -> None:
        drv = self.driver
        if drv is not None:
            drv.handle_events(events)
            drv.kick()
        else:
            self.flush()

    def flush(self) -> None:
        """Write what the core has for this connection while the transport takes it (paced)."""
        tr = self.transport
        h = self.handle
        if tr is None or h is None or self.closing or tr.is_closing():
            return
        drv = self.driver
        bucket = drv.bucket if drv is not None else None
        now = time.monotonic()
        while not self.paused or h.closed:
            budget = PULL_BATCH
            if bucket is not None and bucket.rate:
                avail = bucket.available(now)
                if avail <= 0:
                    budget = 0  # in debt: ACKs and control frames only
                    assert drv is not None
                    drv.pace_after(-avail / bucket.rate)
                else:
                    budget = min(budget, max(int(avail), PACED_MIN_PULL))
            h.set_send_backlog(self._backlogged(tr))
            bufs = h.buffers_to_send(budget)
            if not bufs:
                break
            tr.writelines(bufs)
            if bucket is not None and bucket.rate:
                bucket.take(sum(map(len, bufs)), now)
            if budget == 0 or h.closed:
                break
        if h.closed:
            self.close_transport()

    def _backlogged(self, tr: asyncio.Transport) -> bool:
        """Whether the network sets our pace: output queued in the transport, BACKLOG_BYTES unsent in
        the kernel, a full congestion window in flight, or a delivery rate the compressor can keep up
        with (``TCP_INFO``)."""
        queued = tr.get_write_buffer_size()
        if queued > 0 or self._sock is None:
            return queued > 0
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except (OSError, ValueError):
            self._sock = None  # not a TCP socket (or closed): the transport's queue alone decides
            return False
        if len(info) < _TCP_INFO_LEN:
            self._sock = None
            return False
        unacked, cwnd, acked, notsent = _TCPI_FIELDS.unpack_from(info)
        now = time.monotonic()
        if self._rate_at is None:
            self._rate_at, self._rate_acked = now, acked
        elif now - self._rate_at >= RATE_WINDOW:
            self._rate = (acked - self._rate_acked) / (now - self._rate_at)
            self._rate_at, self._rate_acked = now, acked
        return (notsent >= BACKLOG_BYTES or (cwnd > 0 and unacked >= cwnd)
                or (self._rate is not None and self._rate < COMPRESSOR_RATE))

    def close_transport(self) -> None:
        """Close after the queued output is flushed; abort if that takes longer than the linger time.

        A connection that failed (:attr:`failed`: bad input, a refusal) is aborted as soon as its last
        frame (GOAWAY, REFUSE) is in the kernel: a graceful TLS shutdown would go on reading, and
        discarding, whatever a hostile peer keeps sending.
        """
        tr = self.transport
        if tr is None or self.closing:
            return
        self.closing = True
        if self.failed and tr.get_write_buffer_size() == 0:
            tr.abort()
            return
        tr.close()
        linger = ERROR_LINGER if self.failed else CLOSE_LINGER
        self._abort_handle = asyncio.get_running_loop().call_later(linger, tr.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.lost.done():
            self.transport.abort()


class _ServerConnection(_ChannelConnection):
    def __init__(self, server: ChannelServer) -> None:
        super().__init__(server.tls, server.liveness_timeout)
        self.server = server
        self._hs_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._setup(transport):
            return
        srv = self.server
        if srv.closing:
            cast(asyncio.Transport, transport).abort()
            return
        srv.pending.add(self)
        now = time.monotonic()
        self.handle = srv.acceptor.accept(self.identity, now)
        loop = asyncio.get_running_loop()
        self._hs_timer = loop.call_later(max(0.0, self.handle.handshake_deadline - now), self._hs_tick)
        log.debug("connection from %s accepted", self.peer)
        self.flush()

    def _hs_tick(self) -> None:
        self._hs_timer = None
        h = self.handle
        if h is None or self.driver is not None or self.closing:
            return
        self.on_events(h.tick(max(time.monotonic(), h.handshake_deadline)))

    def on_events(self, events: list[Event]) -> None:
        h = self.handle
        if self.driver is None and h is not None and h.session is not None:
            if self._hs_timer is not None:
                self._hs_timer.cancel()
                self._hs_timer = None
            self.server.pending.discard(self)
            self.server.bind(self, h.session)
        if self.driver is None:
            for ev in events:
                if isinstance(ev, ConnectionClosed):
                    self.failed = ev.error is not None
                    log.warning("closing connection from %s: %s", self.peer, _describe(ev.error))
        super().on_events(events)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        self.server.pending.discard(self)
        drv = self.driver
        if drv is not None and not self.closing and not drv.session.terminated:
            log.warning("%s: connection from %s lost (%s)", drv.label, self.peer, lost_reason(exc))
        super().connection_lost(exc)


class _ClientConnection(_ChannelConnection):
    def __init__(self, client: ChannelClient, slot: int) -> None:
        super().__init__(client.tls, client.liveness_timeout)
        self.client = client
        self.slot = slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._setup(transport):
            return
        drv = self.client.driver
        assert drv is not None
        try:
            self.handle = drv.session.connect(time.monotonic(), self.identity)
        except AuthError:
            log.error("the listener at %s presents another certificate than when the session started; "
                      "dropping this connection", self.client.target)
            cast(asyncio.Transport, transport).abort()
            return
        except (SessionClosedError, LimitExceeded) as exc:
            log.debug("connection %s not used: %s", self.slot, exc)
            cast(asyncio.Transport, transport).abort()
            return
        self.driver = drv
        drv.add_connection(self)
        drv.kick()


# =============================================================================== session driver


class _SessionDriver:
    """Drives one core :class:`Session`: event dispatch, coalesced flushing, the timer, pacing, stats."""

    def __init__(self, session: Session, *, role: str, peer: str, bandwidth: float | None,
                 on_stream: Callable[[ChannelStream], None] | None,
                 on_ready: Callable[[_ChannelConnection, HandshakeComplete], None] | None = None,
                 on_terminated: Callable[[_SessionDriver], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.session = session
        self.role = role
        self.peer = peer
        self.on_stream = on_stream
        self.on_ready = on_ready
        self.on_terminated = on_terminated
        self.bucket = TokenBucket(bandwidth, now=time.monotonic())
        self.conns: dict[int, _ChannelConnection] = {}
        self.streams: dict[int, ChannelStream] = {}
        self.closed_streams: deque[dict[str, object]] = deque(maxlen=KEEP_CLOSED_STREAMS)
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.ended: float | None = None
        self.end_reason: str | None = None
        self.error: ChannelError | None = None
        self.terminated = self.loop.create_future()
        self._open_queue: deque[ChannelStream] = deque()
        self._opening: ChannelStream | None = None
        self._kicked = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pace: asyncio.TimerHandle | None = None
        self._rotate = 0
        self._pinged = False

    @property
    def session_hex(self) -> str:
        sid = self.session.session_id
        return sid.hex() if sid else ""

    @property
    def label(self) -> str:
        return f"session {self.session_hex[:8] or '(new)'}"

    # ---------------------------------------------------------------- connections

    def add_connection(self, conn: _ChannelConnection) -> None:
        assert conn.handle is not None and conn.handle.conn_id is not None
        self.conns[conn.handle.conn_id] = conn
        conn.driver = self

    def remove_connection(self, conn: _ChannelConnection) -> None:
        h = conn.handle
        if h is not None and h.conn_id is not None and self.conns.get(h.conn_id) is conn:
            del self.conns[h.conn_id]

    def kick(self) -> None:
        """Schedule one service pass (flush every connection, re-arm the timer) for this loop iteration."""
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._kicked_service)

    def _kicked_service(self) -> None:
        if self._kicked:  # else a direct service() call did the pass since the kick
            self.service()

    def service(self) -> None:
        """Run the service pass now (it also stands for a pending :meth:`kick`)."""
        self._kicked = False
        if self._open_queue and self._opening is None:
            self._pump_opens()
        self.flush_all()
        self._arm_timer()

    def flush_all(self) -> None:
        conns = list(self.conns.values())
        if not conns:
            return
        k = self._rotate = (self._rotate + 1) % len(conns)
        for conn in conns[k:] + conns[:k]:
            conn.flush()

    def _arm_timer(self) -> None:
        dl = self.session.next_deadline()
        if dl == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = dl
        if dl is not None:
            self._timer = self.loop.call_later(max(0.0, dl - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        at = self._timer_at or 0.0
        self._timer = None
        self._timer_at = None
        self.handle_events(self.session.tick(max(time.monotonic(), at)))
        self.service()

    def pace_after(self, delay: float) -> None:
        """Flush again in *delay* seconds (the token bucket is in debt)."""
        if self._pace is None:
            self._pace = self.loop.call_later(delay, self._paced)

    def _paced(self) -> None:
        self._pace = None
        self.kick()

    def set_bandwidth(self, rate: float | None) -> None:
        self.bucket.set_rate(rate, time.monotonic())
        self.kick()

    # ---------------------------------------------------------------- streams

    def open_stream(self, name: str, handler: StreamHandler) -> ChannelStream:
        if self.session.terminated:
            raise SessionClosedError(f"session terminated: {self.session.error or 'closed'}")
        st = ChannelStream(self, 0, name, local=True)
        st.handler = handler
        self._open_queue.append(st)
        self._pump_opens()
        self.kick()
        return st

    def unqueue(self, st: ChannelStream) -> None:
        with contextlib.suppress(ValueError):
            self._open_queue.remove(st)

    def forget(self, st: ChannelStream) -> None:
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]
        if self._opening is st:
            self._opening = None
            self.kick()

    def _pump_opens(self) -> None:
        """Open the next queued stream once the previous one was answered (connection order)."""
        while self._opening is None and self._open_queue and not self.session.terminated:
            st = self._open_queue[0]
            try:
                sid = self.session.open_stream(st.name)
            except LimitExceeded:
                return  # retried when a stream closes
            except (ValueError, ChannelError) as exc:  # a bad name, or the session is over
                self._open_queue.popleft()
                st.state = "refused"
                self._call(st, "on_refused", ErrorCode.INTERNAL, str(exc))
                continue
            self._open_queue.popleft()
            st.sid = sid
            st.core_stats = self.session.stream_stats(sid)
            st.state = "opening"
            self.streams[sid] = st
            self._opening = st

    def _call(self, st: ChannelStream, method: str, *args: Any) -> None:
        h = st.handler
        if h is None:
            return
        try:
            getattr(h, method)(st, *args)
        except Exception:
            log.exception("%s: stream %s %r: handler %s failed", self.label, st.sid, st.name, method)
            st.reset("internal error in the stream handler", ErrorCode.INTERNAL)

    def _record(self, st: ChannelStream, stats: StreamStats | None) -> None:
        if stats is not None:
            st.core_stats = stats
        d = st.stats()
        d["ended_at"] = time.time()
        self.closed_streams.append(d)

    # ---------------------------------------------------------------- events

    def handle_events(self, events: list[Event]) -> None:
        """Act on the core's events, each through its handler in :data:`_HANDLERS` (by exact type)."""
        handlers = _HANDLERS
        for ev in events:
            handler = handlers.get(type(ev))
            if handler is not None:
                handler(self, ev)

    def _on_data(self, ev: DataReceived) -> None:
        st = self.streams.get(ev.stream_id)
        if st is not None:
            self._call(st, "on_data", ev.data)

    def _on_writable(self, ev: StreamWritable) -> None:
        st = self.streams.get(ev.stream_id)
        if st is not None:
            self._call(st, "on_writable")

    def _on_opened(self, ev: StreamOpened) -> None:
        st = ChannelStream(self, ev.stream_id, ev.name, local=False)
        st.core_stats = self.session.stream_stats(ev.stream_id)
        self.streams[ev.stream_id] = st
        if self.on_stream is None:
            st.refuse("this side of the channel accepts no streams")
            return
        try:
            self.on_stream(st)
        except Exception:
            log.exception("%s: the stream-open callback failed for %r", self.label, ev.name)
            if st.state == "pending":
                st.refuse("internal error", ErrorCode.INTERNAL)

    def _on_accepted(self, ev: StreamAccepted) -> None:
        st = self.streams.get(ev.stream_id)
        if st is not None:
            st.state = "open"
            if self._opening is st:
                self._opening = None
            self._call(st, "on_accepted")

    def _on_refused(self, ev: StreamRefused) -> None:
        st = self.streams.pop(ev.stream_id, None)
        if st is not None:
            st.state = "refused"
            if self._opening is st:
                self._opening = None
            self._record(st, None)
            self._call(st, "on_refused", ev.code, ev.reason)

    def _on_ended(self, ev: StreamEnded) -> None:
        st = self.streams.get(ev.stream_id)
        if st is not None:
            self._call(st, "on_eof")

    def _on_reset(self, ev: StreamReset) -> None:
        st = self.streams.get(ev.stream_id)
        if st is not None:
            st.state = "reset"
            if self._opening is st:
                self._opening = None
            self._call(st, "on_reset", ev.code, ev.reason, ev.remote)

    def _on_closed(self, ev: StreamClosed) -> None:
        st = self.streams.pop(ev.stream_id, None)
        if st is not None:
            if st.state not in ("reset", "refused"):
                st.state = "closed"
            if self._opening is st:
                self._opening = None
            self._record(st, ev.stats)
            self._call(st, "on_closed", ev.stats)

    def _on_handshake(self, ev: HandshakeComplete) -> None:
        conn = self.conns.get(ev.conn_id)
        if conn is not None:
            conn.ready = True
        if not self._pinged:
            self._pinged = True
            self.session.ping(time.monotonic())  # a first RTT sample for the statistics
        if self.on_ready is not None and conn is not None:
            self.on_ready(conn, ev)

    def _on_connection_closed(self, ev: ConnectionClosed) -> None:
        conn = self.conns.get(ev.conn_id) if ev.conn_id is not None else None
        log.warning("%s: closing the connection with %s: %s", self.label,
                    conn.peer if conn else "?", _describe(ev.error))
        if conn is not None:
            conn.failed = ev.error is not None
            conn.flush()

    def _terminated(self, ev: SessionTerminated) -> None:
        self.error = ev.error
        self.ended = time.time()
        if ev.error is None:
            why = "closed by the peer" if ev.remote else "closed"
            log.info("%s with %s %s", self.label, self.peer, why)
        else:
            who = "the peer reported: " if ev.remote else ""
            hint = ""
            if isinstance(ev.error, GraceExpired):
                hint = " (grace period expired: every stream was reset)"
            log.error("%s with %s failed: %s%s%s", self.label, self.peer, who, _describe(ev.error), hint)
        self.end_reason = None if ev.error is None else _describe(ev.error)
        for st in list(self.streams.values()):
            if st.state not in ("reset", "closed", "refused"):
                st.state = "reset"
                self._call(st, "on_reset", int(ev.error.code if ev.error else ErrorCode.NO_ERROR),
                           "session ended", ev.remote)
            self._record(st, None)
        self.streams.clear()
        queued = list(self._open_queue)
        self._open_queue.clear()
        self._opening = None
        for st in queued:
            st.state = "refused"
            self._call(st, "on_refused", ErrorCode.CANCEL, "the session ended")
        for conn in list(self.conns.values()):
            conn.failed = ev.error is not None and not ev.remote
            conn.flush()
        if self._pace is not None:
            self._pace.cancel()
        if not self.terminated.done():
            self.terminated.set_result(ev.error)
        if self.on_terminated is not None:
            self.on_terminated(self)

    # ---------------------------------------------------------------- end and stats

    def close(self, reason: str) -> None:
        """Orderly close (GOAWAY NO_ERROR); the SessionTerminated event follows through the timer."""
        if not self.session.terminated:
            self.session.close(reason)
        self.kick()

    async def wait_closed(self, timeout: float) -> None:
        """Wait (at most *timeout* s) until every connection is gone, then abort the rest."""
        conns = [c for c in self.conns.values() if not c.lost.done()]
        if conns:
            _, pending = await asyncio.wait([c.lost for c in conns], timeout=timeout)
            for c in conns:
                if not c.lost.done():
                    c.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stats(self) -> dict[str, object]:
        now = time.monotonic()
        s = self.session
        if not s.terminated:
            s.stats.sample(now)
        d: dict[str, object] = {
            "session_id": self.session_hex,
            "role": self.role,
            "peer": self.peer,
            "state": ("ended" if s.terminated else "established" if s.established and s.ready_connections
                      else "connecting" if not s.established else "reconnecting"),
            "error": self.end_reason,
            "started_at": self.started,
            "ended_at": self.ended,
            "bandwidth_limit": self.bucket.rate,
        }
        d.update(s.stats.as_dict())
        elapsed = max(1e-9, (self.ended - self.started) if self.ended else now - self.started_mono)
        d["raw_bytes_sent"] = s.stats.raw_data_sent
        d["avg_send_rate"] = s.stats.bytes_sent / elapsed
        d["avg_recv_rate"] = s.stats.bytes_received / elapsed
        d["elapsed"] = elapsed
        mem = s.memory() if not s.terminated else {"recv": 0, "reorder": 0, "send": 0}
        d["memory"] = mem
        d["recv_buffered"] = mem["recv"]
        d["send_buffered"] = mem["send"]
        live = []
        for st in self.streams.values():
            if st.core_stats is not None and not s.terminated:
                st.core_stats.sample(now)
            live.append(st.stats())
        live.extend(st.stats() for st in self._open_queue)
        d["streams"] = live + list(self.closed_streams)
        return d


# =============================================================================== server


#: The driver's handler of each core event, by exact type (PongReceived needs none).
_HANDLERS: dict[type, Callable[[_SessionDriver, Any], None]] = {
    DataReceived: _SessionDriver._on_data,
    StreamWritable: _SessionDriver._on_writable,
    StreamOpened: _SessionDriver._on_opened,
    StreamAccepted: _SessionDriver._on_accepted,
    StreamRefused: _SessionDriver._on_refused,
    StreamEnded: _SessionDriver._on_ended,
    StreamReset: _SessionDriver._on_reset,
    StreamClosed: _SessionDriver._on_closed,
    HandshakeComplete: _SessionDriver._on_handshake,
    ConnectionClosed: _SessionDriver._on_connection_closed,
    SessionTerminated: _SessionDriver._terminated,
}

class ChannelServer:
    """The listening side: accepts connections (TLS or explicit plaintext) and drives their sessions.

    ``tls``: the listener's :class:`~dataplane.channel.tls.TLSConfig`; None
    requires ``plaintext=True`` (logged with :func:`warn_plaintext`).
    ``on_stream(stream)`` is called for every stream a peer opens: it must
    eventually call ``stream.accept(handler)`` or ``stream.refuse(reason)``
    (the peer opens its next stream only after that answer). ``bandwidth``:
    bytes/s cap of each session's sending (None: unlimited).
    Raises ValueError for an inconsistent configuration.
    """

    def __init__(self, host: str, port: int, tls: TLSConfig | None, *, plaintext: bool = False,
                 limits: Limits | None = None, config: SessionConfig | None = None,
                 bandwidth: float | None = None, max_sessions: int = 64,
                 on_stream: Callable[[ChannelStream], None] | None = None,
                 liveness_timeout: float = LIVENESS_TIMEOUT) -> None:
        if tls is None and not plaintext:
            raise ValueError("a TLS configuration is required (or plaintext=True, explicitly)")
        if tls is not None and tls.plaintext:
            tls, plaintext = None, True
        self.host = host
        self.port = port
        self.tls = tls
        self.plaintext = plaintext
        self.limits = limits or Limits()
        self.config = config or SessionConfig()
        self.bandwidth = bandwidth
        self.on_stream = on_stream
        self.liveness_timeout = liveness_timeout
        self.acceptor = Acceptor(self.limits, self.config, max_sessions=max_sessions)
        self.sessions: dict[bytes, _SessionDriver] = {}
        self.ended: deque[dict[str, object]] = deque(maxlen=KEEP_ENDED_SESSIONS)
        self.pending: set[_ServerConnection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._bound: tuple[str, int] | None = None
        self._started = time.time()

    async def start(self) -> tuple[str, int]:
        """Listen; return the bound ``(host, port)``. Raises OSError (address in use, ...), TLSConfigError."""
        loop = asyncio.get_running_loop()
        ctx = None
        if self.tls is not None:
            ctx = server_context(self.tls, on_refusal=self._on_refusal)
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), self.host or None, self.port, ssl=ctx,
            ssl_handshake_timeout=self.limits.handshake_timeout if ctx else None, reuse_address=True,
            backlog=256)
        self._bound = None
        if ctx is None:
            warn_plaintext(log, f"every peer of {format_hostport(*self.address)}")
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the host as given). Raises RuntimeError before :meth:`start`."""
        if self._bound is None:
            if self._server is None or not self._server.sockets:
                raise StateError("the server is not listening")
            self._bound = (self.host, int(self._server.sockets[0].getsockname()[1]))
        return self._bound

    @staticmethod
    def _on_refusal(reason: str, exc: BaseException) -> None:
        log.warning("refused a TLS connection: %s", reason)

    def bind(self, conn: _ServerConnection, session: Session) -> None:
        """A pending connection's HELLO bound it to *session* (new or joined)."""
        key = session.session_id or b""
        drv = self.sessions.get(key)
        if drv is None:
            who = conn.peer
            if self.tls is not None and conn.transport is not None:
                with contextlib.suppress(Exception):
                    ident = peer_identity(conn.transport)
                    who = f"{ident.names[0] if ident.names else '?'} at {conn.peer}"
            drv = _SessionDriver(session, role="server", peer=who, bandwidth=self.bandwidth,
                                 on_stream=self.on_stream, on_terminated=self._session_ended)
            self.sessions[key] = drv
            log.info("%s opened by %s", drv.label, who)
            if self.plaintext:
                warn_plaintext(log, conn.peer)
        else:
            log.info("%s: connection from %s joined", drv.label, conn.peer)
        drv.add_connection(conn)

    def _session_ended(self, drv: _SessionDriver) -> None:
        key = drv.session.session_id or b""
        if self.sessions.get(key) is drv:
            del self.sessions[key]
        self.ended.append(drv.stats())

    def set_bandwidth(self, rate: float | None) -> None:
        """Cap each session's sending at *rate* bytes/s from now on (None: unlimited); new sessions too."""
        self.bandwidth = rate
        for drv in self.sessions.values():
            drv.set_bandwidth(rate)
        log.info("bandwidth cap per session: %s", format_rate(rate))

    def stats(self) -> dict[str, object]:
        """Statistics of every live session and of the last ended ones (see docs/channel.md)."""
        return {
            "role": "listen",
            "address": format_hostport(*self._bound) if self._bound else None,
            "time": time.time(),
            "uptime": time.time() - self._started,
            "bandwidth_limit": self.bandwidth,
            "pending_connections": len(self.pending),
            "sessions": [d.stats() for d in self.sessions.values()] + list(self.ended),
        }

    async def close(self, reason: str = "the listener is shutting down", timeout: float = 2.0) -> None:
        """Stop listening, close every session in an orderly way (GOAWAY) and wait for the connections."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.pending):
            conn.abort()
        drivers = list(self.sessions.values())
        for drv in drivers:
            drv.close(reason)
        await asyncio.sleep(0)
        for drv in drivers:
            await drv.wait_closed(timeout)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout)


# =============================================================================== client


class ChannelClient:
    """The dialing side: one session over ``connections`` TCP/TLS connections to ``host:port``.

    Every lost connection is redialled with exponential backoff (from
    ``backoff_min`` doubling to ``backoff_max`` seconds) while the session
    lives; with no connection for the grace period (``limits.grace``) the
    core resets every stream and the session ends (:attr:`done` resolves
    with :class:`~dataplane.channel.errors.GraceExpired`). Streams are
    opened with :meth:`open_stream`, one at a time in call order.
    Raises ValueError for an inconsistent configuration.
    """

    def __init__(self, host: str, port: int, tls: TLSConfig | None, *, plaintext: bool = False,
                 connections: int = 1, limits: Limits | None = None, config: SessionConfig | None = None,
                 bandwidth: float | None = None, on_stream: Callable[[ChannelStream], None] | None = None,
                 connect_timeout: float = 3.0, backoff_min: float = 0.05, backoff_max: float = 2.0,
                 liveness_timeout: float = LIVENESS_TIMEOUT) -> None:
        if tls is None and not plaintext:
            raise ValueError("a TLS configuration is required (or plaintext=True, explicitly)")
        if tls is not None and tls.plaintext:
            tls, plaintext = None, True
        self.limits = limits or Limits()
        if not 1 <= connections <= self.limits.max_connections:
            raise ValueError(f"connections must be in 1..{self.limits.max_connections}, got {connections}")
        self.host = host
        self.port = port
        self.target = format_hostport(host, port)
        self.tls = tls
        self.plaintext = plaintext
        self.connections = connections
        self.config = config or SessionConfig()
        self.bandwidth = bandwidth
        self.on_stream = on_stream
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.liveness_timeout = liveness_timeout
        self.driver: _SessionDriver | None = None
        self._ctx: ssl.SSLContext | None = None
        self._slots: list[asyncio.Task[None]] = []
        self._fatal: asyncio.Future[ChannelError] | None = None
        self._established: asyncio.Future[None] | None = None
        self._last_error: str | None = None
        self._closing = False
        self._lost_at: float | None = None

    # ---------------------------------------------------------------- life cycle

    async def start(self, ready_timeout: float | None = None) -> None:
        """Dial the connections and wait until the session is established.

        Then waits up to *ready_timeout* seconds (default: the handshake
        timeout) for all ``connections`` to be ready; the rest keep being
        dialled in the background. Raises :class:`ConnectError` with a
        readable reason (TLS refusal, certificate problem, no listener
        within the grace period, refusal by the listener), TLSConfigError.
        """
        loop = asyncio.get_running_loop()
        if self._slots:
            raise StateError("the client is already started")
        if self.tls is not None:
            self._ctx = client_context(self.tls)
        else:
            warn_plaintext(log, self.target)
        self._ensure_driver()
        assert self.driver is not None and self._fatal is not None and self._established is not None
        self._slots = [asyncio.create_task(self._slot(k + 1)) for k in range(self.connections)]
        self.driver.kick()
        waiters: list[asyncio.Future[Any]] = [self._established, self._fatal, self.driver.terminated]
        await first_done(*waiters)
        if not self._established.done() or self.driver.terminated.done():
            if self._fatal.done():
                err: ChannelError = self._fatal.result()
            else:
                cause = self.driver.error
                detail = _describe(cause) if cause is not None else "the session ended"
                if isinstance(cause, GraceExpired) and self._last_error:
                    detail = f"no connection within the grace period; last error: {self._last_error}"
                err = ConnectError(f"cannot connect to {self.target}: {detail}")
            await self._shutdown(abort=True)
            raise err
        wait = ready_timeout if ready_timeout is not None else self.limits.handshake_timeout
        deadline = loop.time() + wait
        while self.ready_connections < self.connections and loop.time() < deadline and not self.done.done():
            await asyncio.sleep(0.01)

    def _ensure_driver(self) -> _SessionDriver:
        if self.driver is None:
            loop = asyncio.get_running_loop()
            session = Session.client(time.monotonic(), limits=self.limits, config=self.config)
            self.driver = _SessionDriver(session, role="client", peer=self.target, bandwidth=self.bandwidth,
                                         on_stream=self.on_stream, on_ready=self._on_ready,
                                         on_terminated=self._on_terminated)
            self._fatal = loop.create_future()
            self._established = loop.create_future()
        return self.driver

    @property
    def done(self) -> asyncio.Future[ChannelError | None]:
        """Resolves when the session ends: None (orderly close) or the error. RuntimeError before start."""
        if self.driver is None:
            raise StateError("the client is not started")
        return self.driver.terminated

    @property
    def ready_connections(self) -> int:
        """Connections that completed their handshake and carry data now."""
        return self.driver.session.ready_connections if self.driver is not None else 0

    @property
    def session_id(self) -> str:
        """Hex id of the session ('' before it is established)."""
        return self.driver.session_hex if self.driver is not None else ""

    def open_stream(self, name: str, handler: StreamHandler) -> ChannelStream:
        """Queue a stream named *name* (opened after the previous one was answered); events go to *handler*.

        May be called before :meth:`start` (the stream waits for the
        session). Raises SessionClosedError if the session ended.
        """
        return self._ensure_driver().open_stream(name, handler)

    def set_bandwidth(self, rate: float | None) -> None:
        """Cap the session's sending at *rate* bytes/s from now on (None: unlimited)."""
        self.bandwidth = rate
        if self.driver is not None:
            self.driver.set_bandwidth(rate)
        log.info("bandwidth cap: %s", format_rate(rate))

    def stats(self) -> dict[str, object]:
        """Statistics of the session and its streams (see docs/channel.md)."""
        return {
            "role": "connect",
            "address": self.target,
            "time": time.time(),
            "connections_wanted": self.connections,
            "bandwidth_limit": self.bandwidth,
            "sessions": [self.driver.stats()] if self.driver is not None else [],
        }

    async def close(self, reason: str = "the dialer is shutting down", timeout: float = 2.0) -> None:
        """Close the session in an orderly way (GOAWAY), then the connections."""
        await self._shutdown(abort=False, reason=reason, timeout=timeout)

    async def _shutdown(self, *, abort: bool, reason: str = "", timeout: float = 2.0) -> None:
        self._closing = True
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        drv = self.driver
        if drv is None:
            return
        if abort:
            for conn in list(drv.conns.values()):
                conn.abort()
        drv.close(reason or "closed")
        await asyncio.sleep(0)
        await drv.wait_closed(timeout)

    # ---------------------------------------------------------------- connections

    def _on_ready(self, conn: _ChannelConnection, ev: HandshakeComplete) -> None:
        assert self._established is not None
        slot = conn.slot if isinstance(conn, _ClientConnection) else "?"
        if not self._established.done():
            self._established.set_result(None)
            log.info("session %s established with %s", self.session_id[:8], self.target)
        elif self._lost_at is not None:
            log.info("session %s: connection %s to %s re-established after %.1f s (%d of %d up)",
                     self.session_id[:8], slot, self.target, time.monotonic() - self._lost_at,
                     self.ready_connections, self.connections)
        if self.ready_connections >= self.connections:
            self._lost_at = None

    def _on_terminated(self, drv: _SessionDriver) -> None:
        for task in self._slots:
            if task is not asyncio.current_task():
                task.cancel()

    def _set_fatal(self, err: ChannelError) -> None:
        assert self._fatal is not None
        if not self._fatal.done():
            self._fatal.set_result(err)

    async def _dial(self, slot: int) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {self.host}")
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setblocking(False)
            tune_socket(sock, self.liveness_timeout)
            await asyncio.wait_for(loop.sock_connect(sock, addr), self.connect_timeout)
            conn = _ClientConnection(self, slot)
            hs = self.limits.handshake_timeout
            server_hostname = self.tls.peer_name if self.tls is not None else None
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, sock=sock, ssl=self._ctx,
                                       server_hostname=server_hostname,
                                       ssl_handshake_timeout=hs if self._ctx else None), hs + 1.0)
        except BaseException:
            sock.close()
            raise
        return conn

    async def _slot(self, slot: int) -> None:
        """Keep one connection of the session up: dial, wait until it is lost, redial with backoff."""
        drv = self.driver
        assert drv is not None
        delay = 0.0
        while not self._closing and not drv.session.terminated:
            if delay:
                await asyncio.sleep(delay)
                if self._closing or drv.session.terminated:
                    return
            try:
                conn = await self._dial(slot)
            except asyncio.CancelledError:
                raise
            except ssl.SSLCertVerificationError as exc:
                reason = describe_tls_error(exc, self.tls)
                if not drv.session.established:
                    self._set_fatal(ConnectError(f"TLS to {self.target} failed: {reason}"))
                    return
                self._note_failure(slot, reason)
                delay = self._backoff(delay)
                continue
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    reason = f"no answer within {self.connect_timeout:g} s"
                else:
                    reason = describe_tls_error(exc, self.tls)
                self._note_failure(slot, reason)
                delay = self._backoff(delay)
                continue
            lost = await conn.lost
            was_ready = conn.ready
            if self._closing or drv.session.terminated:
                return
            if not drv.session.established and not conn.got_bytes and conn.handle is not None:
                why = describe_tls_error(lost or EOFError(), self.tls) if self.tls is not None else (
                    "the listener closed the connection before the channel handshake (is it a TLS listener?)")
                self._set_fatal(ConnectError(f"{self.target} refused the connection: {why}"))
                return
            reason = lost_reason(lost)
            if was_ready:
                if self._lost_at is None:
                    self._lost_at = time.monotonic()
                log.warning("session %s: connection %s to %s lost (%s); reconnecting", self.session_id[:8],
                            slot, self.target, reason)
                delay = 0.0
            else:
                self._note_failure(slot, reason)
                delay = self._backoff(delay)

    def _note_failure(self, slot: int, reason: str) -> None:
        first = self._last_error is None
        self._last_error = reason
        established = self.driver is not None and self.driver.session.established
        if not established and first:
            # The peer may simply not listen yet (its pod is starting): say so once, and for how long.
            log.warning("cannot reach %s yet (%s); retrying for up to %g s (the grace period)", self.target,
                        reason, self.limits.grace)
            return
        level = logging.WARNING if established else logging.INFO
        log.log(level, "connection %s to %s failed: %s", slot, self.target, reason)

    def _backoff(self, delay: float) -> float:
        return min(self.backoff_max, max(self.backoff_min, delay * 2))
