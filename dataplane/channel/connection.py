"""One TCP/TLS connection of a channel session as an :class:`asyncio.BufferedProtocol` (the base of the
client's and the server's), and the socket helpers around it: tuning, peer labels, loss reasons."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, Any, cast

from dataplane.channel.addr import format_hostport
from dataplane.channel.errors import (
    ChannelError,
)
from dataplane.channel.events import (
    Event,
)
from dataplane.channel.session import ConnectionHandle
from dataplane.channel.tls import (
    TLSConfig,
    describe_tls_error,
    peer_fingerprint,
)

if TYPE_CHECKING:
    from dataplane.channel.driver import _SessionDriver

__all__ = ["lost_reason", "os_error_text", "tune_socket"]

log = logging.getLogger("dataplane.channel")

#: Seconds after which a silently cut connection is declared dead by the kernel (TCP_USER_TIMEOUT,
#: and keepalive probes on an idle connection).
LIVENESS_TIMEOUT = 5.0
#: Transport write-buffer watermarks of channel connections (bytes).
WRITE_HIGH = 4 << 20
WRITE_LOW = 1 << 20
#: The link counts as the bottleneck (adaptive compression on) while bytes wait in the transport,
#: while at least this many wait unsent in the kernel's send queue, while TCP has a full congestion
#: window in flight, or while the connection moved less than COMPRESSOR_RATE over the last
#: RATE_WINDOW seconds (bytes acknowledged by the peer): then the network, not us, sets the pace,
#: and compressing costs no time.
BACKLOG_BYTES = 64 << 10
#: Bytes/s the page codec compresses text-like data at on one core of a modest machine (LZ4 at
#: acceleration 1 measured 365-420 MB/s on the 2-core development VM): a link slower than this
#: cannot outrun the compressor.
COMPRESSOR_RATE = 300e6
RATE_WINDOW = 0.2
#: ``struct tcp_info`` (linux/tcp.h): the prefix we read and the offsets of the fields we use.
_TCP_INFO_LEN = 152
# struct tcp_info (<linux/tcp.h>): tcpi_unacked at 24, tcpi_snd_cwnd at 80, tcpi_bytes_acked at 120,
# tcpi_notsent_bytes at 144
_TCPI_FIELDS = struct.Struct("<24xI52xI36xQ16xI")
#: Bytes pulled from the core per ``buffers_to_send`` call.
PULL_BATCH = 1 << 20
#: Smallest pull while paced (a frame is cut anyway, the bucket absorbs the difference).
PACED_MIN_PULL = 64 << 10
#: A transport we closed is aborted if it has not finished flushing after this many seconds.
CLOSE_LINGER = 5.0
#: The same for a connection closed because of an error whose last frame is still queued.
ERROR_LINGER = 1.0



def tune_socket(sock: Any, liveness_timeout: float = LIVENESS_TIMEOUT) -> None:
    """Set TCP_NODELAY, keepalive and TCP_USER_TIMEOUT on a channel socket; never raises.

    A connection whose peer vanished silently (a cut link: no RST, no FIN)
    is then reported dead by the kernel after about *liveness_timeout*
    seconds: unacknowledged data times out (TCP_USER_TIMEOUT) and an idle
    connection is probed (keepalive after ``liveness_timeout / 3`` idle
    seconds, every second).
    """
    opts = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", 4), max(1, int(liveness_timeout / 3))),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", 5), 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", 6), max(1, int(liveness_timeout))),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), int(liveness_timeout * 1000)),
    ]
    for level, opt, value in opts:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(level, opt, value)


def peer_label(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_hostport(str(peer[0]), int(peer[1]))
    return str(peer) if peer else "?"


def lost_reason(exc: BaseException | None) -> str:
    """Words for why an established connection ended (the ``exc`` of ``connection_lost``). Never raises."""
    if exc is None:
        return "closed by the peer"
    if isinstance(exc, ssl.SSLError):
        return describe_tls_error(exc)
    if isinstance(exc, OSError):
        if exc.errno == errno.ETIMEDOUT:
            return "the peer stopped answering (timed out: is the link cut?)"
        if exc.errno == errno.ECONNRESET:
            return "reset by the peer"
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"the peer is unreachable ({exc.strerror})"
        return os_error_text(exc)
    return f"{type(exc).__name__}: {exc}"


def os_error_text(exc: OSError) -> str:
    """The system's words for an OSError (``Address already in use``), else its message. Never raises."""
    if exc.errno:
        with contextlib.suppress(ValueError, OverflowError):
            return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def describe_error(error: ChannelError | None) -> str:
    if error is None:
        return "closed in an orderly way"
    text = error.reason or type(error).__name__
    return f"{text} ({error.code.name})"


# =============================================================================== streams


