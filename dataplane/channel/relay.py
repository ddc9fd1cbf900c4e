"""Relays between the channel's streams and local application sockets (unix or TCP).

* :class:`SourceRelay` (the dialing side, ``dataplane tunnel connect``):
  one local listener per stream name; every connection an application makes
  to it becomes a stream of that name. Streams are opened in the order the
  connections were accepted, each only after the previous one reached its
  target (QEMU multifd takes the first accepted connection as its main
  channel, so the order must survive the tunnel).
* :class:`DestinationRelay` (the listening side, ``dataplane tunnel
  listen``): a stream named NAME is connected to NAME's target, then
  accepted; an unknown name, or a target that cannot be reached, refuses
  the stream with the reason, and the source side closes the application's
  socket with a log line naming it.

Each application socket is joined to its stream by a :class:`Bridge`: full
duplex, half-close carried both ways (an application's EOF becomes the
stream's FIN and the peer's FIN becomes ``write_eof``), and back-pressure
both ways with bounded memory: reading from the application pauses while
the stream has no send credit, and received bytes give credit back to the
peer only once the application socket has taken them (the transport is not
above its high-water mark). A reset stream (by the peer, or because the
session failed after its grace period) closes the application socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping
from typing import cast

from dataplane.channel.addr import Endpoint
from dataplane.channel.client import ChannelClient
from dataplane.channel.connection import os_error_text
from dataplane.channel.errors import ChannelError, ErrorCode
from dataplane.channel.frames import Buffer
from dataplane.channel.stats import StreamStats
from dataplane.channel.stream import ChannelStream, StreamHandler

__all__ = ["Bridge", "DestinationRelay", "SourceRelay", "connect_endpoint", "listen_endpoint"]

log = logging.getLogger("dataplane.channel.relay")

#: Write-buffer watermarks of application sockets (bytes). Received stream bytes are credited back
#: to the peer as long as the application transport holds at most APP_WRITE_HIGH of them; beyond
#: that the transport is paused and the excess stays uncredited until it drains to APP_WRITE_LOW
#: (``resume_writing``). The low mark sits just below the high one, so a draining socket returns
#: credit every few hundred KiB, driven by the socket itself (no timer); a stalled application costs
#: at most APP_WRITE_HIGH plus the stream window.
APP_WRITE_HIGH = 4 << 20
APP_WRITE_LOW = APP_WRITE_HIGH - (512 << 10)
#: Largest read from an application socket (straight into the stream's send buffer).
APP_READ_MAX = 1 << 20
#: Private read buffer for bytes the stream cannot take yet (they wait, reading paused).
APP_SPILL = 64 << 10
#: Seconds an application socket closed because its stream was reset may take to drain before it is
#: aborted (an application that stopped reading must not pin the buffered bytes forever).
RESET_LINGER = 10.0
#: Seconds the destination waits for a target to accept a connection.
TARGET_CONNECT_TIMEOUT = 10.0


def _errtext(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return os_error_text(exc)
    return str(exc) or type(exc).__name__


async def connect_endpoint(ep: Endpoint, factory: Callable[[], asyncio.BaseProtocol],
                           timeout: float = TARGET_CONNECT_TIMEOUT) -> asyncio.BaseTransport:
    """Connect to *ep* (unix or TCP) with protocol *factory*; return the transport.

    Raises OSError (refused, no such file, ...) or TimeoutError after *timeout* seconds.
    """
    loop = asyncio.get_running_loop()
    if ep.kind == "unix":
        coro = loop.create_unix_connection(factory, ep.path)
    else:
        coro = loop.create_connection(factory, ep.host, ep.port)
    transport, _ = await asyncio.wait_for(coro, timeout)
    return transport


async def listen_endpoint(ep: Endpoint, factory: Callable[[], asyncio.BaseProtocol]) -> asyncio.Server:
    """Listen on *ep*; a stale unix socket file is replaced. Raises OSError (in use, not a socket, ...)."""
    loop = asyncio.get_running_loop()
    if ep.kind == "unix":
        try:
            st = os.stat(ep.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{ep.path} exists and is not a socket")
            os.unlink(ep.path)
        return await loop.create_unix_server(factory, ep.path, backlog=128)
    return await loop.create_server(factory, ep.host or None, ep.port, reuse_address=True, backlog=128)


class Bridge(asyncio.BufferedProtocol, StreamHandler):
    """One application socket joined to one channel stream (both directions, with back-pressure).

    It is the asyncio protocol of the application socket and the
    :class:`~dataplane.channel.stream.StreamHandler` of the stream.
    ``label`` names it in log lines. Reads from the application go
    straight into the stream's send buffer (``get_send_buffer``: no copy in
    Python), at most ``APP_READ_MAX`` bytes per read; only when the stream
    cannot take them (not accepted yet, no credit) they land in a small
    private buffer and wait as ``_pending`` while reading is paused.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.stream: ChannelStream | None = None
        self.is_open = False  # the stream was accepted: data may flow
        self._pending: Buffer | None = None  # application bytes the stream did not take yet
        self._app_eof = False
        self._fin_sent = False
        self._written = 0  # received stream bytes handed to the application transport
        self._credited = 0  # of those, credited back to the peer (``consumed``)
        self._closed = False  # we closed the application socket
        self._lost = False
        self._direct = False  # the last get_buffer came from the stream's send buffer
        self._spill: memoryview | None = None  # private read buffer when the stream cannot take bytes
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ---------------------------------------------------------------- the application socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        sock = tr.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tr.set_write_buffer_limits(high=APP_WRITE_HIGH, low=APP_WRITE_LOW)
        if not self.is_open:
            tr.pause_reading()  # nothing may be sent before the stream is accepted

    def get_buffer(self, sizehint: int) -> memoryview:
        st = self.stream
        if self._pending is None and self.is_open and st is not None and not self._closed:
            try:
                buf = st.get_send_buffer(APP_READ_MAX)
            except ChannelError:
                buf = None
            if buf:
                self._direct = True
                return buf
        self._direct = False
        if self._spill is None:
            self._spill = memoryview(bytearray(APP_SPILL))
        return self._spill

    def buffer_updated(self, nbytes: int) -> None:
        if not self._direct:
            assert self._spill is not None
            self.data_received(bytes(self._spill[:nbytes]))
            return
        self._direct = False
        st = self.stream
        assert st is not None
        try:
            left = st.send_buffer_updated(nbytes)
        except ChannelError as exc:
            self._stream_gone(exc)
            return
        if left <= 0 and self.transport is not None:
            self.transport.pause_reading()  # resumed by on_writable

    def data_received(self, data: bytes) -> None:
        if self._pending is not None or not self.is_open or self.stream is None:
            # reading is paused in these states; a read already under way is kept (one chunk)
            self._pending = data if self._pending is None else bytes(self._pending) + data
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self._push(data)

    def _push(self, data: Buffer) -> None:
        st = self.stream
        assert st is not None
        try:
            n = st.send(data)
        except ChannelError as exc:
            self._stream_gone(exc)
            return
        if n < len(data):
            self._pending = memoryview(data)[n:]
            if self.transport is not None:
                self.transport.pause_reading()
        else:
            self._pending = None

    def _stream_gone(self, exc: ChannelError) -> None:
        """The stream refused more bytes (reset or closed): drop what is pending, close the application."""
        self._pending = None
        self.close_app(f"the stream takes no more data ({exc})", logging.INFO)

    def eof_received(self) -> bool:
        self._app_eof = True
        if self._pending is None:
            self._send_fin()
        return True  # keep the socket open: the other direction may still carry data

    def _send_fin(self) -> None:
        st = self.stream
        if self._fin_sent or not self.is_open or st is None:
            return
        self._fin_sent = True
        with contextlib.suppress(ChannelError):
            st.close()

    def pause_writing(self) -> None:
        pass  # the bytes above the high-water mark stay uncredited (see _settle)

    def resume_writing(self) -> None:
        self._settle()  # drained to the low-water mark: credit everything

    def _settle(self) -> None:
        """Credit the peer for the received bytes, except those queued above the high-water mark."""
        tr = self.transport
        st = self.stream
        if st is None:
            return
        if tr is None or self._lost:
            target = self._written  # nowhere to go any more: do not hold the peer's credit
        else:
            target = self._written - max(0, tr.get_write_buffer_size() - APP_WRITE_HIGH)
        if target > self._credited:
            n = target - self._credited
            self._credited = target
            with contextlib.suppress(ChannelError):
                st.consumed(n)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self.done.done():
            self.done.set_result(None)
        if self._closed:
            return
        st = self.stream
        if st is not None and st.state in ("queued", "opening", "pending", "open"):
            why = f"failed: {_errtext(exc)}" if exc is not None else "was closed"
            log.info("%s: the application connection %s; resetting the stream", self.label, why)
            st.reset(f"application connection {why}", ErrorCode.CANCEL)

    def close_app(self, reason: str | None = None, level: int = logging.INFO, *,
                  linger: float | None = None) -> None:
        """Close the application socket after its queued output, logging *reason* if given.

        With *linger*, abort the socket if it has not drained after that many seconds.
        """
        if self._closed:
            return
        self._closed = True
        if reason:
            log.log(level, "%s: closing the application connection: %s", self.label, reason)
        tr = self.transport
        if tr is not None and not self._lost:
            tr.close()
            if linger is not None:
                handle = asyncio.get_running_loop().call_later(linger, tr.abort)
                self.done.add_done_callback(lambda _f: handle.cancel())

    # ---------------------------------------------------------------- the stream

    def on_accepted(self, stream: ChannelStream) -> None:
        self.is_open = True
        if self._closed or self._lost or self.transport is None:
            return
        if self._pending is not None:
            data, self._pending = self._pending, None
            self._push(data)
        if self._pending is None:
            if self._app_eof:
                self._send_fin()
            else:
                self.transport.resume_reading()

    def on_refused(self, stream: ChannelStream, code: int, reason: str) -> None:
        if code == ErrorCode.REFUSED:
            self.close_app(f"the listener refused stream {stream.name!r}: {reason}", logging.WARNING)
        else:
            self.close_app(f"stream {stream.name!r} could not be opened: {reason}", logging.WARNING)

    def on_data(self, stream: ChannelStream, data: Buffer) -> None:
        tr = self.transport
        self._written += len(data)
        if tr is not None and not self._closed and not self._lost:
            tr.write(data)
        self._settle()

    def on_eof(self, stream: ChannelStream) -> None:
        tr = self.transport
        if tr is not None and not self._closed and not self._lost and tr.can_write_eof():
            tr.write_eof()

    def on_writable(self, stream: ChannelStream) -> None:
        if self._pending is not None:
            data, self._pending = self._pending, None
            self._push(data)
        if self._pending is None and self.transport is not None and not self._closed:
            if self._app_eof:
                self._send_fin()
            else:
                self.transport.resume_reading()

    def on_reset(self, stream: ChannelStream, code: int, reason: str, remote: bool) -> None:
        if self._closed or self._lost:
            return
        who = "by the peer" if remote else "locally"
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = str(code)
        quiet = code in (ErrorCode.NO_ERROR, ErrorCode.CANCEL)
        self.close_app(f"stream reset {who} ({name}): {reason or 'the session was closed'}",
                       logging.INFO if quiet else logging.WARNING, linger=RESET_LINGER)

    def on_closed(self, stream: ChannelStream, stats: StreamStats) -> None:
        log.debug("%s: finished (%d bytes sent, %d received)", self.label, stats.bytes_sent,
                  stats.bytes_received)
        self.close_app()


