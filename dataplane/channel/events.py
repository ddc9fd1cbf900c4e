"""Events the channel core returns from ``receive_data``, ``tick`` and ``connection_lost``.

They are plain immutable records; the driver dispatches on their type.
Connection-level: :class:`HandshakeComplete`, :class:`ConnectionClosed`,
:class:`PongReceived`. Session-level: :class:`SessionTerminated`. Stream-level:
:class:`StreamOpened` (the peer asks to open a stream: accept or refuse it),
:class:`StreamAccepted` / :class:`StreamRefused` (answer to our open),
:class:`DataReceived`, :class:`StreamEnded` (peer half-closed),
:class:`StreamWritable` (send credit is back), :class:`StreamReset`,
:class:`StreamClosed` (both halves done, state freed).
"""

from __future__ import annotations

from dataclasses import dataclass

from dataplane.channel.errors import ChannelError
from dataplane.channel.frames import Buffer
from dataplane.channel.stats import StreamStats


class Event:
    """Base class of all channel events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """Connection *conn_id* is ready to carry data.

    ``joined`` is False for the connection that created the session and True
    for every later one (additional stripes and reconnects).
    """

    conn_id: int
    session_id: bytes
    version: int
    joined: bool


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The core gave up on a connection: flush ``data_to_send()`` then close the transport.

    ``conn_id`` is None for a server connection that never joined a session.
    ``error`` says why (ChannelTimeout, LimitExceeded, VersionError,
    ResumeRefused, ProtocolError...). The session itself goes on unless a
    :class:`SessionTerminated` follows.
    """

    conn_id: int | None
    error: ChannelError | None


@dataclass(frozen=True, slots=True)
class SessionTerminated(Event):
    """The session is over: every stream was reset, every connection should be flushed and closed.

    ``error`` is None for an orderly close (GOAWAY with NO_ERROR), else the
    cause (ChecksumError, FlowControlError, GraceExpired, ResumeRefused,
    RemoteError...). ``remote`` tells whether the peer ended it.
    """

    error: ChannelError | None
    remote: bool


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """A PING we sent on *conn_id* came back after *rtt* seconds (injected clock)."""

    conn_id: int
    rtt: float


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer asks to open stream *stream_id* named *name*: call ``accept_stream`` or ``refuse_stream``.

    These arrive in the order the peer opened its streams.
    """

    stream_id: int
    name: str


@dataclass(frozen=True, slots=True)
class StreamAccepted(Event):
    """The peer accepted our stream *stream_id* (OPEN_OK): it is writable now."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRefused(Event):
    """The peer refused our stream *stream_id* (OPEN_FAIL); its state is already freed."""

    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Bytes of stream *stream_id*, in order, exactly once.

    ``offset`` is the stream offset of ``data[0]``. ``data`` is a bytes-like
    object the application may keep (never reused by the core). Call
    ``consumed(stream_id, len(data))`` once the bytes are written to their
    destination: that releases flow-control credit.
    """

    stream_id: int
    offset: int
    data: Buffer


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed stream *stream_id* (FIN) and every byte before it was delivered."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamWritable(Event):
    """Send credit came back for stream *stream_id* after a ``send`` was cut short."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """Stream *stream_id* was reset: no more data in either direction.

    ``remote`` is True when the peer reset it, False for a local cause
    (our ``reset_stream``, or the session terminating with *code*).
    """

    stream_id: int
    code: int
    reason: str
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamClosed(Event):
    """Stream *stream_id* is finished in both directions and its state is freed; final *stats*."""

    stream_id: int
    stats: StreamStats
