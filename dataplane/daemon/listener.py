"""One channel listener for every receiver of a daemon (``dataplane serve --listen``).

Each session on it is routed to one receiver, by what it is and what it asks for: its first stream
is a migration's control stream, ``cclm-control`` or ``cclm-control@<receiver id>``; it goes to the
receiver it names (a receiver job of this daemon), or, naming none, to the oldest receiver still
waiting for a session; and only to a receiver that expects the name its peer certificate carries
(the receiver's ``peer``). Anything else is refused on that stream, with the reason, and never
reaches a receiver: a session of an unexpected peer, a name of no waiting receiver, a stream of a
session that no receiver took. Every later stream of a session goes to the receiver that took it.

A receiver uses its :class:`Port` where ``dataplane receive`` uses its own listener
(:func:`dataplane.migration.cclm.run_target`'s ``server_factory``): starting it registers the
receiver, closing it ends the receiver's session (only that one) and unregisters it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataplane.channel.server import ChannelServer
from dataplane.channel.session import Limits, SessionConfig
from dataplane.channel.stream import ChannelStream
from dataplane.channel.tls import TLSConfig
from dataplane.migration.control import named_receiver

log = logging.getLogger(__name__)

__all__ = ["Port", "SharedListener", "Slot"]

#: Sessions the shared listener takes at once (its receivers', and peers still being refused).
MAX_SESSIONS = 64


class SharedListener:
    """The daemon's channel listener at ``host:port`` (mutual TLS with ``tls``, whose ``peer_name``
    is None: each receiver authorises its own peer)."""

    def __init__(self, host: str, port: int, tls: TLSConfig, *, grace: float = 60.0) -> None:
        self.server = ChannelServer(host, port, tls, limits=Limits(grace=grace), config=SessionConfig(),
                                    on_stream=self._route, max_sessions=MAX_SESSIONS)
        self.waiting: list[Port] = []  # registered, oldest first
        self.bound: dict[str, Port] = {}  # session id -> the receiver that took it
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        """Listen. :raises OSError: it cannot."""
        return await self.server.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def slot(self, receiver: str) -> Slot:
        """Where receiver job ``receiver`` will take its session."""
        return Slot(self, receiver)

    def _route(self, stream: ChannelStream) -> None:
        port = self.bound.get(stream.session_id)
        if port is None:
            try:
                named = named_receiver(stream.name)
            except ValueError:
                self._refuse(stream, "this listener takes migrations only: the first stream must be a "
                                     "migration's control stream")
                return
            names = stream.peer_names
            waiting = [p for p in self.waiting
                       if p.session is None and (named is None or p.receiver == named)]
            if not waiting:
                what = f"receiver {named!r}" if named else "receiver"
                self._refuse(stream, f"no {what} is waiting for a migration here")
                log.warning("refused a session of %s: no %s waiting", names[0] if names else "?", what)
                return
            allowed = [p for p in waiting if p.peer in names]
            if not allowed:
                self._refuse(stream, f"{names[0] if names else 'this peer'} may not migrate into "
                                     f"{'receiver ' + repr(named) if named else 'any waiting receiver'} here")
                log.warning("refused a session of %s (certificate names %s): not the expected peer",
                            names[0] if names else "?", ", ".join(names) or "none")
                return
            port = allowed[0]
            port.session = stream.session_id
            self.bound[port.session] = port
            log.info("receiver %s took the session %s of %s", port.receiver, port.session[:8], port.peer)
        port.on_stream(stream)

    def _refuse(self, stream: ChannelStream, reason: str) -> None:
        """Refuse ``stream`` with ``reason``, then end its session (a refused peer holds no place)."""
        stream.refuse(reason)
        task = asyncio.get_running_loop().create_task(self.server.close_session(stream.session_id, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self.server.close()


@dataclass(frozen=True)
class Slot:
    """A receiver job's place on the shared listener (the daemon gives it to the job's runner)."""

    listener: SharedListener
    receiver: str

    def factory(self, peer: str) -> Callable[[Callable[[ChannelStream], None]], Port]:
        """A ``server_factory`` for ``run_target``: the receiver takes a session of ``peer``."""
        return lambda on_stream: Port(self.listener, self.receiver, peer, on_stream)


class Port:
    """One receiver's view of the shared listener: what ``run_target`` uses of a ChannelServer."""

    def __init__(self, listener: SharedListener, receiver: str, peer: str,
                 on_stream: Callable[[ChannelStream], None]) -> None:
        self.listener = listener
        self.receiver = receiver
        self.peer = peer
        self.on_stream = on_stream
        self.session: str | None = None
        self.limits = listener.server.limits

    async def start(self) -> tuple[str, int]:
        self.listener.waiting.append(self)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    def stats(self) -> dict[str, Any]:
        """The listener's statistics, with only this receiver's session."""
        out: dict[str, Any] = dict(self.listener.server.stats())
        sessions = out.get("sessions") or []
        mine = [s for s in sessions if isinstance(s, dict) and s.get("session_id") == self.session]
        out["sessions"] = mine if self.session else []
        return out

    async def close(self, reason: str = "the receiver ended", timeout: float = 2.0, **_: Any) -> bool:
        if self in self.listener.waiting:
            self.listener.waiting.remove(self)
        if self.session is not None:
            self.listener.bound.pop(self.session, None)
            await self.listener.server.close_session(self.session, reason, timeout)
        return True
