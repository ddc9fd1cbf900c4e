"""The channel's listening side: :class:`ChannelServer` accepts connections, hands each to an
:class:`~dataplane.channel.session.Acceptor` and drives every session that results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from dataplane.channel.acceptor import MAX_PENDING_HANDSHAKES, Acceptor, refusal
from dataplane.channel.addr import format_hostport
from dataplane.channel.connection import (
    LIVENESS_TIMEOUT,
    _ChannelConnection,
    describe_error,
    lost_reason,
    os_error_text,
)
from dataplane.channel.driver import DRAIN_TIMEOUT, _SessionDriver
from dataplane.channel.errors import (
    ChannelTimeout,
    LimitExceeded,
    StateError,
)
from dataplane.channel.events import (
    ConnectionClosed,
    Event,
)
from dataplane.channel.session import Limits, Session, SessionConfig
from dataplane.channel.stream import ChannelStream
from dataplane.channel.tls import (
    TLSConfig,
    peer_identity,
    server_context,
    warn_plaintext,
)
from dataplane.units import format_rate

__all__ = ["ChannelServer"]

log = logging.getLogger("dataplane.channel")

#: Recently ended sessions kept for the statistics.
KEEP_ENDED_SESSIONS = 16
#: Listen backlog of the channel's listening sockets.
BACKLOG = 256
#: Seconds after an error of accept() (out of file descriptors, ...) before accepting again.
ACCEPT_RETRY = 0.1


def _peer_text(addr: Any) -> str:
    return format_hostport(str(addr[0]), int(addr[1])) if isinstance(addr, tuple) else str(addr)


async def _listen_sockets(host: str | None, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address *host* resolves to (None: all
    interfaces), as ``loop.create_server`` makes them. Raises OSError (address in use, ...)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class _ServerConnection(_ChannelConnection):
    def __init__(self, server: ChannelServer) -> None:
        super().__init__(server.tls, server.liveness_timeout)
        self.server = server
        self._hs_timer: asyncio.TimerHandle | None = None
        self.in_tls = False  # counted in the listener's TLS handshakes until connection_made

    def tls_done(self) -> None:
        """Leave the listener's count of TLS handshakes (once)."""
        if self.in_tls:
            self.in_tls = False
            self.server._tls_handshakes -= 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tls_done()  # from here on it counts as pending in the acceptor
        if not self._setup(transport):
            return
        srv = self.server
        if srv.closing:
            cast(asyncio.Transport, transport).abort()
            return
        now = time.monotonic()
        try:
            self.handle = srv.acceptor.accept(self.identity, now)
        except LimitExceeded as exc:
            log.warning("refusing the connection from %s at once: %s", self.peer, exc.reason)
            tr = cast(asyncio.Transport, transport)
            tr.writelines(refusal(exc, srv.config.versions))
            self.failed = True
            self.close_transport()
            return
        srv.pending.add(self)
        loop = asyncio.get_running_loop()
        self._hs_timer = loop.call_later(max(0.0, self.handle.handshake_deadline - now), self._hs_tick)
        log.debug("connection from %s accepted", self.peer)
        self.flush()

    def _hs_tick(self) -> None:
        self._hs_timer = None
        h = self.handle
        if h is None or self.driver is not None or self.closing:
            return
        self.on_events(h.tick(max(time.monotonic(), h.handshake_deadline)))

    def on_events(self, events: list[Event]) -> None:
        h = self.handle
        if self.driver is None and h is not None and h.session is not None:
            if self._hs_timer is not None:
                self._hs_timer.cancel()
                self._hs_timer = None
            self.server.pending.discard(self)
            self.server.bind(self, h.session)
        if self.driver is None:
            for ev in events:
                if isinstance(ev, ConnectionClosed):
                    self.failed = ev.error is not None
                    if isinstance(ev.error, ChannelTimeout) and not self.got_bytes:  # idle: a probe?
                        log.info("closing connection from %s: no handshake within %g s (nothing received)",
                                 self.peer, self.server.limits.handshake_timeout)
                    else:
                        log.warning("closing connection from %s: %s", self.peer, describe_error(ev.error))
        super().on_events(events)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        self.server.pending.discard(self)
        drv = self.driver
        if drv is not None and not self.closing and not drv.session.terminated:
            log.warning("%s: connection from %s lost (%s)", drv.label, self.peer, lost_reason(exc))
        super().connection_lost(exc)