# =============================================================================== the two relays


class DestinationRelay:
    """The listening side: connects each stream named NAME to ``forwards[NAME]``, then accepts it.

    Pass :meth:`on_stream` as ``on_stream`` of a
    :class:`~dataplane.channel.server.ChannelServer`. A stream with an
    unknown name, or whose target does not accept within
    ``connect_timeout`` seconds, is refused with the reason (the source
    side closes its application socket and logs it).
    """

    def __init__(self, forwards: Mapping[str, Endpoint], *,
                 connect_timeout: float = TARGET_CONNECT_TIMEOUT) -> None:
        self.forwards = dict(forwards)
        self.connect_timeout = connect_timeout
        self.bridges: set[Bridge] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def on_stream(self, stream: ChannelStream) -> None:
        """Stream-open callback: refuse an unknown name, else connect its target in the background."""
        ep = self.forwards.get(stream.name)
        if ep is None:
            known = ", ".join(sorted(self.forwards)) or "nothing"
            reason = f"no forward named {stream.name!r} on this listener (it forwards {known})"
            log.warning("session %s: refusing stream %s: %s", stream.session_id[:8], stream.sid, reason)
            stream.refuse(reason)
            return
        task = asyncio.get_running_loop().create_task(self._connect(stream, ep))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, stream: ChannelStream, ep: Endpoint) -> None:
        label = f"stream {stream.sid} {stream.name!r} -> {ep}"
        bridge = Bridge(label)
        try:
            await connect_endpoint(ep, lambda: bridge, self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            reason = f"cannot connect to {ep}: {_errtext(exc)}"
            log.warning("session %s: refusing stream %s %r: %s", stream.session_id[:8], stream.sid,
                        stream.name, reason)
            with contextlib.suppress(ChannelError):
                stream.refuse(reason)
            return
        bridge.stream = stream
        try:
            stream.accept(bridge)
        except ChannelError as exc:
            bridge.close_app(f"the stream ended while its target was being connected ({exc})")
            return
        self.bridges.add(bridge)
        bridge.done.add_done_callback(lambda _f: self.bridges.discard(bridge))
        log.info("session %s: %s connected", stream.session_id[:8], label)
        bridge.on_accepted(stream)

    async def close(self) -> None:
        """Cancel target connections in progress and close every application socket."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for bridge in list(self.bridges):
            bridge.close_app()


class _SourceBridge(Bridge):
    def __init__(self, relay: SourceRelay, name: str, number: int, ep: Endpoint) -> None:
        super().__init__(f"{name} connection #{number} on {ep}")
        self.relay = relay
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        relay = self.relay
        relay.bridges.add(self)
        self.done.add_done_callback(lambda _f: relay.bridges.discard(self))
        try:
            self.stream = relay.client.open_stream(self.name, self)
        except (ChannelError, RuntimeError) as exc:
            self.close_app(f"the channel is not available ({exc})", logging.WARNING)
            return
        log.info("%s: accepted, opening stream %r", self.label, self.name)

    def on_accepted(self, stream: ChannelStream) -> None:
        log.debug("%s: stream %s accepted by the listener", self.label, stream.sid)
        super().on_accepted(stream)


class SourceRelay:
    """The dialing side: a local listener per name in ``exposes``; each connection becomes a stream.

    Streams go out in the order their connections were accepted (the
    client opens the next one only after the previous one was answered).
    """

    def __init__(self, client: ChannelClient, exposes: Mapping[str, Endpoint]) -> None:
        self.client = client
        self.exposes = dict(exposes)
        self.servers: dict[str, asyncio.Server] = {}
        self.bridges: set[Bridge] = set()
        self._counts: dict[str, int] = {}

    async def start(self) -> None:
        """Open every local listener. Raises OSError naming the endpoint (then nothing is left listening)."""
        try:
            for name, ep in self.exposes.items():
                try:
                    self.servers[name] = await listen_endpoint(ep, self._factory(name, ep))
                except OSError as exc:
                    raise OSError(f"cannot listen on {ep} for {name!r}: {_errtext(exc)}") from exc
                log.info("exposing stream %r on %s", name, ep)
        except BaseException:
            await self.close()
            raise

    def _factory(self, name: str, ep: Endpoint) -> Callable[[], asyncio.BaseProtocol]:
        def make() -> asyncio.BaseProtocol:
            self._counts[name] = self._counts.get(name, 0) + 1
            return _SourceBridge(self, name, self._counts[name], ep)
        return make

    async def close(self) -> None:
        """Stop listening (removing unix socket files) and close every application socket."""
        for server in self.servers.values():
            server.close()
        for bridge in list(self.bridges):
            bridge.close_app()
        for name, server in self.servers.items():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
            ep = self.exposes[name]
            if ep.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(ep.path)
        self.servers.clear()
