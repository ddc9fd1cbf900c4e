"""Cross-cluster streaming channel: one session = N TCP/TLS connections carrying M byte streams.

Layering (imports point down only)::

    (driver, later)  asyncio transports, relays, CLI: feeds bytes and the clock to the core
    tls.py           mutual TLS contexts and the peer certificate fingerprint (the identity that
                     the driver passes to Session.connect / Acceptor.accept); stdlib only
    session.py       Session / Acceptor / ConnectionHandle: streams, striping, reordering,
                     credit flow control, replay buffer, resume, keepalive, stats
    protocol.py      Connection: preface, version negotiation, handshake order, frame I/O
    frames.py        wire format: header struct, frame types, encoders, bounded decoder
    codec.py         per-stream adaptive compression over a Codec (native page codec / zlib)
    stats.py         counters and throughput meters        shaping.py  token bucket
    events.py        event records                         errors.py   exceptions, wire codes

Everything from session.py down is sans-IO: bytes and the current time go in as
arguments, events come out as return values, bytes to write are pulled with
``data_to_send``. No sockets, threads or clock reads. The wire format is
specified in ``docs/wire-format.md``.
"""

from dataplane.channel.errors import (
    AuthError,
    ChannelError,
    ChannelTimeout,
    ChecksumError,
    CompressionError,
    ErrorCode,
    FlowControlError,
    FrameSizeError,
    GraceExpired,
    LimitExceeded,
    ProtocolError,
    RemoteError,
    ResumeRefused,
    SessionClosedError,
    StreamClosedError,
    StreamError,
    StreamResetError,
    VersionError,
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
from dataplane.channel.session import Acceptor, ConnectionHandle, Limits, Session, SessionConfig
from dataplane.channel.shaping import TokenBucket
from dataplane.channel.stats import SessionStats, StreamStats

__all__ = [
    "Acceptor", "AuthError", "ChannelError", "ChannelTimeout", "ChecksumError", "CompressionError",
    "ConnectionClosed", "ConnectionHandle", "DataReceived", "ErrorCode", "Event", "FlowControlError",
    "FrameSizeError", "GraceExpired", "HandshakeComplete", "LimitExceeded", "Limits", "PongReceived",
    "ProtocolError", "RemoteError", "ResumeRefused", "Session", "SessionClosedError", "SessionConfig",
    "SessionStats", "SessionTerminated", "StreamAccepted", "StreamClosed", "StreamClosedError", "StreamEnded",
    "StreamError", "StreamOpened", "StreamRefused", "StreamReset", "StreamResetError", "StreamStats",
    "StreamWritable", "TokenBucket", "VersionError",
]
