"""The life of one stream as the sans-IO core sees it: phases, the two halves, per-stream credit.

:class:`StreamState` is one stream's state machine and bookkeeping: where it
is in its life (:class:`StreamPhase`), how far its receive half got
(:class:`RecvState`), the bytes it sent and may still have to send again,
the bytes it received out of order, and its credit in both directions.
:class:`StreamTable` holds a session's live streams and allocates their ids.
Every transition is a named method below; the session
(:mod:`dataplane.channel.session`) calls them when a frame or a local call
asks for one, and keeps what spans streams: connections, frames on the wire,
the control channel, session credit, events. Nothing here sends a frame or
reads a clock.

Transitions (wire-format.md sections 5 and 6 say why)::

    phase, local stream:   OPENING --open_confirmed (OPEN_OK)--> OPEN
                           OPENING --open_failed (OPEN_FAIL)---> CLOSED
    phase, remote stream:  PENDING --accepted (accept_stream)--> OPEN
                           PENDING --refused (refuse_stream)---> CLOSED
    phase, any live stream:        --reset (RESET sent or received)--> RESET
                           RESET   --open_failed (OPEN_FAIL crossed our RESET)--> CLOSED
                           OPEN or RESET --freed (both halves finished)--> CLOSED

    send half (phase OPEN): fin_local None --begin_fin (close_stream)--> the offset of our FIN;
                            finished once every byte and the FIN are acknowledged (send_finished).
                            In RESET and CLOSED nothing more is sent (``stopped``).
    receive half:           RecvState.OPEN --fin_received (FIN)--> FIN --end_reached--> ENDED
                            any --settle (reset or refused: final size accounted)--> SETTLED
"""

from __future__ import annotations

from bisect import bisect_left
from enum import IntEnum

from dataplane.channel.buffers import _Reorder, _SendBuffer
from dataplane.channel.codec import StreamCompressor
from dataplane.channel.errors import (
    FlowControlError,
    LimitExceeded,
    ProtocolError,
    StreamClosedError,
    StreamError,
    StreamResetError,
)
from dataplane.channel.frames import MAX_U32, Buffer
from dataplane.channel.stats import StreamStats

__all__ = ["RecvState", "StreamPhase", "StreamState", "StreamTable"]


class StreamPhase(IntEnum):
    """Where a stream is in its life; changed only by :class:`StreamState`'s transition methods
    (see the module docstring for the diagram)."""

    OPENING = 0  # local: OPEN sent, no answer yet (DATA that overtakes OPEN_OK is held)
    PENDING = 1  # remote: OPEN received, the application has not answered
    OPEN = 2  # both halves live, each ending on its own
    RESET = 3  # reset by either side: nothing more is sent; the receive half settles at the final size
    CLOSED = 4  # freed (both halves finished), or refused: only in-flight records still point at it


class RecvState(IntEnum):
    """How far the receive half got; only ever moves forward."""

    OPEN = 0  # bytes arrive, the peer's final size is not known
    FIN = 1  # the peer's FIN arrived (``fin_offset``); bytes below it may still be missing
    ENDED = 2  # every byte below the FIN was delivered: StreamEnded reported
    SETTLED = 3  # reset or refused: the final size is accounted, nothing more is accepted


_OPENING, _PENDING, _OPEN = StreamPhase.OPENING, StreamPhase.PENDING, StreamPhase.OPEN
_RESET, _CLOSED = StreamPhase.RESET, StreamPhase.CLOSED


