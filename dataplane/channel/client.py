"""The channel's dialing side: :class:`ChannelClient` keeps N connections of one session up,
redialling each lost one with backoff until the session's grace period runs out."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

from dataplane.aio import first_done
from dataplane.channel.addr import format_hostport
from dataplane.channel.connection import (
    LIVENESS_TIMEOUT,
    _ChannelConnection,
    describe_error,
    lost_reason,
    tune_socket,
)
from dataplane.channel.driver import DRAIN_TIMEOUT, _SessionDriver
from dataplane.channel.errors import (
    AuthError,
    ChannelError,
    ConnectError,
    GraceExpired,
    LimitExceeded,
    SessionClosedError,
    StateError,
)
from dataplane.channel.events import (
    HandshakeComplete,
)
from dataplane.channel.session import Limits, Session, SessionConfig
from dataplane.channel.stream import ChannelStream, StreamHandler
from dataplane.channel.tls import (
    TLSConfig,
    client_context,
    describe_tls_error,
    warn_plaintext,
)
from dataplane.units import format_rate

__all__ = ["ChannelClient"]

log = logging.getLogger("dataplane.channel")


class _ClientConnection(_ChannelConnection):
    def __init__(self, client: ChannelClient, slot: int) -> None:
        super().__init__(client.tls, client.liveness_timeout)
        self.client = client
        self.slot = slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._setup(transport):
            return
        drv = self.client.driver
        assert drv is not None
        try:
            self.handle = drv.session.connect(time.monotonic(), self.identity)
        except AuthError:
            log.error("the listener at %s presents another certificate than when the session started; "
                      "dropping this connection", self.client.target)
            cast(asyncio.Transport, transport).abort()
            return
        except (SessionClosedError, LimitExceeded) as exc:
            log.debug("connection %s not used: %s", self.slot, exc)
            cast(asyncio.Transport, transport).abort()
            return
        self.driver = drv
        drv.add_connection(self)
        drv.kick()


# =============================================================================== session driver


class ChannelClient:
    """The dialing side: one session over ``connections`` TCP/TLS connections to ``host:port``.

    Every lost connection is redialled with exponential backoff (from
    ``backoff_min`` doubling to ``backoff_max`` seconds) while the session
    lives; with no connection for the grace period (``limits.grace``) the
    core resets every stream and the session ends (:attr:`done` resolves
    with :class:`~dataplane.channel.errors.GraceExpired`). Streams are
    opened with :meth:`open_stream`, one at a time in call order.
    Raises ValueError for an inconsistent configuration.
    """

    def __init__(self, host: str, port: int, tls: TLSConfig | None, *, plaintext: bool = False,
                 connections: int = 1, limits: Limits | None = None, config: SessionConfig | None = None,
                 bandwidth: float | None = None, on_stream: Callable[[ChannelStream], None] | None = None,
                 connect_timeout: float = 3.0, backoff_min: float = 0.05, backoff_max: float = 2.0,
                 liveness_timeout: float = LIVENESS_TIMEOUT) -> None:
        if tls is None and not plaintext:
            raise ValueError("a TLS configuration is required (or plaintext=True, explicitly)")
        if tls is not None and tls.plaintext:
            tls, plaintext = None, True
        self.limits = limits or Limits()
        if not 1 <= connections <= self.limits.max_connections:
            raise ValueError(f"connections must be in 1..{self.limits.max_connections}, got {connections}")
        self.host = host
        self.port = port
        self.target = format_hostport(host, port)
        self.tls = tls
        self.plaintext = plaintext
        self.connections = connections
        self.config = config or SessionConfig()
        self.bandwidth = bandwidth
        self.on_stream = on_stream
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.liveness_timeout = liveness_timeout
        self.driver: _SessionDriver | None = None
        self._ctx: ssl.SSLContext | None = None
        self._slots: list[asyncio.Task[None]] = []
        self._fatal: asyncio.Future[ChannelError] | None = None
        self._established: asyncio.Future[None] | None = None
        self._last_error: str | None = None
        self._closing = False
        self._lost_at: float | None = None

    # ---------------------------------------------------------------- life cycle

    async def start(self, ready_timeout: float | None = None) -> None:
        """Dial the connections and wait until the session is established.

        Then waits up to *ready_timeout* seconds (default: the handshake
        timeout) for all ``connections`` to be ready; the rest keep being
        dialled in the background. Raises :class:`ConnectError` with a
        readable reason (TLS refusal, certificate problem, no listener
        within the grace period, refusal by the listener), TLSConfigError.
        """
        loop = asyncio.get_running_loop()
        if self._slots:
            raise StateError("the client is already started")
        if self.tls is not None:
            self._ctx = client_context(self.tls)
        else:
            warn_plaintext(log, self.target)
        self._ensure_driver()
        assert self.driver is not None and self._fatal is not None and self._established is not None
        self._slots = [asyncio.create_task(self._slot(k + 1)) for k in range(self.connections)]
        self.driver.kick()
        waiters: list[asyncio.Future[Any]] = [self._established, self._fatal, self.driver.terminated]
        await first_done(*waiters)
        if not self._established.done() or self.driver.terminated.done():
            if self._fatal.done():
                err: ChannelError = self._fatal.result()
            else:
                cause = self.driver.error
                detail = describe_error(cause) if cause is not None else "the session ended"
                if isinstance(cause, GraceExpired) and self._last_error:
                    detail = f"no connection within the grace period; last error: {self._last_error}"
                err = ConnectError(f"cannot connect to {self.target}: {detail}")
            await self._shutdown(abort=True)
            raise err
        wait = ready_timeout if ready_timeout is not None else self.limits.handshake_timeout
        deadline = loop.time() + wait
        while self.ready_connections < self.connections and loop.time() < deadline and not self.done.done():
            await asyncio.sleep(0.01)

    def _ensure_driver(self) -> _SessionDriver:
        if self.driver is None:
            loop = asyncio.get_running_loop()
            session = Session.client(time.monotonic(), limits=self.limits, config=self.config)
            self.driver = _SessionDriver(session, role="client", peer=self.target, bandwidth=self.bandwidth,
                                         on_stream=self.on_stream, on_ready=self._on_ready,
                                         on_terminated=self._on_terminated)
            self._fatal = loop.create_future()
            self._established = loop.create_future()
        return self.driver

    @property
    def done(self) -> asyncio.Future[ChannelError | None]:
        """Resolves when the session ends: None (orderly close) or the error. RuntimeError before start."""
        if self.driver is None:
            raise StateError("the client is not started")
        return self.driver.terminated

    @property
    def ready_connections(self) -> int:
        """Connections that completed their handshake and carry data now."""
        return self.driver.session.ready_connections if self.driver is not None else 0

    @property
    def session_id(self) -> str:
        """Hex id of the session ('' before it is established)."""
        return self.driver.session_hex if self.driver is not None else ""

    def open_stream(self, name: str, handler: StreamHandler) -> ChannelStream:
        """Queue a stream named *name* (opened after the previous one was answered); events go to *handler*.

        May be called before :meth:`start` (the stream waits for the
        session). Raises SessionClosedError if the session ended.
        """
        return self._ensure_driver().open_stream(name, handler)

    def set_bandwidth(self, rate: float | None) -> None:
        """Cap the session's sending at *rate* bytes/s from now on (None: unlimited)."""
        self.bandwidth = rate
        if self.driver is not None:
            self.driver.set_bandwidth(rate)
        log.info("bandwidth cap: %s", format_rate(rate))

    def stats(self) -> dict[str, object]:
        """Statistics of the session and its streams (see docs/channel.md)."""
        return {
            "role": "connect",
            "address": self.target,
            "time": time.time(),
            "connections_wanted": self.connections,
            "bandwidth_limit": self.bandwidth,
            "sessions": [self.driver.stats()] if self.driver is not None else [],
        }

    async def close(self, reason: str = "the dialer is shutting down", timeout: float = 2.0, *,
                    graceful: bool = True, drain_timeout: float = DRAIN_TIMEOUT) -> bool:
        """Close the session, then the connections (waiting up to *timeout* s for them to go).

        *graceful* (the default): first deliver what was handed to the
        session: no new data is taken, every stream is half-closed after its
        queued bytes, and the session ends (GOAWAY NO_ERROR) once the
        listener acknowledged every byte, or after *drain_timeout* seconds
        anyway, with a warning in the log (see
        :meth:`~dataplane.channel.session.Session.drain`). Otherwise, or if
        the session is not established, at once: bytes not yet acknowledged
        are dropped (for aborts). Returns True if the listener acknowledged
        every byte handed to the session. Never raises.
        """
        drv = self.driver
        if graceful and drv is not None and drv.session.established and not drv.session.terminated:
            await drv.drain(reason, drain_timeout)
        await self._shutdown(abort=False, reason=reason, timeout=timeout)
        return drv.session.all_acknowledged if drv is not None else True

    async def _shutdown(self, *, abort: bool, reason: str = "", timeout: float = 2.0) -> None:
        self._closing = True
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        drv = self.driver
        if drv is None:
            return
        if abort:
            for conn in list(drv.conns.values()):
                conn.abort()
        drv.close(reason or "closed")
        await asyncio.sleep(0)
        await drv.wait_closed(timeout)

    # ---------------------------------------------------------------- connections

    def _on_ready(self, conn: _ChannelConnection, ev: HandshakeComplete) -> None:
        assert self._established is not None
        slot = conn.slot if isinstance(conn, _ClientConnection) else "?"
        if not self._established.done():
            self._established.set_result(None)
            log.info("session %s established with %s", self.session_id[:8], self.target)
        elif self._lost_at is not None:
            log.info("session %s: connection %s to %s re-established after %.1f s (%d of %d up)",
                     self.session_id[:8], slot, self.target, time.monotonic() - self._lost_at,
                     self.ready_connections, self.connections)
        if self.ready_connections >= self.connections:
            self._lost_at = None

    def _on_terminated(self, drv: _SessionDriver) -> None:
        for task in self._slots:
            if task is not asyncio.current_task():
                task.cancel()

    def _set_fatal(self, err: ChannelError) -> None:
        assert self._fatal is not None
        if not self._fatal.done():
            self._fatal.set_result(err)

    async def _dial(self, slot: int) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {self.host}")
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setblocking(False)
            tune_socket(sock, self.liveness_timeout)
            await asyncio.wait_for(loop.sock_connect(sock, addr), self.connect_timeout)
            conn = _ClientConnection(self, slot)
            hs = self.limits.handshake_timeout
            server_hostname = self.tls.peer_name if self.tls is not None else None
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, sock=sock, ssl=self._ctx,
                                       server_hostname=server_hostname,
                                       ssl_handshake_timeout=hs if self._ctx else None), hs + 1.0)
        except BaseException:
            sock.close()
            raise
        return conn

    async def _slot(self, slot: int) -> None:
        """Keep one connection of the session up: dial, wait until it is lost, redial with backoff."""
        drv = self.driver
        assert drv is not None
        delay = 0.0
        while not self._closing and not drv.session.terminated:
            if delay:
                await asyncio.sleep(delay)
                if self._closing or drv.session.terminated:
                    return
            try:
                conn = await self._dial(slot)
            except asyncio.CancelledError:
                raise
            except ssl.SSLCertVerificationError as exc:
                reason = describe_tls_error(exc, self.tls)
                if not drv.session.established:
                    self._set_fatal(ConnectError(f"TLS to {self.target} failed: {reason}"))
                    return
                self._note_failure(slot, reason)
                delay = self._backoff(delay)
                continue
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    reason = f"no answer within {self.connect_timeout:g} s"
                else:
                    reason = describe_tls_error(exc, self.tls)
                self._note_failure(slot, reason)
                delay = self._backoff(delay)
                continue
            lost = await conn.lost
            was_ready = conn.ready
            if self._closing or drv.session.terminated:
                return
            if not drv.session.established and not conn.got_bytes and conn.handle is not None:
                why = describe_tls_error(lost or EOFError(), self.tls) if self.tls is not None else (
                    "the listener closed the connection before the channel handshake (is it a TLS listener?)")
                self._set_fatal(ConnectError(f"{self.target} refused the connection: {why}"))
                return
            reason = lost_reason(lost)
            if was_ready:
                if self._lost_at is None:
                    self._lost_at = time.monotonic()
                log.warning("session %s: connection %s to %s lost (%s); reconnecting", self.session_id[:8],
                            slot, self.target, reason)
                delay = 0.0
            else:
                self._note_failure(slot, reason)
                delay = self._backoff(delay)

    def _note_failure(self, slot: int, reason: str) -> None:
        first = self._last_error is None
        self._last_error = reason
        established = self.driver is not None and self.driver.session.established
        if not established and first:
            # The peer may simply not listen yet (its pod is starting): say so once, and for how long.
            log.warning("cannot reach %s yet (%s); retrying for up to %g s (the grace period)", self.target,
                        reason, self.limits.grace)
            return
        level = logging.WARNING if established else logging.INFO
        log.log(level, "connection %s to %s failed: %s", slot, self.target, reason)

    def _backoff(self, delay: float) -> float:
        return min(self.backoff_max, max(self.backoff_min, delay * 2))
