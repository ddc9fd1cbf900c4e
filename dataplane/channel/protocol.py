"""Per-connection protocol state: preface exchange, version negotiation, frame decoding, output queue.

A :class:`Connection` is one TCP/TLS connection seen by the sans-IO core.
It knows nothing of sessions or streams: it

* queues its own preface at creation and parses the peer's, picking the
  highest common version (no overlap: :class:`VersionError`; a server also
  queues a REFUSE frame with the reason first, so the client learns why);
* decodes frames with a bounded :class:`FrameDecoder`;
* enforces the handshake order: the first frame must be HELLO (at a server)
  or WELCOME/REFUSE (at a client), and no handshake frame may follow; a
  server takes nothing after the HELLO until it answered it
  (:meth:`Connection.handshake_answered`). Until then a frame of another type,
  or larger than :data:`~dataplane.channel.frames.MAX_HANDSHAKE_FRAME`, is
  refused from its header, before its payload is read, and reads are at most
  that size: a connection still in its handshake holds about one KiB;
* collects outgoing frames until the driver takes them.

States: ``PREFACE`` -> ``HANDSHAKE`` -> ``OPEN``; ``closed`` is set when the
connection is given up (input is then ignored; queued output can still be
flushed).
"""

from __future__ import annotations

from enum import Enum, IntEnum

from dataplane.channel.errors import ProtocolError, VersionError
from dataplane.channel.frames import (
    HANDSHAKE_TYPES,
    MAX_HANDSHAKE_FRAME,
    MAX_REASON,
    MAX_VERSION,
    MIN_VERSION,
    PREFACE_SIZE,
    Buffer,
    Frame,
    FrameDecoder,
    FrameType,
    decode_preface,
    encode_frame,
    encode_preface,
    encode_text,
    negotiate_version,
    version_refusal,
)


class Role(Enum):
    """Which side of the TCP connection we are."""

    CLIENT = "client"
    SERVER = "server"


class ConnState(IntEnum):
    """Connection handshake progress."""

    PREFACE = 0
    HANDSHAKE = 1
    OPEN = 2


_FIRST = {"server": frozenset({FrameType.HELLO}), "client": frozenset({FrameType.WELCOME, FrameType.REFUSE})}