class StreamState:
    """One stream in the core: phase, both halves, buffers and per-stream credit.

    Send half: ``sbuf`` keeps bytes ``[acked, written)`` (the replay
    buffer); ``next_new`` is the first byte never sent; ``resend`` the
    ranges to send again (lost with a connection); ``peer_limit`` the
    peer's absolute credit; ``fin_local``/``fin_seq`` our FIN's offset and
    control sequence number (None/0 before).

    Receive half: ``recv_next`` is the next byte to deliver, ``recv_hw``
    the highest byte the peer sent (credit is accounted up to it),
    ``consumed`` what the application reported written, ``reorder`` the
    bytes held out of order, ``held`` bytes delivered while our OPEN is not
    answered yet (they are reported after StreamAccepted), ``fin_offset``
    the peer's final size, ``ack_recv``/``ack_limit`` what we last told
    the peer.

    Two marks are not states but the session's scheduling: ``queued`` (in
    the round robin of streams with bytes to send) and ``blocked`` (out of
    credit: gets StreamWritable when it has some again).
    """

    __slots__ = (
        "sid", "name", "local", "phase", "recv", "stats", "comp", "comp_mode",
        # send half
        "sbuf", "written", "next_new", "acked", "peer_limit", "resend", "fin_local", "fin_seq",
        "blocked", "queued",
        # receive half
        "window", "recv_next", "recv_hw", "consumed", "ack_recv", "ack_limit", "reorder", "held",
        "fin_offset",
    )

    def __init__(self, sid: int, name: str, local: bool, window: int, comp_mode: str,
                 max_reorder_pieces: int) -> None:
        self.sid = sid
        self.name = name
        self.local = local
        self.phase = _OPENING if local else _PENDING
        self.recv = RecvState.OPEN
        self.stats = StreamStats(sid, name)
        self.comp: StreamCompressor | None = None
        self.comp_mode = comp_mode
        self.sbuf = _SendBuffer()
        self.written = 0
        self.next_new = 0
        self.acked = 0
        self.peer_limit = 0
        self.resend: list[tuple[int, int]] = []
        self.fin_local: int | None = None
        self.fin_seq = 0
        self.blocked = False
        self.queued = False
        self.window = window
        self.recv_next = 0
        self.recv_hw = 0
        self.consumed = 0
        self.ack_recv = 0
        self.ack_limit = 0
        self.reorder = _Reorder(max_reorder_pieces)
        self.held: list[tuple[int, Buffer]] = []
        self.fin_offset: int | None = None

    def __repr__(self) -> str:
        return f"<StreamState {self.sid} {self.name!r} {self.phase.name} recv={self.recv.name}>"

    # ---------------------------------------------------------------- phase transitions

    @property
    def stopped(self) -> bool:
        """Reset or closed: nothing more is sent, received bytes are no longer delivered."""
        return self.phase >= _RESET

    def accepted(self) -> None:
        """The application accepted the peer's stream: PENDING -> OPEN.

        Raises StreamResetError if the peer reset it already, StreamError if it is not awaiting an
        answer.
        """
        if self.phase == _RESET:
            raise StreamResetError(f"stream {self.sid} was reset")
        if self.phase != _PENDING:
            raise StreamError(f"stream {self.sid} is not awaiting acceptance")
        self.phase = _OPEN

    def refused(self) -> None:
        """The application refused the peer's stream (OPEN_FAIL queued): PENDING -> CLOSED.

        Raises StreamError if it is not awaiting an answer.
        """
        if self.phase != _PENDING:
            raise StreamError(f"stream {self.sid} is not awaiting acceptance")
        self.recv = RecvState.SETTLED
        self.phase = _CLOSED

    def open_confirmed(self, limit: int) -> list[tuple[int, Buffer]]:
        """The peer answered our OPEN with OPEN_OK (its credit *limit*): OPENING -> OPEN.

        Returns the bytes held meanwhile, to report now. Raises ProtocolError if the stream is not
        ours or not opening.
        """
        if not self.local or self.phase != _OPENING:
            raise ProtocolError(f"OPEN_OK for stream {self.sid} that is not opening")
        self.phase = _OPEN
        self.raise_peer_limit(limit)
        held, self.held = self.held, []
        return held

    def open_failed(self) -> bool:
        """The peer answered our OPEN with OPEN_FAIL: OPENING or RESET -> CLOSED.

        Returns True if the application must be told (it was still opening; after our own RESET it
        knows). Raises ProtocolError if the stream is not ours or was answered already.
        """
        if not self.local or self.phase not in (_OPENING, _RESET):
            raise ProtocolError(f"OPEN_FAIL for stream {self.sid} that is not opening")
        notify = self.phase == _OPENING
        self.recv = RecvState.SETTLED
        self.phase = _CLOSED
        return notify

    def reset(self) -> int:
        """Either side reset the stream: -> RESET. Drops every buffer; nothing more is sent.

        Returns the replay-buffer bytes released (unacknowledged bytes now given up).
        """
        released = self.written - self.acked
        self.phase = _RESET
        self.acked = self.written
        self.sbuf.clear()
        self.resend = []
        self.reorder.clear()
        self.held = []
        return released

    def freed(self) -> int:
        """The session dropped the stream (both halves finished, refused, or the session ended): ->
        CLOSED. Returns the replay-buffer bytes released."""
        released = self.written - self.acked
        self.phase = _CLOSED
        self.sbuf.clear()
        self.reorder.clear()
        return released

    # ---------------------------------------------------------------- send half

    def begin_fin(self) -> bool:
        """Half-close our side at the current offset (the caller queues the FIN and sets ``fin_seq``).

        Returns False if our FIN was queued already. Raises StreamResetError after a reset,
        StreamError while the stream awaits our answer or is gone.
        """
        if self.phase == _RESET:
            raise StreamResetError(f"stream {self.sid} was reset")
        if self.phase == _PENDING:
            raise StreamError(f"stream {self.sid} must be accepted or refused first")
        if self.phase == _CLOSED:
            raise StreamError(f"stream {self.sid} is closed")
        if self.fin_local is not None:
            return False
        self.fin_local = self.written
        return True

    def check_sendable(self) -> None:
        """Raise StreamResetError (reset) or StreamClosedError (our FIN queued) if no byte may be queued."""
        if self.stopped:
            raise StreamResetError(f"stream {self.sid} was reset")
        if self.fin_local is not None:
            raise StreamClosedError(f"stream {self.sid} is closed for sending")

    def send_credit(self) -> int:
        """Bytes the peer's stream credit allows us to queue now (0 unless OPEN and not half-closed)."""
        if self.phase != _OPEN or self.fin_local is not None:
            return 0
        return self.peer_limit - self.written

    def raise_peer_limit(self, limit: int) -> None:
        """The peer's absolute stream credit; only ever grows (late ACKs are harmless)."""
        if limit > self.peer_limit:
            self.peer_limit = limit

    def acknowledged(self, received: int, limit: int) -> int:
        """An ACK entry: the peer has every byte below *received* and allows up to *limit*.

        Returns the replay-buffer bytes released. Raises ProtocolError if *received* covers bytes
        never sent.
        """
        if received > self.next_new:
            raise ProtocolError(f"ACK of stream {self.sid} covers bytes never sent "
                                f"({received} > {self.next_new})")
        released = 0
        if received > self.acked:
            released = received - self.acked
            self.acked = received
            self.sbuf.release(received)
        self.raise_peer_limit(limit)
        return released

    def send_finished(self, ctl_acked: int) -> bool:
        """The send half is done: stopped, or our FIN and every byte before it acknowledged
        (*ctl_acked*: the peer's cumulative control ack)."""
        return self.stopped or (self.fin_local is not None and self.acked == self.fin_local
                                and ctl_acked > self.fin_seq)

    def has_send_work(self) -> bool:
        """Bytes to send or send again."""
        return not self.stopped and (bool(self.resend) or self.next_new < self.written)

    def requeue(self, a: int, b: int) -> bool:
        """Bytes ``[a, b)`` went out on a connection that was lost: send what is unacknowledged of
        them again. Returns True if anything was queued."""
        if self.stopped or b <= self.acked:
            return False
        self.add_resend(max(a, self.acked), b)
        return True

    def add_resend(self, a: int, b: int) -> None:
        """Merge ``[a, b)`` into the sorted, disjoint resend ranges."""
        r = self.resend
        k = bisect_left(r, (a, b))
        r.insert(k, (a, b))
        merged: list[tuple[int, int]] = []
        for s, e in r:
            if merged and s <= merged[-1][1]:
                if e > merged[-1][1]:
                    merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self.resend = merged

    def next_range(self, fsize: int) -> tuple[int, int, bool] | None:
        """The next DATA frame's ``(offset, size, replay)``: resends first, then new bytes; at most
        *fsize* bytes and never across two chunks of the send buffer. None: nothing to send."""
        if self.stopped:
            return None
        resend = self.resend
        while resend:
            a, b = resend[0]
            if b <= self.acked:
                resend.pop(0)
                continue
            if a < self.acked:
                a = self.acked
            n = min(b - a, fsize, self.sbuf.contiguous(a))
            if a + n >= b:
                resend.pop(0)
            else:
                resend[0] = (a + n, b)
            return a, n, True
        a = self.next_new
        n = min(self.written - a, fsize)
        if n <= 0:
            return None
        n = min(n, self.sbuf.contiguous(a))  # frames never straddle two chunks: no copy
        self.next_new = a + n
        return a, n, False

    # ---------------------------------------------------------------- receive half

    def recv_limit(self) -> int:
        """Our absolute receive credit for the stream (0 until the application accepted it)."""
        return 0 if self.phase == _PENDING else self.consumed + self.window

    def check_data(self, end: int) -> None:
        """A DATA frame reaches *end*: raise FlowControlError beyond our credit, ProtocolError beyond
        the peer's FIN."""
        if end > self.recv_limit():
            raise FlowControlError(f"stream {self.sid}: data up to {end} beyond the credit "
                                   f"{self.recv_limit()}")
        if self.fin_offset is not None and end > self.fin_offset:
            raise ProtocolError(f"stream {self.sid}: data up to {end} beyond its FIN at {self.fin_offset}")

    def advance_hw(self, end: int) -> int:
        """The peer sent bytes up to *end*: return how far that moves the highest byte sent (the
        bytes the session's credit counts)."""
        if end <= self.recv_hw:
            return 0
        grown = end - self.recv_hw
        self.recv_hw = end
        return grown

    def take_data(self, off: int, data: Buffer) -> tuple[list[tuple[int, Buffer]], int]:
        """Bytes ``[off, off+len(data))`` arrived (not all below ``recv_next``).

        Returns the pieces that continue the stream now, in order (``recv_next`` moved past them),
        and how many of the bytes were duplicates of bytes already delivered. Bytes that continue
        the stream never enter the reorder buffer (so the frame that fills the gap is taken even
        when the buffer is full); later ones do, and raise ProtocolError if they would be one
        out-of-order piece too many (``max_reorder_pieces``).
        """
        nxt = self.recv_next
        if off > nxt:
            try:
                self.reorder.insert(off, data)
            except ProtocolError as exc:
                raise ProtocolError(f"stream {self.sid}: {exc.reason}") from None
            return [], 0
        dup = nxt - off
        ready = [(nxt, data if dup == 0 else memoryview(data)[dup:])]
        self.recv_next = off + len(data)
        if self.reorder:
            ready += self.reorder.pop_ready(self.recv_next)  # held pieces the new bytes reach
            o, d = ready[-1]
            self.recv_next = o + len(d)
        return ready, dup

    def consume(self, n: int) -> None:
        """The application wrote *n* delivered bytes to their destination. Raises ValueError if *n* is
        negative or more than was delivered and not yet consumed."""
        if n < 0 or self.consumed + n > self.recv_next:
            raise ValueError(f"consumed({n}) exceeds the {self.recv_next - self.consumed} undelivered bytes")
        self.consumed += n

    def fin_received(self, final: int) -> None:
        """The peer's FIN at *final*: RecvState OPEN -> FIN. Raises ProtocolError for a second FIN or
        a final size below what was sent or beyond our credit."""
        if self.fin_offset is not None:
            raise ProtocolError(f"second FIN on stream {self.sid}")
        if final < self.recv_hw or final > self.recv_limit():
            raise ProtocolError(f"FIN of stream {self.sid} at {final} is inconsistent with the data received")
        self.fin_offset = final
        self.recv = RecvState.FIN

    def check_reset_size(self, final: int) -> None:
        """A RESET's final size: raise ProtocolError if it contradicts what was sent, the FIN, or our
        credit."""
        if (final < self.recv_hw or (self.fin_offset is not None and final != self.fin_offset)
                or final > self.consumed + self.window):
            raise ProtocolError(f"RESET of stream {self.sid} has an inconsistent final size {final}")

    def end_reached(self) -> bool:
        """RecvState FIN -> ENDED once every byte below the FIN was delivered on an OPEN stream;
        True when that happened now (report StreamEnded)."""
        if self.recv == RecvState.FIN and self.recv_next == self.fin_offset and self.phase == _OPEN:
            self.recv = RecvState.ENDED
            return True
        return False

    def settle(self, final: int) -> tuple[int, int]:
        """A reset stream's receive half ends at the peer's final size: -> RecvState.SETTLED.

        Returns ``(sent, credit)``: how much that adds to the bytes the session counts as sent by the
        peer, and to the credit it gives back. ``(0, 0)`` if settled already.
        """
        if self.recv == RecvState.SETTLED:
            return 0, 0
        self.recv = RecvState.SETTLED
        sent = final - self.recv_hw
        self.recv_hw = final
        credit = final - self.consumed
        self.consumed = final
        return sent, credit

    @property
    def recv_settled(self) -> bool:
        """Nothing more is accepted on the receive half (reset or refused, final size accounted)."""
        return self.recv == RecvState.SETTLED

    def recv_finished(self) -> bool:
        """The receive half is done: settled, or every byte below the FIN consumed."""
        return self.recv == RecvState.SETTLED or (self.fin_offset is not None
                                                  and self.consumed == self.fin_offset)

    def ended_normally(self) -> bool:
        """The receive half reached the peer's FIN (not reset): the peer may still need our last ACK."""
        return self.fin_offset is not None and self.recv != RecvState.SETTLED


