"""The server side of the handshake (sans-IO): an :class:`Acceptor` routes each new connection to the
session it creates or joins, and a :class:`ConnectionHandle` is what the driver holds for a
connection before and after it is bound. Used by the asyncio server in :mod:`dataplane.channel.server`."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from dataplane.channel.errors import (
    ChannelError,
    LimitExceeded,
    ProtocolError,
    ResumeRefused,
)
from dataplane.channel.events import (
    ConnectionClosed,
    Event,
)
from dataplane.channel.frames import (
    FLAG_JOIN,
    Buffer,
    Frame,
    HelloParams,
)
from dataplane.channel.protocol import Connection, Role
from dataplane.channel.session import ConnectionHandle, Limits, Session, SessionConfig

#: Connections that may be in their handshake at once, per acceptor (per listener): accepted but
#: their HELLO not yet bound to a session (ChannelServer counts those still in their TLS handshake
#: against the same bound). A client dials all of a session's
#: connections at once (at most ``Limits.max_connections``, 16) and the extra ones stay pending
#: until the first is welcomed: 128 lets 8 such sessions start or reconnect in the same instant.
#: Beyond it a new connection is refused at once (REFUSE with LIMIT) without reading from it; a
#: real client redials with backoff. Each pending connection holds about one KiB in the core
#: (:data:`~dataplane.channel.frames.MAX_HANDSHAKE_FRAME`) until its handshake deadline.
MAX_PENDING_HANDSHAKES = 128


class Acceptor:
    """Server front end (sans-IO): handshakes new connections and binds them to sessions.

    ``accept(peer_identity, now)`` for every accepted TLS connection returns
    a :class:`ConnectionHandle`; once its HELLO arrives the handle is bound
    to a new session or to the existing one it joins (token and identity
    checked), or refused with a REFUSE frame. *rng* makes session ids and
    tokens (default :func:`secrets.token_bytes`). At most *max_pending*
    connections may be in their handshake at once (see
    :data:`MAX_PENDING_HANDSHAKES`). Raises ValueError if *max_pending* < 1.
    """

    def __init__(self, limits: Limits | None = None, config: SessionConfig | None = None, *,
                 max_sessions: int = 64, max_pending: int = MAX_PENDING_HANDSHAKES,
                 rng: Callable[[int], bytes] = secrets.token_bytes) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be positive, got {max_pending}")
        self.limits = limits or Limits()
        self.config = config or SessionConfig()
        self.max_sessions = max_sessions
        self.max_pending = max_pending
        self._rng = rng
        self._sessions: dict[bytes, Session] = {}
        self._pending: set[ConnectionHandle] = set()

    @property
    def sessions(self) -> list[Session]:
        """Live (not terminated) sessions."""
        self._prune()
        return list(self._sessions.values())

    def get(self, session_id: bytes) -> Session | None:
        """The live session with this id, if any."""
        s = self._sessions.get(session_id)
        return s if s is not None and not s.terminated else None

    def _prune(self) -> None:
        for sid in [k for k, s in self._sessions.items() if s.terminated]:
            del self._sessions[sid]

    @property
    def pending(self) -> int:
        """Connections accepted and still in their handshake (neither bound to a session nor closed)."""
        self._pending = {h for h in self._pending if h.session is None and not h.closed}
        return len(self._pending)

    def accept(self, peer_identity: str, now: float) -> ConnectionHandle:
        """A new server-side connection from a peer with TLS identity *peer_identity*.

        Write ``handle.data_to_send()`` (our preface), feed what arrives to
        ``handle.receive_data``; ``handle.session`` is set once the handshake
        binds it. Apply ``handle.handshake_deadline`` with ``handle.tick``.
        Raises LimitExceeded if :attr:`max_pending` connections are in their
        handshake already: close the transport at once (after writing
        :func:`refusal` to say why, if you like).
        """
        self._prune()
        if self.pending >= self.max_pending:
            raise LimitExceeded(f"{self.max_pending} connections are already in their handshake")
        proto = Connection(Role.SERVER, max_frame_payload=self.limits.max_frame_payload,
                           versions=self.config.versions, peer_identity=peer_identity,
                           handshake_deadline=now + self.limits.handshake_timeout)
        handle = ConnectionHandle(None, None, self, proto)
        self._pending.add(handle)
        return handle

    def _handshake(self, handle: ConnectionHandle, frames: list[Frame], now: float) -> list[Event]:
        proto = handle._proto
        assert proto is not None
        if not frames:
            return []
        hello = frames[0]
        try:
            params = HelloParams.unpack(hello.payload)
            if hello.flags & FLAG_JOIN:
                session = self._sessions.get(params.session_id)
                if (session is None or session.terminated
                        or not session._verify(params.token, proto.peer_identity)):
                    raise ResumeRefused("unknown session, wrong resume token or wrong identity")
                if len(session._links) >= session.limits.max_connections:
                    raise LimitExceeded(f"session already has {len(session._links)} connections")
                joined = True
            else:
                if any(params.session_id) or any(params.token):
                    raise ProtocolError("a HELLO creating a session must not carry an id or token")
                self._prune()
                if len(self._sessions) >= self.max_sessions:
                    raise LimitExceeded(f"server already has {len(self._sessions)} sessions")
                session = Session(Role.SERVER, now=now, limits=self.limits, config=self.config,
                                  session_id=self._rng(16), token=self._rng(32),
                                  peer_identity=proto.peer_identity)
                self._sessions[session.session_id or b""] = session
                joined = False
        except ChannelError as exc:
            proto.refuse(exc.code, exc.reason)
            return [ConnectionClosed(None, exc)]
        cid = session._attach(proto, params, joined, now)
        handle._bind(session, cid)
        self._pending.discard(handle)
        events: list[Event] = []
        link = session._links[cid]
        session._process(link, frames[1:], now, events)
        return events


def refusal(error: ChannelError, versions: tuple[int, int] | None = None) -> list[Buffer]:
    """What to write to a connection refused before anything was read from it (our preface and a
    REFUSE frame with *error*'s code and reason), e.g. after :meth:`Acceptor.accept` raised
    LimitExceeded. *versions*: the preface's range (default: every version we speak)."""
    proto = (Connection(Role.SERVER, max_frame_payload=4096) if versions is None
             else Connection(Role.SERVER, max_frame_payload=4096, versions=versions))
    proto.refuse(error.code, error.reason)
    return proto.take()
