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
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from dataplane.channel.connection import _ChannelConnection, describe_error
from dataplane.channel.errors import (
    ChannelError,
    ChannelTimeout,
    ErrorCode,
    GraceExpired,
    LimitExceeded,
    SessionClosedError,
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
from dataplane.channel.session import Session
from dataplane.channel.shaping import TokenBucket
from dataplane.channel.stats import StreamStats
from dataplane.channel.stream import ChannelStream, StreamHandler

__all__: list[str] = []

log = logging.getLogger("dataplane.channel")

KEEP_CLOSED_STREAMS = 64
#: Seconds ChannelServer.close() and ChannelClient.close() wait by default, when closing
#: gracefully, for the peer to acknowledge every byte already handed to the session; then they
#: close anyway, with a warning. Long enough for a few MiB in flight and a reconnect, short enough
#: not to hold a shutdown up for long.
DRAIN_TIMEOUT = 3.0


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
        self.peer_names: tuple[str, ...] = ()  # the peer certificate's names (a server's sessions)
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
                    conn.peer if conn else "?", describe_error(ev.error))
        if conn is not None:
            conn.failed = ev.error is not None
            conn.flush()

    def _terminated(self, ev: SessionTerminated) -> None:
        self.error = ev.error
        self.ended = time.time()
        if ev.error is None:
            why = "closed by the peer" if ev.remote else "closed"
            log.info("%s with %s %s", self.label, self.peer, why)
        elif not ev.remote and self.session.draining and isinstance(ev.error, ChannelTimeout):
            log.warning("%s with %s: %s", self.label, self.peer, ev.error.reason)
        else:
            who = "the peer reported: " if ev.remote else ""
            hint = ""
            if isinstance(ev.error, GraceExpired):
                hint = " (grace period expired: every stream was reset)"
            log.error("%s with %s failed: %s%s%s", self.label, self.peer, who, describe_error(ev.error), hint)
        self.end_reason = None if ev.error is None else describe_error(ev.error)
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
        """Close at once (GOAWAY NO_ERROR; what is not acknowledged is dropped); the SessionTerminated
        event follows through the timer."""
        if not self.session.terminated:
            self.session.close(reason)
        self.kick()

    async def drain(self, reason: str, timeout: float) -> bool:
        """Close gracefully (:meth:`Session.drain`): wait until the peer acknowledged every byte
        handed to the session, then GOAWAY; after *timeout* seconds close anyway (logged at
        warning). Returns :attr:`Session.all_acknowledged` at the end. Never raises."""
        s = self.session
        if not s.terminated:
            s.drain(time.monotonic(), max(0.0, timeout), reason)
            self.kick()
            with contextlib.suppress(asyncio.TimeoutError):  # the core's deadline comes first
                await asyncio.wait_for(asyncio.shield(self.terminated), timeout + 1.0)
            if not s.terminated:
                self.close(reason)
        return s.all_acknowledged

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