class Connection:
    """Preface, version negotiation, frame decoding and output queue of one connection.

    *max_frame_payload* bounds every DATA payload we accept; *versions* is
    the ``(min, max)`` protocol version range we speak; *peer_identity* is
    the TLS identity (certificate fingerprint) the driver saw for the peer.
    Raises ValueError for an invalid version range or payload limit.
    """

    __slots__ = ("role", "versions", "peer_identity", "handshake_deadline", "state", "version",
                 "peer_versions", "closed", "bytes_in", "bytes_out", "_pre", "_pview", "_decoder", "_out",
                 "_out_bytes")

    def __init__(self, role: Role, *, max_frame_payload: int,
                 versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION), peer_identity: str = "",
                 handshake_deadline: float = float("inf")) -> None:
        self.role = role
        self.versions = versions
        self.peer_identity = peer_identity
        self.handshake_deadline = handshake_deadline
        self.state = ConnState.PREFACE
        self.version: int | None = None
        self.peer_versions: tuple[int, int] | None = None
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._pre = bytearray()
        self._pview: memoryview | None = None
        self._decoder = FrameDecoder(max_frame_payload)
        # the first frame is the peer's HELLO (server; then nothing until we answered it) or its
        # WELCOME/REFUSE (client; followed at once by the server's first ACK)
        self._decoder.expect(_FIRST[role.value], frozenset() if role == Role.SERVER else None)
        self._out: list[Buffer] = [encode_preface(*versions)]
        self._out_bytes = PREFACE_SIZE

    # ---------------------------------------------------------------- input

    def receive(self, data: Buffer) -> list[Frame]:
        """Parse bytes from the peer; return the complete frames, in order.

        Returns [] once the connection is closed. Raises ProtocolError (and
        subclasses, VersionError included) for anything invalid; the caller
        must then give up the connection.
        """
        if self.closed:
            return []
        self.bytes_in += len(data)
        if self.state == ConnState.PREFACE:
            mv = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
            need = PREFACE_SIZE - len(self._pre)
            self._pre += mv[:need]
            if len(self._pre) < PREFACE_SIZE:
                return []
            self._on_preface()
            data = mv[need:]
            if not data:
                return []
        return self._check(self._decoder.feed(data))

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable buffer for the next socket read (``asyncio.BufferedProtocol`` shape)."""
        if self.state == ConnState.PREFACE:
            # read the preface on its own so that frames always go through the decoder
            self._pview = memoryview(bytearray(PREFACE_SIZE - len(self._pre)))
            return self._pview
        if self.state == ConnState.HANDSHAKE:
            # small reads until the handshake frame came: no large buffer for a peer not yet known
            self._pview = memoryview(bytearray(MAX_HANDSHAKE_FRAME))
            return self._pview
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Account for *nbytes* read into the last :meth:`get_buffer` view; return complete frames.

        Raises like :meth:`receive`; ValueError if *nbytes* exceeds that view.
        """
        if self.closed:
            return []
        if self._pview is not None:
            view, self._pview = self._pview, None
            if not 0 <= nbytes <= len(view):
                raise ValueError(f"buffer_updated({nbytes}) beyond the buffer")
            return self.receive(bytes(view[:nbytes]))
        self.bytes_in += nbytes
        return self._check(self._decoder.buffer_updated(nbytes))

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held by the decoder."""
        return self._decoder.buffered

    def _on_preface(self) -> None:
        lo, hi = decode_preface(self._pre)
        self.peer_versions = (lo, hi)
        version = negotiate_version(self.versions, (lo, hi))
        if version is None:
            reason = (f"no common protocol version: {self.role.value} speaks "
                      f"{self.versions[0]}..{self.versions[1]}, peer speaks {lo}..{hi}")
            if self.role == Role.SERVER:
                self._queue(version_refusal(encode_text(reason, MAX_REASON), hi))
            raise VersionError(reason)
        self.version = version
        self.state = ConnState.HANDSHAKE

    def _check(self, frames: list[Frame]) -> list[Frame]:
        for f in frames:
            if self.state == ConnState.HANDSHAKE:
                first_ok = (f.type == FrameType.HELLO if self.role == Role.SERVER
                            else f.type in (FrameType.WELCOME, FrameType.REFUSE))
                if not first_ok:
                    raise ProtocolError(f"unexpected {FrameType(f.type).name} frame during the handshake")
                self.state = ConnState.OPEN
            elif f.type in HANDSHAKE_TYPES:
                raise ProtocolError(f"{FrameType(f.type).name} frame after the handshake")
        return frames

    def handshake_answered(self) -> None:
        """Server: we answered the peer's HELLO with WELCOME; from now on it may send any frame."""
        self._decoder.expect(None)

    # ---------------------------------------------------------------- output

    def send_frame(self, ftype: int, payload: Buffer = b"", *, flags: int = 0, stream_id: int = 0,
                   aux: int = 0, offset: int = 0, seq: int = 0) -> int:
        """Queue one frame; return its size on the wire."""
        return self._queue(*encode_frame(ftype, payload, flags=flags, stream_id=stream_id, aux=aux,
                                         offset=offset, seq=seq))

    def _queue(self, head: Buffer, body: Buffer = b"") -> int:
        """Queue encoded bytes (a header, then its payload if any); return how many."""
        out = self._out
        out.append(head)
        size = len(head)
        if body:
            out.append(body)
            size += len(body)
        self._out_bytes += size
        return size

    def refuse(self, code: int, reason: str) -> None:
        """Queue a REFUSE frame (*code*, *reason*) and close the connection for input."""
        self.send_frame(FrameType.REFUSE, encode_text(reason, MAX_REASON), aux=int(code))
        self.closed = True

    @property
    def pending_output(self) -> int:
        """Bytes queued and not yet taken by the driver."""
        return self._out_bytes

    def take(self) -> list[Buffer]:
        """Remove and return every queued buffer (write them in order)."""
        out = self._out
        if not out:
            return out
        self._out = []
        self.bytes_out += self._out_bytes
        self._out_bytes = 0
        return out

    def close(self) -> None:
        """Stop processing input; queued output stays available to :meth:`take`."""
        self.closed = True