class _ChannelConnection(asyncio.BufferedProtocol):
    """One TCP/TLS connection of a session (base of the client and server flavours)."""

    def __init__(self, tls: TLSConfig | None, liveness_timeout: float) -> None:
        self.tls = tls
        self.liveness_timeout = liveness_timeout
        self.transport: asyncio.Transport | None = None
        self.handle: ConnectionHandle | None = None
        self.driver: _SessionDriver | None = None
        self.peer = "?"
        self.identity = ""
        self.paused = False
        self.ready = False
        self.got_bytes = False
        self.closing = False
        self.failed = False  # closed because of an error: stop reading, abort soon
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._sock: Any = None  # the transport's TCP socket, for the kernel's send-queue depth (TCP_INFO)
        self._rate: float | None = None  # bytes/s the peer acknowledged over the last RATE_WINDOW
        self._rate_at: float | None = None
        self._rate_acked = 0
        self._sink = memoryview(bytearray(64 * 1024))
        self._abort_handle: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- asyncio callbacks

    def _setup(self, transport: asyncio.BaseTransport) -> bool:
        """Common connection_made work; False if the peer identity cannot be read (transport aborted)."""
        tr = self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        self.peer = peer_label(tr)
        sock = tr.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock, self.liveness_timeout)
            self._sock = sock
        tr.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        if self.tls is not None:
            try:
                self.identity = peer_fingerprint(tr)
            except (ssl.SSLError, TypeError) as exc:
                log.warning("connection from %s has no usable TLS identity: %s", self.peer, exc)
                tr.abort()
                return False
        return True

    def get_buffer(self, sizehint: int) -> memoryview:
        h = self.handle
        if h is None or self.closing:
            return self._sink
        return h.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        h = self.handle
        if h is None or self.closing or nbytes <= 0:
            return
        self.got_bytes = True
        self.on_events(h.buffer_updated(nbytes, time.monotonic()))

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.driver is not None:
            self.driver.kick()
        else:
            self.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        if self._abort_handle is not None:
            self._abort_handle.cancel()
        h = self.handle
        drv = self.driver
        if h is not None:
            events = h.connection_lost(time.monotonic())
            if drv is not None:
                drv.remove_connection(self)
                drv.handle_events(events)
                drv.kick()
        if not self.lost.done():
            self.lost.set_result(exc)

    # ---------------------------------------------------------------- driving

    def on_events(self, events: list[Event]) -> None:
        drv = self.driver
        if drv is not None:
            drv.handle_events(events)
            drv.kick()
        else:
            self.flush()

    def flush(self) -> None:
        """Write what the core has for this connection while the transport takes it (paced)."""
        tr = self.transport
        h = self.handle
        if tr is None or h is None or self.closing or tr.is_closing():
            return
        drv = self.driver
        bucket = drv.bucket if drv is not None else None
        now = time.monotonic()
        while not self.paused or h.closed:
            budget = PULL_BATCH
            if bucket is not None and bucket.rate:
                avail = bucket.available(now)
                if avail <= 0:
                    budget = 0  # in debt: ACKs and control frames only
                    assert drv is not None
                    drv.pace_after(-avail / bucket.rate)
                else:
                    budget = min(budget, max(int(avail), PACED_MIN_PULL))
            h.set_send_backlog(self._backlogged(tr))
            bufs = h.buffers_to_send(budget)
            if not bufs:
                break
            tr.writelines(bufs)
            if bucket is not None and bucket.rate:
                bucket.take(sum(map(len, bufs)), now)
            if budget == 0 or h.closed:
                break
        if h.closed:
            self.close_transport()

    def _backlogged(self, tr: asyncio.Transport) -> bool:
        """Whether the network sets our pace: output queued in the transport, BACKLOG_BYTES unsent in
        the kernel, a full congestion window in flight, or a delivery rate the compressor can keep up
        with (``TCP_INFO``)."""
        queued = tr.get_write_buffer_size()
        if queued > 0 or self._sock is None:
            return queued > 0
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except (OSError, ValueError):
            self._sock = None  # not a TCP socket (or closed): the transport's queue alone decides
            return False
        if len(info) < _TCP_INFO_LEN:
            self._sock = None
            return False
        unacked, cwnd, acked, notsent = _TCPI_FIELDS.unpack_from(info)
        now = time.monotonic()
        if self._rate_at is None:
            self._rate_at, self._rate_acked = now, acked
        elif now - self._rate_at >= RATE_WINDOW:
            self._rate = (acked - self._rate_acked) / (now - self._rate_at)
            self._rate_at, self._rate_acked = now, acked
        return (notsent >= BACKLOG_BYTES or (cwnd > 0 and unacked >= cwnd)
                or (self._rate is not None and self._rate < COMPRESSOR_RATE))

    def close_transport(self) -> None:
        """Close after the queued output is flushed; abort if that takes longer than the linger time.

        A connection that failed (:attr:`failed`: bad input, a refusal) is aborted as soon as its last
        frame (GOAWAY, REFUSE) is in the kernel: a graceful TLS shutdown would go on reading, and
        discarding, whatever a hostile peer keeps sending.
        """
        tr = self.transport
        if tr is None or self.closing:
            return
        self.closing = True
        if self.failed and tr.get_write_buffer_size() == 0:
            tr.abort()
            return
        tr.close()
        linger = ERROR_LINGER if self.failed else CLOSE_LINGER
        self._abort_handle = asyncio.get_running_loop().call_later(linger, tr.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.lost.done():
            self.transport.abort()
