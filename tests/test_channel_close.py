"""Closing a session over real loopback sockets: a graceful close delivers what was handed to the
session just before it (both ends), an abrupt one does not, and a drain that cannot finish ends
after its timeout with a warning.

An in-process :class:`ChannelServer` and :class:`ChannelClient` (plaintext on 127.0.0.1); the
sender is paced by a bandwidth cap so that the bytes are still queued when the close begins.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from dataplane.channel.client import ChannelClient
from dataplane.channel.frames import Buffer
from dataplane.channel.server import ChannelServer
from dataplane.channel.stream import ChannelStream, StreamHandler

MiB = 1 << 20
RATE = 20e6  # bytes/s: 6 MiB take about 0.2 s to leave after the bucket's burst (100 ms worth)


class Collector(StreamHandler):
    """Keeps what arrives, credits it at once, and notes the end of the stream."""

    def __init__(self, send: bytes = b"") -> None:
        self.data = bytearray()
        self.send = send
        self.accepted = asyncio.Event()
        self.eof = asyncio.Event()

    def on_accepted(self, stream: ChannelStream) -> None:
        self.accepted.set()

    def on_data(self, stream: ChannelStream, data: Buffer) -> None:
        self.data += data
        stream.consumed(len(data))

    def on_eof(self, stream: ChannelStream) -> None:
        self.eof.set()


@dataclass
class Ends:
    server: ChannelServer
    client: ChannelClient
    remote: list[tuple[ChannelStream, Collector]] = field(default_factory=list)


async def ends(server_rate: float | None = None, client_rate: float | None = None,
               reply: bytes = b"") -> Ends:
    remote: list[tuple[ChannelStream, Collector]] = []

    def on_stream(stream: ChannelStream) -> None:
        handler = Collector()
        stream.accept(handler)
        remote.append((stream, handler))
        if reply:
            assert stream.send(reply) == len(reply)  # handed over at once (within the credit)

    server = ChannelServer("127.0.0.1", 0, None, plaintext=True, bandwidth=server_rate, on_stream=on_stream)
    port = (await server.start())[1]
    client = ChannelClient("127.0.0.1", port, None, plaintext=True, connections=2, bandwidth=client_rate)
    await client.start()
    return Ends(server, client, remote)


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Ends]]:
    made: list[Ends] = []
    yield made
    for e in made:
        await e.client.close(graceful=False)
        await e.server.close(graceful=False)


async def open_and_send(e: Ends, data: bytes) -> tuple[ChannelStream, Collector]:
    mine = Collector()
    stream = e.client.open_stream("bulk", mine)
    await asyncio.wait_for(mine.accepted.wait(), 5)
    assert stream.send(data) == len(data)
    return stream, mine


async def test_client_graceful_close_delivers_the_bytes_sent_just_before(cleanup):
    data = random.Random(1).randbytes(6 * MiB + 11)
    e = await ends(client_rate=RATE)
    cleanup.append(e)
    await open_and_send(e, data)
    t0 = asyncio.get_running_loop().time()
    assert await e.client.close() is True  # graceful by default
    assert asyncio.get_running_loop().time() - t0 > 0.1  # it did wait for the bytes to leave
    (_, got), = e.remote
    assert bytes(got.data) == data and got.eof.is_set()
    assert e.client.done.done() and e.client.done.result() is None


async def test_abrupt_close_drops_what_is_still_queued(cleanup):
    data = random.Random(2).randbytes(6 * MiB)
    e = await ends(client_rate=RATE)
    cleanup.append(e)
    await open_and_send(e, data)
    assert await e.client.close(graceful=False) is False
    await asyncio.sleep(0.1)
    (_, got), = e.remote
    assert len(got.data) < len(data)


async def test_server_graceful_close_delivers_the_bytes_sent_just_before(cleanup):
    reply = random.Random(3).randbytes(6 * MiB + 5)
    e = await ends(server_rate=RATE, reply=reply)
    cleanup.append(e)
    _, mine = await open_and_send(e, b"hello")
    assert e.remote and len(mine.data) < len(reply)  # still on its way when the close begins
    assert await e.server.close() is True
    assert bytes(mine.data) == reply and mine.eof.is_set()
    assert e.client.done.done() and e.client.done.result() is None  # an orderly end, seen from the client


async def test_drain_that_cannot_finish_closes_after_its_timeout_with_a_warning(cleanup, caplog):
    caplog.set_level(logging.INFO, logger="dataplane.channel")
    e = await ends()
    cleanup.append(e)
    stream, _ = await open_and_send(e, b"x")
    await asyncio.sleep(0.1)
    for drv in e.server.sessions.values():  # the listener stops reading: nothing more is acknowledged
        for conn in drv.conns.values():
            assert conn.transport is not None
            conn.transport.pause_reading()
    assert stream.send(random.Random(4).randbytes(4 * MiB)) == 4 * MiB
    t0 = asyncio.get_running_loop().time()
    assert await e.client.close(drain_timeout=0.5) is False
    assert 0.4 < asyncio.get_running_loop().time() - t0 < 3.0
    (warn,) = [r for r in caplog.records if "graceful close timed out" in r.getMessage()]
    assert warn.levelno == logging.WARNING
    assert re.search(r"graceful close timed out: 4194304 bytes( and 1 control frame)? not acknowledged by "
                     r"the peer; closed anyway$", warn.getMessage()), warn.getMessage()
