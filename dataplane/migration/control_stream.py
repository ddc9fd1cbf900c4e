"""The control stream as an asyncio message queue, for either side of a migration or a resolve.

The messages and their encoding are :mod:`dataplane.migration.control` (sans-IO); this module
binds them to a :class:`~dataplane.channel.stream.ChannelStream`, with bounded queues both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from dataplane.channel.errors import ChannelError
from dataplane.channel.frames import Buffer
from dataplane.channel.stream import ChannelStream, StreamHandler

from .control import ControlDecoder, Message, encode
from .errors import ControlError, ControlLost

log = logging.getLogger(__name__)

#: Most control messages queued unread; more is a peer flooding the conversation.
MAX_INBOX = 64
#: Most bytes of control messages queued unsent.
MAX_OUTBOX = 4 << 20

__all__ = ["MAX_INBOX", "MAX_OUTBOX", "ControlStream"]


class ControlStream(StreamHandler):
    """The control stream as an asyncio message queue (either side).

    Outgoing messages are buffered until the stream is open and while it
    has no credit; incoming ones are decoded (bounded) and queued. A message
    leaves the queue only in the same step as it is handed to a caller, so
    cancelling a waiter never loses one.
    """

    def __init__(self) -> None:
        self.stream: ChannelStream | None = None
        self.decoder = ControlDecoder()
        self._inbox: deque[Message] = deque()
        self._arrived = asyncio.Event()  # set while a message is queued or the stream is lost
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._out = bytearray()
        self._closed = False

    # -- application side

    def send(self, msg: Message) -> None:
        """Queue one message (sent as soon as the stream allows). Never raises for a dead stream; a
        peer that takes nothing for :data:`MAX_OUTBOX` bytes loses the stream."""
        if len(self._out) > MAX_OUTBOX:
            self.reset(f"the peer took no control message for {len(self._out)} bytes")
            return
        self._out += encode(msg)
        self._flush()

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until a message is queued or the stream is lost; cancelling it consumes nothing.

        :raises TimeoutError: neither within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no control message within {timeout:g} s") from None

    def poll(self) -> Message | None:
        """The next queued message, or None when none is queued yet.

        :raises ControlLost: none is queued and the stream ended.
        """
        if self._inbox:
            msg = self._inbox.popleft()
            if not self._inbox and not self.lost.done():
                self._arrived.clear()
            return msg
        if self.lost.done():
            raise ControlLost(f"control stream lost: {self.lost.result()}")
        return None

    def unread(self, msg: Message) -> None:
        """Put ``msg`` back at the head of the queue (for the next :meth:`recv`)."""
        self._inbox.appendleft(msg)
        self._arrived.set()

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message.

        :raises ControlLost: the stream ended before one arrived.
        :raises TimeoutError: none within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while (msg := self.poll()) is None:
            await self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return msg

    async def drain(self, timeout: float = 3.0) -> None:
        """End the conversation: hand every queued message to the channel, half-close, and wait for
        the peer to close its half (so that closing the session cannot drop the last message).
        Bounded by ``timeout`` seconds; never raises."""
        deadline = time.monotonic() + timeout
        while self._out and not self.lost.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.stream is not None and not self._closed:
            self._closed = True
            with contextlib.suppress(ChannelError):  # already reset: nothing to close
                self.stream.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), max(0.0, deadline - time.monotonic()))

    def reset(self, reason: str) -> None:
        """Abort the stream (e.g. on garbage from the peer)."""
        if self.stream is not None:
            self.stream.reset(reason)
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        self._arrived.set()

    def _flush(self) -> None:
        if self.stream is None or not self._out or self.lost.done():
            return
        try:
            n = self.stream.send(bytes(self._out))
        except ChannelError as exc:
            self._lose(f"cannot send: {exc}")
            return
        del self._out[:n]

    # -- StreamHandler

    def on_accepted(self, stream: ChannelStream) -> None:
        self.stream = stream
        self._flush()

    def attach(self, stream: ChannelStream) -> None:
        """Accept a control stream the peer opened."""
        self.stream = stream
        stream.accept(self)
        self._flush()

    def on_refused(self, stream: ChannelStream, code: int, reason: str) -> None:
        self._lose(f"refused by the destination: {reason}")

    def on_data(self, stream: ChannelStream, data: Buffer) -> None:
        n = len(memoryview(data))
        try:
            msgs = self.decoder.feed(data)
        except ControlError as exc:
            log.warning("control stream: %s; closing it", exc)
            self.reset(str(exc))
            return
        if len(self._inbox) + len(msgs) > MAX_INBOX:
            log.warning("control stream: more than %d messages unread; closing it", MAX_INBOX)
            self.reset(f"more than {MAX_INBOX} control messages unread")
            return
        stream.consumed(n)
        if msgs:
            self._inbox.extend(msgs)
            self._arrived.set()

    def on_eof(self, stream: ChannelStream) -> None:
        self._lose("the peer closed the control stream")

    def on_writable(self, stream: ChannelStream) -> None:
        self._flush()

    def on_reset(self, stream: ChannelStream, code: int, reason: str, remote: bool) -> None:
        self._lose(reason or "reset")

    def on_closed(self, stream: ChannelStream, stats: Any) -> None:
        self._lose("closed")
