"""The listener before the channel handshake, over real loopback sockets: what a connection may send
before its HELLO is bound to a session, and how many may wait for that at once.

An in-process :class:`ChannelServer` (plaintext, and mutual TLS for the connection cap) and raw
clients that speak the wire format by hand.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator

import pytest

from dataplane.certs import CertSet, init_certs
from dataplane.channel.errors import ErrorCode
from dataplane.channel.frames import (
    HEADER_SIZE,
    PREFACE_SIZE,
    FrameDecoder,
    FrameType,
    HelloParams,
    decode_preface,
    encode_preface,
    frame_bytes,
)
from dataplane.channel.server import ChannelServer
from dataplane.channel.session import Limits
from dataplane.channel.tls import TLSConfig, client_context

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return init_certs(tmp_path_factory.mktemp("pki"))


class Raw:
    """A hand-driven client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, tls: TLSConfig | None = None) -> Raw:
        ctx: ssl.SSLContext | None = client_context(tls) if tls is not None else None
        hostname = tls.peer_name if tls is not None else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self, timeout: float = 5.0) -> bytes:
        """Everything the listener sent until it closed the connection (TimeoutError if it did not)."""
        got = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except (ConnectionResetError, ssl.SSLError):
                    break
                if not chunk:
                    break
                got += chunk
        return bytes(got)

    def close(self) -> None:
        self.writer.transport.abort()


def frames_of(wire: bytes) -> list[tuple[int, int, bytes]]:
    """(type, aux, payload) of the frames after the listener's preface."""
    assert len(wire) >= PREFACE_SIZE, wire
    decode_preface(wire[:PREFACE_SIZE])
    return [(f.type, f.aux, bytes(f.payload)) for f in FrameDecoder(MiB).feed(wire[PREFACE_SIZE:])]


