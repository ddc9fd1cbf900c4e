"""The stream API of the channel's asyncio layer: :class:`ChannelStream` (one stream of a session as
the application sees it) and :class:`StreamHandler` (its callbacks). See :mod:`dataplane.channel.driver`."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from dataplane.channel.errors import (
    ChannelError,
    ErrorCode,
)
from dataplane.channel.frames import Buffer
from dataplane.channel.stats import StreamStats

if TYPE_CHECKING:
    from dataplane.channel.driver import _SessionDriver

__all__ = ["ChannelStream", "StreamHandler"]


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

    @property
    def peer_names(self) -> tuple[str, ...]:
        """The names of the peer's certificate (CN and subjectAltNames; empty without TLS)."""
        return self._drv.peer_names

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
