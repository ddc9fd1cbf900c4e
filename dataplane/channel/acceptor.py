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
    Frame,
    HelloParams,
)
from dataplane.channel.protocol import Connection, Role
from dataplane.channel.session import ConnectionHandle, Limits, Session, SessionConfig


class Acceptor:
    """Server front end (sans-IO): handshakes new connections and binds them to sessions.

    ``accept(peer_identity, now)`` for every accepted TLS connection returns
    a :class:`ConnectionHandle`; once its HELLO arrives the handle is bound
    to a new session or to the existing one it joins (token and identity
    checked), or refused with a REFUSE frame. *rng* makes session ids and
    tokens (default :func:`secrets.token_bytes`).
    """

    def __init__(self, limits: Limits | None = None, config: SessionConfig | None = None, *,
                 max_sessions: int = 64, rng: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.limits = limits or Limits()
        self.config = config or SessionConfig()
        self.max_sessions = max_sessions
        self._rng = rng
        self._sessions: dict[bytes, Session] = {}

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

    def accept(self, peer_identity: str, now: float) -> ConnectionHandle:
        """A new server-side connection from a peer with TLS identity *peer_identity*.

        Write ``handle.data_to_send()`` (our preface), feed what arrives to
        ``handle.receive_data``; ``handle.session`` is set once the handshake
        binds it. Apply ``handle.handshake_deadline`` with ``handle.tick``.
        """
        self._prune()
        proto = Connection(Role.SERVER, max_frame_payload=self.limits.max_frame_payload,
                           versions=self.config.versions, peer_identity=peer_identity,
                           handshake_deadline=now + self.limits.handshake_timeout)
        return ConnectionHandle(None, None, self, proto)

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
        events: list[Event] = []
        link = session._links[cid]
        session._process(link, frames[1:], now, events)
        return events
