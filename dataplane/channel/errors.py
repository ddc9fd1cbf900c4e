"""The channel's exception hierarchy and its wire error codes.

Every error the channel core reports is a :class:`ChannelError`; its
``code`` is the :class:`ErrorCode` carried on the wire (REFUSE, GOAWAY,
OPEN_FAIL and RESET frames)::

    ChannelError
     ├── ProtocolError          the peer broke the protocol
     │    ├── ChecksumError     a frame's checksum did not match
     │    ├── FrameSizeError    a length field above the configured limits
     │    ├── FlowControlError  the peer sent beyond the credit we advertised
     │    ├── CompressionError  a compressed payload did not decode
     │    └── VersionError      no protocol version in common
     ├── AuthError              the peer's TLS identity is not the one bound to the session
     │    └── ResumeRefused     unknown session, wrong resume token or wrong identity
     ├── LimitExceeded          too many sessions, connections or streams
     ├── ChannelTimeout         handshake or keepalive deadline passed
     ├── GraceExpired          no connection for the whole grace period
     ├── RemoteError            the peer closed the session or refused with this code
     ├── ConnectError           the client could not establish its session (the message says why)
     ├── StateError             a call the endpoint's state does not allow (start twice, ...)
     ├── StreamError            misuse of a stream by the local application
     │    ├── StreamResetError  the stream was reset (by either side)
     │    └── StreamClosedError the stream's sending half is closed
     └── SessionClosedError     the session has terminated

Errors detected in bytes from the peer are never raised out of
``receive_data``: they are reported as events carrying one of these
instances (see :mod:`dataplane.channel.events`). The local API
(``send``, ``open_stream``, ...) raises them directly.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Error codes on the wire (u32 in the ``aux`` field of REFUSE, GOAWAY, OPEN_FAIL, RESET)."""

    NO_ERROR = 0
    PROTOCOL = 1
    CHECKSUM = 2
    FRAME_SIZE = 3
    FLOW_CONTROL = 4
    COMPRESSION = 5
    VERSION = 6
    AUTH = 7
    RESUME_REFUSED = 8
    LIMIT = 9
    TIMEOUT = 10
    GRACE_EXPIRED = 11
    CANCEL = 12
    REFUSED = 13
    INTERNAL = 14


class ChannelError(Exception):
    """Base class of every channel error; ``code`` is its wire :class:`ErrorCode`."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, reason: str = "", *, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            try:
                self.code = ErrorCode(code)
            except ValueError:
                self.code = ErrorCode.INTERNAL
                self.raw_code = code


class ConnectError(ChannelError):
    """:meth:`~dataplane.channel.client.ChannelClient.start` could not establish the session; the
    message says why."""


class StateError(ChannelError, RuntimeError):
    """A call that the endpoint's state does not allow (a client started twice, a server asked for
    its address before it listens, ...): a bug in the caller, not a fault of the peer."""


class ProtocolError(ChannelError):
    """The peer sent bytes that break the protocol (fatal for the session)."""

    code = ErrorCode.PROTOCOL


class ChecksumError(ProtocolError):
    """A frame's checksum did not match its header and payload."""

    code = ErrorCode.CHECKSUM


class FrameSizeError(ProtocolError):
    """A frame's length field exceeds what its type or our limits allow."""

    code = ErrorCode.FRAME_SIZE


class FlowControlError(ProtocolError):
    """The peer sent data beyond the stream or session credit we advertised."""

    code = ErrorCode.FLOW_CONTROL


class CompressionError(ProtocolError):
    """A compressed DATA payload is malformed or does not decode to its declared size."""

    code = ErrorCode.COMPRESSION


class VersionError(ProtocolError):
    """The two sides support no common protocol version."""

    code = ErrorCode.VERSION


class AuthError(ChannelError):
    """The peer's TLS identity does not match the identity bound to the session."""

    code = ErrorCode.AUTH


class ResumeRefused(AuthError):
    """A connection could not join a session: unknown session, bad token or other identity."""

    code = ErrorCode.RESUME_REFUSED


class LimitExceeded(ChannelError):
    """A configured limit (sessions, connections, streams) would be exceeded."""

    code = ErrorCode.LIMIT


class ChannelTimeout(ChannelError):
    """A handshake or keepalive deadline passed."""

    code = ErrorCode.TIMEOUT


class GraceExpired(ChannelError):
    """The session had no live connection for the whole grace period."""

    code = ErrorCode.GRACE_EXPIRED


class RemoteError(ChannelError):
    """The peer ended the session (GOAWAY) or refused us with a code and reason."""


class StreamError(ChannelError):
    """A local stream operation is not possible (unknown stream, wrong state)."""

    code = ErrorCode.PROTOCOL


class StreamResetError(StreamError):
    """The stream was reset by either side; no more data moves on it."""

    code = ErrorCode.CANCEL


class StreamClosedError(StreamError):
    """The stream's sending half is closed (FIN sent)."""


class SessionClosedError(ChannelError):
    """The session has terminated; no further operations are possible."""


_BY_CODE: dict[int, type[ChannelError]] = {
    ErrorCode.PROTOCOL: ProtocolError,
    ErrorCode.CHECKSUM: ChecksumError,
    ErrorCode.FRAME_SIZE: FrameSizeError,
    ErrorCode.FLOW_CONTROL: FlowControlError,
    ErrorCode.COMPRESSION: CompressionError,
    ErrorCode.VERSION: VersionError,
    ErrorCode.AUTH: AuthError,
    ErrorCode.RESUME_REFUSED: ResumeRefused,
    ErrorCode.LIMIT: LimitExceeded,
    ErrorCode.TIMEOUT: ChannelTimeout,
    ErrorCode.GRACE_EXPIRED: GraceExpired,
}


def error_from_code(code: int, reason: str) -> ChannelError:
    """Build the local exception for an error *code* received from the peer.

    Codes with a dedicated class (VERSION, RESUME_REFUSED, LIMIT, ...) map to
    it so callers can test ``isinstance``; others become :class:`RemoteError`
    carrying the code. Never raises.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(reason, code=code)
    return cls(f"peer: {reason}" if reason else "peer reported an error")