class ChannelServer:
    """The listening side: accepts connections (TLS or explicit plaintext) and drives their sessions.

    ``tls``: the listener's :class:`~dataplane.channel.tls.TLSConfig`; None
    requires ``plaintext=True`` (logged with :func:`warn_plaintext`).
    ``on_stream(stream)`` is called for every stream a peer opens: it must
    eventually call ``stream.accept(handler)`` or ``stream.refuse(reason)``
    (the peer opens its next stream only after that answer). ``bandwidth``:
    bytes/s cap of each session's sending (None: unlimited). ``max_pending``:
    connections that may be in their handshake at once, TLS's or the
    channel's (see :data:`~dataplane.channel.acceptor.MAX_PENDING_HANDSHAKES`);
    beyond it a new connection is refused at once, with a warning in the log.
    Raises ValueError for an inconsistent configuration.
    """

    def __init__(self, host: str, port: int, tls: TLSConfig | None, *, plaintext: bool = False,
                 limits: Limits | None = None, config: SessionConfig | None = None,
                 bandwidth: float | None = None, max_sessions: int = 64,
                 max_pending: int = MAX_PENDING_HANDSHAKES,
                 on_stream: Callable[[ChannelStream], None] | None = None,
                 liveness_timeout: float = LIVENESS_TIMEOUT) -> None:
        if tls is None and not plaintext:
            raise ValueError("a TLS configuration is required (or plaintext=True, explicitly)")
        if tls is not None and tls.plaintext:
            tls, plaintext = None, True
        self.host = host
        self.port = port
        self.tls = tls
        self.plaintext = plaintext
        self.limits = limits or Limits()
        self.config = config or SessionConfig()
        self.bandwidth = bandwidth
        self.on_stream = on_stream
        self.liveness_timeout = liveness_timeout
        self.acceptor = Acceptor(self.limits, self.config, max_sessions=max_sessions, max_pending=max_pending)
        self.sessions: dict[bytes, _SessionDriver] = {}
        self.ended: deque[dict[str, object]] = deque(maxlen=KEEP_ENDED_SESSIONS)
        self.pending: set[_ServerConnection] = set()
        self.closing = False
        self._ctx: ssl.SSLContext | None = None
        self._socks: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._wrapping: set[asyncio.Task[None]] = set()  # accepted sockets in their TLS handshake
        self._unwrapped: set[socket.socket] = set()  # accepted, not yet handed to the loop's transport
        self._tls_handshakes = 0  # accepted connections in their TLS handshake
        self._bound: tuple[str, int] | None = None
        self._started = time.time()

    async def start(self) -> tuple[str, int]:
        """Listen; return the bound ``(host, port)``. Raises OSError (address in use, ...), TLSConfigError.

        Connections are accepted here and each fresh socket is wrapped with
        ``loop.connect_accepted_socket(ssl=...)`` (never ``start_tls``: see
        security.md), so that a TLS handshake that does not complete within
        the handshake timeout is closed and logged with the peer's address.
        """
        loop = asyncio.get_running_loop()
        if self.tls is not None:
            self._ctx = server_context(self.tls, on_refusal=self._on_refusal)
        self._socks = await _listen_sockets(self.host or None, self.port)
        self._accepting = [loop.create_task(self._accept(sock)) for sock in self._socks]
        self._bound = None
        if self._ctx is None:
            warn_plaintext(log, f"every peer of {format_hostport(*self.address)}")
        return self.address

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self.closing:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:  # out of file descriptors, ...: the backlog keeps the peers waiting
                if self.closing:
                    return
                log.warning("cannot accept a connection: %s", os_error_text(exc))
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            proto = _ServerConnection(self)
            if self._ctx is not None:
                if self.handshaking >= self.acceptor.max_pending:
                    # no TLS yet, so no REFUSE: closed at once (a real client redials with backoff)
                    log.warning("refusing the connection from %s at once: %d connections are already in "
                                "their handshake", _peer_text(addr), self.acceptor.max_pending)
                    conn.close()
                    continue
                proto.in_tls = True
                self._tls_handshakes += 1
            self._unwrapped.add(conn)
            task = loop.create_task(self._wrap(conn, addr, proto))
            self._wrapping.add(task)
            task.add_done_callback(self._wrapping.discard)

    async def _wrap(self, conn: socket.socket, addr: Any, proto: _ServerConnection) -> None:
        """Give an accepted socket its protocol, after the TLS handshake for a TLS listener."""
        loop = asyncio.get_running_loop()
        self._unwrapped.discard(conn)  # the transport made below (before any await) owns and closes it
        if self._ctx is None:
            await loop.connect_accepted_socket(lambda: proto, conn)
            return
        timeout = self.limits.handshake_timeout
        peer = _peer_text(addr)
        try:
            # our own deadline (the loop's is a backstop): the loop closes the socket when it passes
            await asyncio.wait_for(loop.connect_accepted_socket(
                lambda: proto, conn, ssl=self._ctx, ssl_handshake_timeout=timeout + 5.0), timeout)
        except TimeoutError:
            log.info("closing connection from %s: no handshake within %g s (TLS)", peer, timeout)
        except (ssl.SSLError, OSError) as exc:  # a refusal (the context's hook logged why) or a reset
            log.debug("TLS with %s failed: %s", peer, exc)
        finally:
            proto.tls_done()

    @property
    def handshaking(self) -> int:
        """Connections in their handshake: in TLS's, or past it and their HELLO not bound yet (both count
        towards ``max_pending``)."""
        return self._tls_handshakes + self.acceptor.pending

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the host as given). Raises StateError before :meth:`start`."""
        if self._bound is None:
            if not self._socks or self._socks[0].fileno() < 0:
                raise StateError("the server is not listening")
            self._bound = (self.host, int(self._socks[0].getsockname()[1]))
        return self._bound

    @staticmethod
    def _on_refusal(reason: str, exc: BaseException) -> None:
        log.warning("refused a TLS connection: %s", reason)

    def bind(self, conn: _ServerConnection, session: Session) -> None:
        """A pending connection's HELLO bound it to *session* (new or joined)."""
        key = session.session_id or b""
        drv = self.sessions.get(key)
        if drv is None:
            who = conn.peer
            names: tuple[str, ...] = ()
            if self.tls is not None and conn.transport is not None:
                with contextlib.suppress(Exception):
                    ident = peer_identity(conn.transport)
                    names = tuple(ident.names)
                    who = f"{ident.names[0] if ident.names else '?'} at {conn.peer}"
            drv = _SessionDriver(session, role="server", peer=who, bandwidth=self.bandwidth,
                                 on_stream=self.on_stream, on_terminated=self._session_ended)
            drv.peer_names = names
            self.sessions[key] = drv
            log.info("%s opened by %s", drv.label, who)
            if self.plaintext:
                warn_plaintext(log, conn.peer)
        else:
            log.info("%s: connection from %s joined", drv.label, conn.peer)
        drv.add_connection(conn)

    def _session_ended(self, drv: _SessionDriver) -> None:
        key = drv.session.session_id or b""
        if self.sessions.get(key) is drv:
            del self.sessions[key]
        self.ended.append(drv.stats())

    def set_bandwidth(self, rate: float | None) -> None:
        """Cap each session's sending at *rate* bytes/s from now on (None: unlimited); new sessions too."""
        self.bandwidth = rate
        for drv in self.sessions.values():
            drv.set_bandwidth(rate)
        log.info("bandwidth cap per session: %s", format_rate(rate))

    def stats(self) -> dict[str, object]:
        """Statistics of every live session and of the last ended ones (see docs/channel.md)."""
        return {
            "role": "listen",
            "address": format_hostport(*self._bound) if self._bound else None,
            "time": time.time(),
            "uptime": time.time() - self._started,
            "bandwidth_limit": self.bandwidth,
            "pending_connections": len(self.pending),
            "tls_handshakes": self._tls_handshakes,
            "sessions": [d.stats() for d in self.sessions.values()] + list(self.ended),
        }

    async def close_session(self, session_id: str, reason: str, timeout: float = 2.0, *,
                            drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """End one session (hex id ``session_id``) as :meth:`close` ends each, gracefully; the
        listener and the other sessions go on. Nothing if there is no such session. Never raises."""
        drv = next((d for d in self.sessions.values() if d.session_hex == session_id), None)
        if drv is None:
            return
        await drv.drain(reason, drain_timeout)
        drv.close(reason)
        await drv.wait_closed(timeout)

    async def close(self, reason: str = "the listener is shutting down", timeout: float = 2.0, *,
                    graceful: bool = True, drain_timeout: float = DRAIN_TIMEOUT) -> bool:
        """Stop listening, close every session, and wait (up to *timeout* s) for the connections to go.

        *graceful* (the default): each session first delivers what was
        handed to it: no new data is taken, every stream is half-closed
        after its queued bytes, and the session ends (GOAWAY NO_ERROR) once
        the peer acknowledged every byte, or after *drain_timeout* seconds
        anyway, with a warning in the log (see
        :meth:`~dataplane.channel.session.Session.drain`); the sessions
        drain together. Otherwise at once: bytes not yet acknowledged are
        dropped (for aborts). Connections still in their handshake are
        aborted. Returns True if every session's peer acknowledged every
        byte. Never raises.
        """
        self.closing = True
        stopping = [*self._accepting, *self._wrapping]
        for task in stopping:  # stop accepting; TLS handshakes under way are given up
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        for sock in [*self._socks, *self._unwrapped]:
            sock.close()
        self._unwrapped.clear()
        self._tls_handshakes = 0
        for conn in list(self.pending):
            conn.abort()
        drivers = list(self.sessions.values())
        if graceful and drivers:
            await asyncio.gather(*(drv.drain(reason, drain_timeout) for drv in drivers))
        for drv in drivers:
            drv.close(reason)
        await asyncio.sleep(0)
        for drv in drivers:
            await drv.wait_closed(timeout)
        return all(drv.session.all_acknowledged for drv in drivers)


# =============================================================================== client