async def wait_pending(server: ChannelServer, n: int, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while server.acceptor.pending != n:
            await asyncio.sleep(0.01)


@pytest.fixture
async def plain() -> AsyncIterator[ChannelServer]:
    server = ChannelServer("127.0.0.1", 0, None, plaintext=True, max_pending=2)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def logged(caplog: pytest.LogCaptureFixture, pattern: str, level: int) -> logging.LogRecord:
    rx = re.compile(pattern)
    hits = [r for r in caplog.records if rx.search(r.getMessage())]
    assert hits, f"no /{pattern}/ in {[r.getMessage() for r in caplog.records]}"
    assert hits[0].levelno == level, hits[0]
    return hits[0]


# ====================================================================== what may come before the handshake


async def test_a_data_frame_before_the_hello_closes_the_connection_unread(plain, caplog):
    """A DATA header claiming 1 MiB, sent instead of the HELLO: refused from the header alone."""
    caplog.set_level(logging.INFO, logger="dataplane.channel")
    port = plain.address[1]
    raw = await Raw.open(port)
    head = frame_bytes(FrameType.DATA, bytes(MiB), stream_id=1, aux=MiB)[:HEADER_SIZE]
    await raw.send(encode_preface() + head)  # and not one byte of the payload
    wire = await raw.until_closed()
    raw.close()
    assert frames_of(wire) == []  # the preface, then the connection is gone
    logged(caplog, r"closing connection from 127\.0\.0\.1:\d+: unexpected DATA frame during the handshake "
                   r"\(expected HELLO\) \(PROTOCOL\)", logging.WARNING)
    await wait_pending(plain, 0)


async def test_frames_after_the_hello_before_our_welcome_close_the_connection(plain, caplog):
    caplog.set_level(logging.INFO, logger="dataplane.channel")
    raw = await Raw.open(plain.address[1])
    await raw.send(encode_preface() + frame_bytes(FrameType.HELLO, HelloParams().pack())
                   + frame_bytes(FrameType.PING))
    wire = await raw.until_closed()
    raw.close()
    assert FrameType.WELCOME not in [t for t, _, _ in frames_of(wire)]
    logged(caplog, r"unexpected PING frame during the handshake \(expected nothing before our answer\)",
           logging.WARNING)
    assert plain.acceptor.sessions == []


async def test_an_oversized_handshake_frame_closes_the_connection(plain, caplog):
    caplog.set_level(logging.INFO, logger="dataplane.channel")
    raw = await Raw.open(plain.address[1])
    head = bytearray(frame_bytes(FrameType.HELLO, HelloParams().pack())[:HEADER_SIZE])
    head[4:8] = (4096).to_bytes(4, "big")  # a HELLO of 4 KiB: above the 80 bytes it has, and 1 KiB
    await raw.send(encode_preface() + bytes(head))
    await raw.until_closed()
    raw.close()
    logged(caplog, r"closing connection from 127\.0\.0\.1:\d+: .*\(FRAME_SIZE\)", logging.WARNING)


# ====================================================================== how many may wait


@pytest.mark.parametrize("mode", ["plaintext", "tls"])
async def test_connections_beyond_the_pending_cap_are_refused_at_once(mode, pki, caplog):
    caplog.set_level(logging.INFO, logger="dataplane.channel")
    tls = pki.server_config() if mode == "tls" else None
    ctls = pki.client_config() if mode == "tls" else None
    server = ChannelServer("127.0.0.1", 0, tls, plaintext=tls is None, max_pending=2)
    port = (await server.start())[1]
    waiting = []
    try:
        for _ in range(2):  # two connections that never send their HELLO
            raw = await Raw.open(port, ctls)
            await raw.send(encode_preface())
            waiting.append(raw)
        await wait_pending(server, 2)
        t0 = asyncio.get_running_loop().time()
        if mode == "tls":  # no TLS for it, hence no REFUSE: closed at once
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await Raw.open(port, ctls)
        else:
            third = await Raw.open(port, ctls)
            wire = await third.until_closed()  # closed at once, without our sending anything
            third.close()
            ((ftype, aux, reason),) = frames_of(wire)
            assert (ftype, aux) == (FrameType.REFUSE, ErrorCode.LIMIT)
            assert reason == b"2 connections are already in their handshake"
        assert asyncio.get_running_loop().time() - t0 < 2.0
        logged(caplog, r"refusing the connection from 127\.0\.0\.1:\d+ at once: "
                       r"2 connections are already in their handshake", logging.WARNING)
        assert server.acceptor.pending == 2 and server.stats()["pending_connections"] == 2
        # one of the two goes away: a new connection is taken again, and completes its handshake
        waiting.pop().close()
        await wait_pending(server, 1)
        fresh = await Raw.open(port, ctls)
        await fresh.send(encode_preface() + frame_bytes(FrameType.HELLO, HelloParams().pack()))
        got = await fresh.reader.readexactly(PREFACE_SIZE + HEADER_SIZE + 80)
        assert frames_of(got)[0][0] == FrameType.WELCOME
        await wait_pending(server, 1)
        fresh.close()
    finally:
        for raw in waiting:
            raw.close()
        await server.close()


async def test_tls_handshakes_under_way_count_towards_the_cap(pki, caplog):
    """TCP connections that never start TLS hold their place too: a TLS client beyond the cap is
    closed before its TLS handshake, with the warning; once they are gone it gets in."""
    caplog.set_level(logging.INFO, logger="dataplane.channel")
    server = ChannelServer("127.0.0.1", 0, pki.server_config(), max_pending=2,
                           limits=Limits(handshake_timeout=1.5))
    port = (await server.start())[1]
    try:
        idle = [await Raw.open(port) for _ in range(2)]  # plain TCP: they never send a ClientHello
        async with asyncio.timeout(5):
            while server.handshaking != 2:
                await asyncio.sleep(0.01)
        assert server.stats()["tls_handshakes"] == 2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await Raw.open(port, pki.client_config())  # closed at once: the TLS handshake fails
        logged(caplog, r"refusing the connection from 127\.0\.0\.1:\d+ at once: 2 connections are already "
                       r"in their handshake", logging.WARNING)
        for raw in idle:
            raw.close()
        async with asyncio.timeout(5):
            while server.handshaking:
                await asyncio.sleep(0.01)
        ok = await Raw.open(port, pki.client_config())
        await ok.send(encode_preface() + frame_bytes(FrameType.HELLO, HelloParams().pack()))
        got = await ok.reader.readexactly(PREFACE_SIZE + HEADER_SIZE + 80)
        assert frames_of(got)[0][0] == FrameType.WELCOME
        ok.close()
    finally:
        await server.close()


def test_a_listener_caps_pending_handshakes_by_default() -> None:
    from dataplane.channel.acceptor import MAX_PENDING_HANDSHAKES

    assert ChannelServer("127.0.0.1", 0, None, plaintext=True).acceptor.max_pending == MAX_PENDING_HANDSHAKES


# ====================================================================== idle connections


async def test_idle_plaintext_connection_is_closed_with_an_info_line(caplog):
    caplog.set_level(logging.INFO, logger="dataplane.channel")
    server = ChannelServer("127.0.0.1", 0, None, plaintext=True, limits=Limits(handshake_timeout=1.0))
    port = (await server.start())[1]
    try:
        raw = await Raw.open(port)  # connects, sends nothing
        t0 = asyncio.get_running_loop().time()
        await raw.until_closed(timeout=5)
        raw.close()
        assert 0.8 < asyncio.get_running_loop().time() - t0 < 3.0
        local = raw.writer.get_extra_info("sockname")
        rec = logged(caplog, rf"closing connection from 127\.0\.0\.1:{local[1]}: no handshake within 1 s "
                             r"\(nothing received\)", logging.INFO)
        assert "TIMEOUT" not in rec.getMessage()
    finally:
        await server.close()


@pytest.mark.parametrize("tls_done", [False, True], ids=["no-tls-handshake", "tls-then-silence"])
async def test_idle_tls_connection_is_closed_with_an_info_line(tls_done, pki, caplog):
    """A TCP connection to a TLS listener that never starts TLS used to be closed by the loop after
    10 s without a word; one that completes TLS and then sends nothing is timed by the channel."""
    caplog.set_level(logging.INFO, logger="dataplane.channel")
    server = ChannelServer("127.0.0.1", 0, pki.server_config())  # the default handshake timeout
    assert server.limits.handshake_timeout == 10.0
    port = (await server.start())[1]
    try:
        raw = await Raw.open(port, pki.client_config() if tls_done else None)
        local = raw.writer.get_extra_info("sockname")
        t0 = asyncio.get_running_loop().time()
        await raw.until_closed(timeout=15)
        raw.close()
        assert 9.5 < asyncio.get_running_loop().time() - t0 < 12.0
        why = "nothing received" if tls_done else "TLS"
        logged(caplog, rf"closing connection from 127\.0\.0\.1:{local[1]}: no handshake within 10 s "
                       rf"\({why}\)", logging.INFO)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "closing" in r.getMessage()]
    finally:
        await server.close()