class StreamTable:
    """A session's live streams, by id, and the allocation of stream ids.

    Ids are odd for streams the client opens, even for the server's, and each
    side uses its ids in order without gaps. Freed streams leave the table;
    the final offsets of the last few that ended normally are kept
    (``recent_closed``) so that a late replay of their bytes can be
    acknowledged again.
    """

    __slots__ = ("live", "local_open", "remote_open", "recent_closed", "_client", "_next_local",
                 "_next_remote", "_keep_closed", "_max_reorder")

    def __init__(self, client: bool, keep_closed: int, max_reorder_pieces: int) -> None:
        self.live: dict[int, StreamState] = {}
        self.local_open = 0
        self.remote_open = 0
        self.recent_closed: dict[int, int] = {}  # freed stream -> final offset
        self._client = client
        self._next_local = 1 if client else 2
        self._next_remote = 2 if client else 1
        self._keep_closed = keep_closed
        self._max_reorder = max_reorder_pieces

    def open_local(self, name: str, window: int, comp_mode: str) -> StreamState:
        """Allocate the next id of ours for a stream we open. Raises LimitExceeded when ids run out."""
        sid = self._next_local
        if sid > MAX_U32:
            raise LimitExceeded("stream ids exhausted")
        self._next_local += 2
        st = StreamState(sid, name, True, window, comp_mode, self._max_reorder)
        self.live[sid] = st
        self.local_open += 1
        return st

    def open_remote(self, sid: int, name: str, window: int, comp_mode: str,
                    max_streams: int) -> StreamState | None:
        """The peer opens stream *sid*; None if it has *max_streams* open already (the id is used
        anyway: the caller refuses it). Raises ProtocolError if *sid* is not the peer's next id."""
        if sid != self._next_remote:
            raise ProtocolError(f"OPEN of stream {sid}, expected id {self._next_remote}")
        self._next_remote += 2
        if self.remote_open >= max_streams:
            return None
        st = StreamState(sid, name, False, window, comp_mode, self._max_reorder)
        self.live[sid] = st
        self.remote_open += 1
        return st

    def known_id(self, sid: int) -> bool:
        """True if *sid* was allocated at some point (by either side)."""
        if sid & 1 == (1 if self._client else 0):
            return 0 < sid < self._next_local
        return 0 < sid < self._next_remote

    def never_opened_by_us(self, sid: int) -> bool:
        """True if *sid* is one of our ids that we have not allocated yet."""
        return sid & 1 == (1 if self._client else 0) and sid >= self._next_local

    def for_frame(self, sid: int, what: str) -> StreamState | None:
        """The live stream a frame names; None if it was freed. Raises ProtocolError for an id never
        allocated (*what* names the frame in the message)."""
        st = self.live.get(sid)
        if st is None and not self.known_id(sid):
            raise ProtocolError(f"{what} for unknown stream {sid}")
        return st

    def remove(self, st: StreamState) -> bool:
        """Drop *st* from the table; False if it was not there (freed already)."""
        if self.live.pop(st.sid, None) is None:
            return False
        if st.local:
            self.local_open -= 1
        else:
            self.remote_open -= 1
        return True

    def remember_closed(self, sid: int, final: int) -> None:
        """Keep a normally ended stream's final offset for late replays (the oldest is forgotten)."""
        recent = self.recent_closed
        recent[sid] = final
        if len(recent) > self._keep_closed:
            del recent[next(iter(recent))]
