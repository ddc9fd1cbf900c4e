"""End to end: ``dataplane tunnel connect`` and ``tunnel listen`` in two network namespaces.

The two tunnel ends run as processes in the two namespaces of a
:class:`~dataplane.testing.netns.Link` (side A: ``tunnel connect``, the
source cluster; side B: ``tunnel listen``, the destination). The
applications are asyncio code in this process: they reach the tunnel's
unix sockets directly (path-based unix sockets are not scoped by network
namespace) and TCP endpoints through sockets created inside the matching
namespace. Every transfer is checked byte for byte (SHA-256 on both sides).

What is covered: integrity over GiBs (TLS with 4 striped connections, and
plaintext), concurrent full-duplex streams with half-close both ways, the
order of connections (k-th accepted at the source = k-th connected at the
target), every connection of a session severed mid-transfer (identical
byte stream after reconnecting), a link cut beyond the grace period (both
applications see their sockets close, both ends report it), a stalled
receiver (bounded memory in both tunnel processes), compression statistics,
the bandwidth cap, and refused streams (unknown name, unreachable target).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dataplane.certs import CertSet, init_certs
from dataplane.testing.netns import FaultProxy, Link

pytestmark = pytest.mark.e2e

MiB = 1 << 20
GiB = 1 << 30
READY = re.compile(r"dataplane: tunnel (?:listening on|connected to) (\S+):(\d+)")


# ====================================================================== tunnel processes


@dataclass
class Tunnel:
    """One ``dataplane tunnel`` process: its Popen, stderr log, stats file and announced port."""

    proc: subprocess.Popen[bytes]
    log: Path
    stats_path: Path
    port: int = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_kib(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {key} for pid {self.proc.pid}")

    def stats(self) -> dict[str, Any]:
        return json.loads(self.stats_path.read_text())

    async def wait_log(self, pattern: str, timeout: float = 20.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text())
            if m:
                return m.group(0)
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                raise AssertionError(f"tunnel exited ({rc}) before /{pattern}/:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no /{pattern}/ after {timeout} s:\n{self.text()}")
            await asyncio.sleep(0.02)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"tunnel still running after {timeout} s:\n{self.text()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return await self.wait_exit(timeout)


async def start_tunnel(link: Link, side: str, args: list[str], workdir: Path, name: str) -> Tunnel:
    """Start ``dataplane tunnel ARGS`` in *side*'s namespace; wait for its ready line."""
    log = workdir / f"{name}.log"
    stats = workdir / f"{name}.json"
    with log.open("wb") as err:
        proc = link.popen(side, [sys.executable, "-m", "dataplane", "--log-level", "info", "tunnel", *args,
                                 "--stats-json", str(stats)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    t = Tunnel(proc, log, stats)
    line = await t.wait_log(READY.pattern)
    m = READY.search(line)
    assert m is not None
    t.port = int(m.group(2))
    return t


@dataclass
class Pair:
    """A listen end in B and a connect end in A."""

    listen: Tunnel
    connect: Tunnel

    async def stop(self) -> tuple[int, int]:
        rc_c = await self.connect.stop()
        rc_l = await self.listen.stop()
        return rc_c, rc_l


def tls_args(pki: CertSet | None, side: str) -> list[str]:
    if pki is None:
        return ["--plaintext", "--plaintext-network-is-isolated"]  # the namespaces' veth reaches no one else
    return ["--certs", str(pki.directory)]


async def start_pair(link: Link, workdir: Path, pki: CertSet | None, *, forwards: dict[str, str],
                     exposes: dict[str, str], listen_extra: list[str] = (), connect_extra: list[str] = (),
                     to: str | None = None) -> Pair:
    largs = ["listen", "--bind", f"{link.addr_b}:0", *tls_args(pki, "server"), *listen_extra]
    for name, target in forwards.items():
        largs += ["--forward", f"{name}={target}"]
    listen = await start_tunnel(link, "b", largs, workdir, "listen")
    cargs = ["connect", "--to", to or f"{link.addr_b}:{listen.port}", *tls_args(pki, "client"),
             *connect_extra]
    for name, ep in exposes.items():
        cargs += ["--expose", f"{name}={ep}"]
    try:
        connect = await start_tunnel(link, "a", cargs, workdir, "connect")
    except BaseException:
        await listen.stop()
        raise
    return Pair(listen, connect)


# ====================================================================== applications
#
# Applications are blocking sockets served by threads (recv_into, sendall and hashlib release the
# GIL, so they keep up with the tunnel); async tests call them through asyncio.to_thread.


class Block:
    """A 16 MiB random block repeated to make long streams without generating GiBs."""

    def __init__(self, seed: int, size: int = 16 * MiB) -> None:
        self.seed = seed
        self.data = random.Random(seed).randbytes(size)

    def pieces(self, total: int, chunk: int = 4 * MiB) -> Iterator[memoryview]:
        mv = memoryview(self.data)
        off = 0
        left = total
        while left > 0:
            n = min(chunk, left, len(mv) - off)
            yield mv[off:off + n]
            off = (off + n) % len(mv)
            left -= n

    def digest(self, total: int) -> str:
        key = (self.seed, len(self.data), total)
        if key not in _DIGESTS:
            h = hashlib.sha256()
            for p in self.pieces(total):
                h.update(p)
            _DIGESTS[key] = h.hexdigest()
        return _DIGESTS[key]


_DIGESTS: dict[tuple[int, int, int], str] = {}


@dataclass
class Received:
    """What one application connection at the target got (filled by its thread)."""

    index: int
    nbytes: int = 0
    digest: str = ""
    head: bytes = b""
    eof: bool = False
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def recv_all(conn: socket.socket, rec: Received, keep_head: int = 8) -> None:
    """Read to EOF, hashing; keep the first *keep_head* bytes."""
    h = hashlib.sha256()
    buf = bytearray(4 * MiB)
    mv = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        if len(rec.head) < keep_head:
            rec.head += bytes(mv[:keep_head - len(rec.head)])
        h.update(mv[:n])
        rec.nbytes += n
    rec.eof = True
    rec.digest = h.hexdigest()


def hashing_handler(conn: socket.socket, rec: Received) -> None:
    """Read to EOF, then answer with the hex SHA-256 of what arrived (the return path after a FIN)."""
    recv_all(conn, rec)
    conn.sendall(rec.digest.encode())


class Sink:
    """An application server (unix socket, or TCP inside a namespace); a thread per connection.

    ``conns`` lists the connections in the order they were accepted.
    """

    def __init__(self, handler: Callable[[socket.socket, Received], None] = hashing_handler) -> None:
        self.handler = handler
        self.conns: list[Received] = []
        self.sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        self._stop = False

    def start_unix(self, path: str) -> str:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        return self._serve(f"unix:{path}")

    def start_tcp(self, link: Link, side: str) -> str:
        with link.in_netns(side):
            self.sock = socket.create_server(("127.0.0.1", 0))
        return self._serve(f"tcp:127.0.0.1:{self.sock.getsockname()[1]}")

    def _serve(self, ep: str) -> str:
        assert self.sock is not None
        self.sock.listen(64)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return ep

    def _accept(self) -> None:
        assert self.sock is not None
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            rec = Received(len(self.conns) + 1)
            self.conns.append(rec)
            self._open.append(conn)
            t = threading.Thread(target=self._run, args=(conn, rec), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, conn: socket.socket, rec: Received) -> None:
        try:
            self.handler(conn, rec)
        except OSError as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            rec.done.set()
            with contextlib.suppress(OSError):
                conn.close()

    async def wait(self, n: int, timeout: float = 60.0) -> list[Received]:
        """Wait until *n* connections were accepted and finished."""
        deadline = time.monotonic() + timeout
        while len(self.conns) < n or not all(c.done.is_set() for c in self.conns[:n]):
            if time.monotonic() > deadline:
                raise AssertionError(f"sink: {len(self.conns)} connections, finished "
                                     f"{[c.done.is_set() for c in self.conns]}, waited for {n}")
            await asyncio.sleep(0.02)
        return self.conns[:n]

    def close(self) -> None:
        self._stop = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()


def connect_app(ep: str, link: Link | None = None, side: str = "a", timeout: float = 10.0) -> socket.socket:
    """A blocking application socket connected to *ep* (``unix:PATH`` or ``tcp:127.0.0.1:PORT`` in *side*)."""
    kind, _, rest = ep.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(rest)
    else:
        host, _, port = rest.rpartition(":")
        assert link is not None
        with link.in_netns(side):
            sock = socket.socket()
        sock.settimeout(timeout)
        sock.connect((host, int(port)))
    sock.settimeout(None)
    return sock


def push(sock: socket.socket, block: Block, total: int, *, shutdown: bool = True,
         progress: Callable[[int], None] | None = None) -> None:
    """Send *total* bytes of *block*, then half-close (blocking)."""
    sent = 0
    for piece in block.pieces(total):
        sock.sendall(piece)
        sent += len(piece)
        if progress is not None:
            progress(sent)
    if shutdown:
        sock.shutdown(socket.SHUT_WR)


def read_to_eof(sock: socket.socket, timeout: float = 60.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        b = sock.recv(1 << 20)
        if not b:
            return bytes(out)
        out += b


# ====================================================================== fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return init_certs(tmp_path_factory.mktemp("pki") / "pki")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="dp-e2e-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def session_of(doc: dict[str, Any]) -> dict[str, Any]:
    sessions = doc["sessions"]
    assert sessions, doc
    return sessions[-1]


def streams_by_name(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for sess in doc["sessions"]:
        for st in sess["streams"]:
            out.setdefault(st["name"], []).append(st)
    return out


# ====================================================================== bulk integrity


async def test_two_gib_over_tls_with_four_connections(link, pki, sockdir, sink, tmp_path, capsys):
    """2 x 1 GiB concurrently through mutual TLS striped over 4 connections, hashes compared."""
    target = sink.start_unix(str(sockdir / "dst.sock"))
    pair = await start_pair(link, tmp_path, pki, forwards={"ram": target},
                            exposes={"ram": f"unix:{sockdir}/src.sock"}, connect_extra=["--connections", "4"])
    assert "(4 connections)" in pair.connect.text()
    blocks = [Block(1), Block(2)]
    size = GiB

    def one(k: int) -> str:
        sock = connect_app(f"unix:{sockdir}/src.sock")
        with sock:
            push(sock, blocks[k], size)
            return read_to_eof(sock, 120).decode()

    t0 = time.monotonic()
    both = asyncio.gather(asyncio.to_thread(one, 0), asyncio.to_thread(one, 1))
    answers = await asyncio.wait_for(both, 240)
    dt = time.monotonic() - t0
    got = await sink.wait(2)
    expected = {blocks[0].digest(size), blocks[1].digest(size)}
    assert {c.digest for c in got} == expected
    assert set(answers) == expected  # each digest came back over its stream after the half-close
    assert all(c.nbytes == size for c in got)
    with capsys.disabled():
        print(f"\n  e2e mTLS over veth, 4 connections: {2 * size / dt / 1e6:.0f} MB/s (2 x 1 GiB)")
    assert await pair.stop() == (0, 0), pair.connect.text() + pair.listen.text()
    stats = session_of(pair.connect.stats())
    assert stats["bytes_sent"] == 2 * size
    assert stats["connections_opened"] == 4


async def test_plaintext_half_gib(link, sockdir, sink, tmp_path, capsys):
    target = sink.start_unix(str(sockdir / "dst.sock"))
    pair = await start_pair(link, tmp_path, None, forwards={"ram": target},
                            exposes={"ram": f"unix:{sockdir}/src.sock"})
    assert "PLAINTEXT channel" in pair.listen.text() and "PLAINTEXT channel" in pair.connect.text()
    block = Block(3)
    size = 512 * MiB

    def run() -> str:
        with connect_app(f"unix:{sockdir}/src.sock") as sock:
            push(sock, block, size)
            return read_to_eof(sock).decode()

    t0 = time.monotonic()
    answer = await asyncio.to_thread(run)
    dt = time.monotonic() - t0
    (got,) = await sink.wait(1)
    assert answer == got.digest == block.digest(size)
    with capsys.disabled():
        print(f"\n  e2e plaintext over veth, 1 connection: {size / dt / 1e6:.0f} MB/s")
    assert await pair.stop() == (0, 0)


# ====================================================================== streams: duplex, half-close, order


def duplex_handler(conn: socket.socket, rec: Received) -> None:
    """Read an 8-byte header (index, back size), then send the back stream while reading to EOF;
    after both, send the SHA-256 of everything received and close (half-close both ways)."""
    head = b""
    while len(head) < 8:
        b = conn.recv(8 - len(head))
        if not b:
            raise ConnectionError("no header")
        head += b
    index, back = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
    rec.head = head
    writer = threading.Thread(target=push, args=(conn, Block(100 + index, MiB), back),
                              kwargs={"shutdown": False})
    writer.start()
    h = hashlib.sha256(head)
    buf = bytearray(MiB)
    while n := conn.recv_into(buf):
        h.update(memoryview(buf)[:n])
        rec.nbytes += n
    rec.eof = True
    writer.join()
    rec.digest = h.hexdigest()
    conn.sendall(bytes.fromhex(rec.digest))


async def test_concurrent_full_duplex_streams_with_half_close(link, pki, sockdir, tmp_path):
    """Six streams at once, data both ways at the same time; each side half-closes independently."""
    sink = Sink(duplex_handler)
    try:
        target = sink.start_unix(str(sockdir / "dst.sock"))
        pair = await start_pair(link, tmp_path, pki, forwards={"mig": target},
                                exposes={"mig": f"unix:{sockdir}/src.sock"},
                                connect_extra=["--connections", "2"])
        rng = random.Random(7)
        plans = [(k, rng.randint(1, 24) * MiB + rng.randint(0, 4095), rng.choice([0, 1, 5, 17]) * MiB + k)
                 for k in range(1, 7)]

        def client(k: int, fwd: int, back: int) -> tuple[bytes, str]:
            with connect_app(f"unix:{sockdir}/src.sock") as sock:
                head = k.to_bytes(4, "big") + back.to_bytes(4, "big")
                data = Block(k, MiB)
                h = hashlib.sha256(head)
                for p in data.pieces(fwd):
                    h.update(p)
                sock.sendall(head)
                sender = threading.Thread(target=push, args=(sock, data, fwd))  # then SHUT_WR
                sender.start()
                got = read_to_eof(sock, 60)
                sender.join()
                return got, h.hexdigest()

        results = await asyncio.wait_for(asyncio.gather(
            *(asyncio.to_thread(client, k, fwd, back) for k, fwd, back in plans)), 120)
        for (k, _fwd, back), (got, sent_digest) in zip(plans, results, strict=True):
            expect_back = b"".join(bytes(p) for p in Block(100 + k, MiB).pieces(back))
            assert len(got) == back + 32, (k, len(got), back)
            assert got[:back] == expect_back, f"stream {k}: the return direction differs"
            assert got[back:].hex() == sent_digest, f"stream {k}: the forward direction differs"
        recs = await sink.wait(6)
        assert all(r.eof and r.error is None for r in recs)
        assert await pair.stop() == (0, 0)
        closed = [s for s in streams_by_name(pair.listen.stats())["mig"] if s["state"] == "closed"]
        assert len(closed) == 6
    finally:
        sink.close()


def first_byte_handler(conn: socket.socket, rec: Received) -> None:
    rec.head = conn.recv(1)
    conn.sendall(rec.head)  # the source waits for this echo: the stream is through
    recv_all(conn, rec, keep_head=0)


async def test_connections_reach_the_target_in_accept_order(link, pki, tmp_path):
    """QEMU multifd: k-th connection accepted at the source is the k-th connected at the target (TCP ends)."""
    sink = Sink(first_byte_handler)
    try:
        target = sink.start_tcp(link, "b")
        with link.in_netns("a"), socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            expose_port = probe.getsockname()[1]
        pair = await start_pair(link, tmp_path, pki, forwards={"mig": target},
                                exposes={"mig": f"tcp:127.0.0.1:{expose_port}"})

        def burst(base: int) -> list[bytes]:
            socks = []
            for k in range(3):  # back to back: all three are waiting in the relay before the first is through
                s = connect_app(f"tcp:127.0.0.1:{expose_port}", link, "a")
                s.sendall(bytes([base + k]))
                socks.append(s)
            echoes = []
            for s in socks:
                s.settimeout(20)
                echoes.append(s.recv(1))
            for s in socks:
                s.shutdown(socket.SHUT_WR)
                read_to_eof(s)
                s.close()
            return echoes

        for base in (1, 11):
            echoes = await asyncio.to_thread(burst, base)
            assert echoes == [bytes([base]), bytes([base + 1]), bytes([base + 2])]
        recs = await sink.wait(6)
        assert [r.head for r in recs] == [bytes([b]) for b in (1, 2, 3, 11, 12, 13)]
        # and the listener connected the targets in stream order, one after the other
        connected = re.findall(r"stream (\d+) 'mig' -> \S+ connected", pair.listen.text())
        assert connected == ["1", "3", "5", "7", "9", "11"]
        assert await pair.stop() == (0, 0)
    finally:
        sink.close()


async def test_unknown_names_and_unreachable_targets_close_the_source_socket(link, pki, sockdir, sink,
                                                                             tmp_path):
    target = sink.start_unix(str(sockdir / "dst.sock"))
    missing = sockdir / "nobody-listens.sock"
    pair = await start_pair(link, tmp_path, pki, forwards={"ram": target, "nbd": f"unix:{missing}"},
                            exposes={"ram": f"unix:{sockdir}/ram.sock", "nbd": f"unix:{sockdir}/nbd.sock",
                                     "ghost": f"unix:{sockdir}/ghost.sock"})

    def closed_at_once(name: str) -> bytes:
        with connect_app(f"unix:{sockdir}/{name}.sock") as s:
            return read_to_eof(s, 10)

    assert await asyncio.to_thread(closed_at_once, "nbd") == b""
    await pair.connect.wait_log(rf"refused stream 'nbd': cannot connect to unix:{missing}: "
                                r"No such file or directory")
    await pair.listen.wait_log(r"refusing stream \d+ 'nbd': cannot connect to")
    assert await asyncio.to_thread(closed_at_once, "ghost") == b""
    await pair.connect.wait_log(r"refused stream 'ghost': no forward named 'ghost' on this listener "
                                r"\(it forwards nbd, ram\)")

    def ram() -> str:  # the queue of opens is not stuck behind the refused ones
        with connect_app(f"unix:{sockdir}/ram.sock") as s:
            push(s, Block(5, MiB), 3 * MiB)
            return read_to_eof(s).decode()

    assert await asyncio.to_thread(ram) == Block(5, MiB).digest(3 * MiB)
    assert await pair.stop() == (0, 0)


# ====================================================================== severed connections, cut link


class Pusher:
    """A source application thread pushing *total* bytes; records progress and how it ended."""

    def __init__(self, sock: socket.socket, block: Block, total: int) -> None:
        self.sock = sock
        self.block = block
        self.total = total
        self.sent = 0
        self.error: str | None = None
        self.answer = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _progress(self, n: int) -> None:
        self.sent = n

    def _run(self) -> None:
        try:
            push(self.sock, self.block, self.total, progress=self._progress)
            self.answer = read_to_eof(self.sock, 120)
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    async def wait_sent(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < n:
            assert self.thread.is_alive(), f"source ended early: {self.error}"
            assert time.monotonic() < deadline, f"source stuck at {self.sent} bytes"
            await asyncio.sleep(0.005)

    async def join(self, timeout: float = 120.0) -> None:
        await asyncio.wait_for(asyncio.to_thread(self.thread.join), timeout)


async def test_severing_every_connection_mid_transfer_resumes_an_identical_stream(link, pki, sockdir, sink,
                                                                                  tmp_path):
    """A fault proxy between the ends resets all 3 connections twice; the stream resumes exactly."""
    target = sink.start_unix(str(sockdir / "dst.sock"))
    largs = ["listen", "--bind", f"{link.addr_b}:0", *tls_args(pki, "server"), "--forward", f"ram={target}"]
    listen = await start_tunnel(link, "b", largs, tmp_path, "listen")
    proxy = FaultProxy((link.addr_b, listen.port), listen_netns=link.ns_a, target_netns=link.ns_b)
    async with proxy:
        cargs = ["connect", "--to", f"127.0.0.1:{proxy.port}", "--connections", "3", *tls_args(pki, "client"),
                 "--expose", f"ram=unix:{sockdir}/src.sock"]
        connect = await start_tunnel(link, "a", cargs, tmp_path, "connect")
        pair = Pair(listen, connect)
        await proxy.wait_connections(3)
        size = 384 * MiB
        block = Block(9)
        src = Pusher(await asyncio.to_thread(connect_app, f"unix:{sockdir}/src.sock"), block, size)
        for at in (64 * MiB, 192 * MiB):
            await src.wait_sent(at)
            assert proxy.sever_all() == 3
            await connect.wait_log(r"connection \d to \S+ lost")
            await proxy.wait_connections(3, timeout=20)
        await src.join()
        (got,) = await sink.wait(1)
        assert src.error is None, src.error
        assert got.nbytes == size and got.digest == block.digest(size)
        assert src.answer.decode() == got.digest
        assert await pair.stop() == (0, 0)
    cstats = session_of(connect.stats())
    lstats = session_of(listen.stats())
    assert cstats["reconnects"] >= 6, cstats["reconnects"]
    assert lstats["reconnects"] >= 6, lstats["reconnects"]
    assert cstats["connections_lost"] >= 6
    assert cstats["replayed_bytes"] > 0
    assert "re-established" in connect.text()


async def test_link_cut_beyond_the_grace_period_closes_both_applications(link, pki, sockdir, sink, tmp_path):
    """Link.cut() keeps every packet from arriving: after detection + 3 s of grace both ends give up,
    reset the streams and close the applications' sockets; connect exits 1, listen keeps serving."""
    target = sink.start_unix(str(sockdir / "dst.sock"))
    pair = await start_pair(link, tmp_path, pki, forwards={"ram": target},
                            exposes={"ram": f"unix:{sockdir}/src.sock"},
                            listen_extra=["--grace", "3"],
                            connect_extra=["--grace", "3", "--connections", "2"])
    src = Pusher(await asyncio.to_thread(connect_app, f"unix:{sockdir}/src.sock"), Block(4), 64 * GiB)
    await src.wait_sent(64 * MiB)
    link.cut()
    t_cut = time.monotonic()
    try:
        (got,) = await sink.wait(1, timeout=40)
        t_sink = time.monotonic() - t_cut
        await src.join(timeout=40)
        t_src = time.monotonic() - t_cut
        assert got.eof, "the target application's socket was not closed"
        assert src.error is not None or src.answer == b"", "the source application's socket was not closed"
        rc = await pair.connect.wait_exit(20)
        assert rc == 1, pair.connect.text()
        assert re.search(r"tunnel connect: error: session with \S+ failed: no connection for 3 s",
                         pair.connect.text()), pair.connect.text()
        await pair.listen.wait_log(r"failed: no connection for 3 s \(GRACE_EXPIRED\)")
        await pair.listen.wait_log(r"closing the application connection: stream reset locally "
                                   r"\(GRACE_EXPIRED\)")
        assert pair.listen.proc.poll() is None, "the listener must keep serving other sessions"
        assert 3 < t_sink < 30 and 3 < t_src < 30, (t_sink, t_src)
    finally:
        link.restore()
    assert await pair.listen.stop() == 0


# ====================================================================== memory, compression, bandwidth


async def test_stalled_receiver_keeps_both_tunnels_bounded(link, pki, sockdir, tmp_path, capsys):
    release = threading.Event()

    def stalled(conn: socket.socket, rec: Received) -> None:
        release.wait(60)
        recv_all(conn, rec)

    sink = Sink(stalled)
    try:
        target = sink.start_unix(str(sockdir / "dst.sock"))
        pair = await start_pair(link, tmp_path, pki, forwards={"ram": target},
                                exposes={"ram": f"unix:{sockdir}/src.sock"})
        base = {"connect": pair.connect.rss_kib(), "listen": pair.listen.rss_kib()}
        size = 512 * MiB
        block = Block(6)
        src = Pusher(await asyncio.to_thread(connect_app, f"unix:{sockdir}/src.sock"), block, size)
        await asyncio.sleep(4.0)
        stuck_at = src.sent
        peak = {"connect": pair.connect.rss_kib("VmHWM"), "listen": pair.listen.rss_kib("VmHWM")}
        with capsys.disabled():
            print(f"\n  stalled receiver: source blocked after {stuck_at / MiB:.0f} MiB; VmHWM "
                  + ", ".join(f"{k} {peak[k] / 1024:.0f} MiB (idle {base[k] / 1024:.0f})" for k in peak))
        assert stuck_at < 96 * MiB, "the source kept writing into a stalled receiver"
        for k in peak:
            assert peak[k] - base[k] < 96 * 1024, f"{k} grew by {(peak[k] - base[k]) / 1024:.0f} MiB"
        await asyncio.sleep(1.0)
        assert src.sent - stuck_at < 8 * MiB  # still blocked
        release.set()
        await src.join()
        (got,) = await sink.wait(1)
        assert got.digest == block.digest(size) and src.answer == b""
        assert await pair.stop() == (0, 0)
    finally:
        release.set()
        sink.close()


def text_like(nbytes: int) -> bytes:
    rng = random.Random(3)
    words = [rng.randbytes(rng.randint(2, 9)).hex()[: rng.randint(2, 12)] for _ in range(500)]
    out = []
    size = 0
    i = 0
    while size < nbytes:
        line = (f"{i:09d} INFO vm-{i % 7} page {i * 4096:#x} {' '.join(rng.choices(words, k=6))} "
                f"state={rng.choice(['dirty', 'clean', 'sent'])}\n").encode()
        out.append(line)
        size += len(line)
        i += 1
    return b"".join(out)[:nbytes]


async def test_compression_statistics_text_versus_random(link, pki, sockdir, sink, tmp_path):
    target = sink.start_unix(str(sockdir / "dst.sock"))
    pair = await start_pair(link, tmp_path, pki, forwards={"text": target, "rand": target},
                            exposes={"text": f"unix:{sockdir}/text.sock",
                                     "rand": f"unix:{sockdir}/rand.sock"},
                            connect_extra=["--compress", "on"])
    text = text_like(48 * MiB) + bytes(8 * MiB)  # zero pages at the end: elided by the page codec
    rand = random.Random(11).randbytes(32 * MiB)

    def send(name: str, data: bytes) -> str:
        with connect_app(f"unix:{sockdir}/{name}.sock") as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return read_to_eof(s).decode()

    answers = await asyncio.gather(asyncio.to_thread(send, "text", text),
                                   asyncio.to_thread(send, "rand", rand))
    assert answers == [hashlib.sha256(text).hexdigest(), hashlib.sha256(rand).hexdigest()]
    assert await pair.stop() == (0, 0)
    doc = pair.connect.stats()
    by = {name: sts[-1] for name, sts in streams_by_name(doc).items()}
    t, r = by["text"], by["rand"]
    assert t["bytes_sent"] == len(text) and r["bytes_sent"] == len(rand)
    assert t["wire_bytes_sent"] < 0.6 * t["raw_data_sent"], t
    assert t["compression_ratio"] > 1.8 and t["zero_pages"] >= 2048 - 64, t
    assert 0.98 < r["wire_bytes_sent"] / r["raw_data_sent"] < 1.02, r
    sess = session_of(doc)
    assert sess["wire_bytes_sent"] < sess["raw_bytes_sent"]
    assert sess["zero_pages"] == t["zero_pages"] + r["zero_pages"]


async def test_bandwidth_cap_paces_the_sender(link, pki, sockdir, sink, tmp_path, capsys):
    target = sink.start_unix(str(sockdir / "dst.sock"))
    pair = await start_pair(link, tmp_path, pki, forwards={"ram": target},
                            exposes={"ram": f"unix:{sockdir}/src.sock"},
                            connect_extra=["--bandwidth", "200M"])
    size = 64 * MiB
    block = Block(8)

    def run() -> str:
        with connect_app(f"unix:{sockdir}/src.sock") as s:
            push(s, block, size)
            return read_to_eof(s).decode()

    t0 = time.monotonic()
    assert await asyncio.to_thread(run) == block.digest(size)
    dt = time.monotonic() - t0
    rate = size / dt
    with capsys.disabled():
        print(f"\n  --bandwidth 200M (25 MB/s): {rate / 1e6:.1f} MB/s")
    assert 0.8 * 25e6 < rate < 1.1 * 25e6
    assert await pair.stop() == (0, 0)
    assert session_of(pair.connect.stats())["bandwidth_limit"] == 25e6
