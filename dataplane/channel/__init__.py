"""Cross-cluster streaming channel: one session = N TCP/TLS connections carrying M byte streams.

Layering (imports point down only)::

    relay.py         application sockets <-> streams (source listeners, destination targets)
    driver.py        asyncio: sockets, TLS, timers, pacing, reconnects; ChannelServer / ChannelClient
    addr.py          parsing of addresses, endpoints, NAME=ENDPOINT mappings and rates (pure)
    tls.py           mutual TLS contexts and the peer certificate fingerprint (the identity that
                     the driver passes to Session.connect / Acceptor.accept); stdlib only
    acceptor.py      Acceptor: the server side of the handshake, routing connections to sessions
    session.py       Session / ConnectionHandle: connections, striping, control channel,
                     session credit, replay, resume, keepalive, frame dispatch, stats
    stream_state.py  one stream's life: phases and named transitions, both halves,
                     per-stream credit, reordering; the table of live streams and their ids
    buffers.py       a stream's send (replay) buffer and reorder buffer
    protocol.py      Connection: preface, version negotiation, handshake order, frame I/O
    frames.py        wire format: header struct, frame types, encoders, bounded decoder
    codec.py         per-stream adaptive compression over a Codec (native page codec / zlib)
    stats.py         counters and throughput meters        shaping.py  token bucket
    events.py        event records                         errors.py   exceptions, wire codes

Everything from session.py down is sans-IO: bytes and the current time go in as
arguments, events come out as return values, bytes to write are pulled with
``data_to_send``. No sockets, threads or clock reads. The wire format is
specified in ``docs/wire-format.md``; the driver and relays in ``docs/channel.md``.

The asyncio layer (:class:`ChannelServer`, :class:`ChannelClient`,
:class:`ChannelStream`, :class:`StreamHandler`, :class:`SourceRelay`,
:class:`DestinationRelay`, :class:`Endpoint`, ...) is exported here too, but
imported lazily on first use, so that ``import dataplane.channel`` (the core)
does not import asyncio.
"""

from dataplane.channel.acceptor import Acceptor
from dataplane.channel.errors import (
    AuthError,
    ChannelError,
    ChannelTimeout,
    ChecksumError,
    CompressionError,
    ConnectError,
    ErrorCode,
    FlowControlError,
    FrameSizeError,
    GraceExpired,
    LimitExceeded,
    ProtocolError,
    RemoteError,
    ResumeRefused,
    SessionClosedError,
    StateError,
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
from dataplane.channel.session import ConnectionHandle, Limits, Session, SessionConfig
from dataplane.channel.shaping import TokenBucket
from dataplane.channel.stats import SessionStats, StreamStats

_LAZY = {
    "ChannelClient": "dataplane.channel.client",
    "ChannelServer": "dataplane.channel.server",
    "ChannelStream": "dataplane.channel.stream",
    "StreamHandler": "dataplane.channel.stream",
    "Bridge": "dataplane.channel.relay",
    "DestinationRelay": "dataplane.channel.relay",
    "SourceRelay": "dataplane.channel.relay",
    "Endpoint": "dataplane.channel.addr",
    "parse_endpoint": "dataplane.channel.addr",
    "parse_hostport": "dataplane.channel.addr",
    "parse_mapping": "dataplane.channel.addr",
}


def __getattr__(name: str) -> object:
    """Import the asyncio layer's names on first use (PEP 562). Raises AttributeError for others."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Acceptor", "Bridge", "ChannelClient", "ChannelServer", "ChannelStream", "ConnectError",
    "DestinationRelay", "Endpoint", "SourceRelay", "StreamHandler", "parse_endpoint", "parse_hostport",
    "parse_mapping",
    "AuthError", "ChannelError", "ChannelTimeout", "ChecksumError", "CompressionError",
    "ConnectionClosed", "ConnectionHandle", "DataReceived", "ErrorCode", "Event", "FlowControlError",
    "FrameSizeError", "GraceExpired", "HandshakeComplete", "LimitExceeded", "Limits", "PongReceived",
    "ProtocolError", "RemoteError", "ResumeRefused", "Session", "SessionClosedError", "SessionConfig",
    "StateError",
    "SessionStats", "SessionTerminated", "StreamAccepted", "StreamClosed", "StreamClosedError", "StreamEnded",
    "StreamError", "StreamOpened", "StreamRefused", "StreamReset", "StreamResetError", "StreamStats",
    "StreamWritable", "TokenBucket", "VersionError",
]
