"""Real namespaces joined by veth, shaped with tbf, cut without RST; and the TCP fault proxy."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dataplane.testing.netns import (
    FaultProxy,
    Link,
    in_netns,
    sweep_stale,
    tbf_burst,
)
from dataplane.units import parse_link_rate

REPO = Path(__file__).resolve().parents[1]


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _qdiscs(ns: str, dev: str) -> list[dict]:
    out = subprocess.run(["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev], capture_output=True, check=True)
    return json.loads(out.stdout)


def _connected_pair(link: Link) -> tuple[socket.socket, socket.socket]:
    """A TCP connection from namespace A (client) to namespace B (server): (client, server) sockets."""
    with link.in_netns("b"):
        listener = socket.create_server((link.addr_b, 0))
    with listener, link.in_netns("a"):
        client = socket.create_connection((link.addr_b, listener.getsockname()[1]), timeout=5)
        server, _ = listener.accept()
    return client, server


class _Receiver(threading.Thread):
    """Reads a socket to EOF, recording bytes and the times of the first and last byte."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = bytearray()
        self.keep = False
        self.count = 0
        self.first = self.last = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                now = time.monotonic()
                self.first = self.first or now
                self.last = now
                self.count += len(chunk)
                if self.keep:
                    self.data += chunk
        except OSError as exc:
            self.error = exc


def _bulk(client: socket.socket, server: socket.socket, seconds: float) -> tuple[int, float]:
    """Send as fast as possible for *seconds*; return (bytes, receive rate in bit/s)."""
    rx = _Receiver(server)
    rx.start()
    block = os.urandom(1 << 16)
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        client.sendall(block)
        sent += len(block)
    client.shutdown(socket.SHUT_WR)
    rx.join(30)
    assert rx.count == sent and rx.error is None
    return sent, rx.count * 8 / (rx.last - rx.first)


# --------------------------------------------------------------------------- the link


@pytest.mark.e2e
def test_namespaces_talk_over_veth(link: Link) -> None:
    echo = link.popen("b", ["socat", f"TCP-LISTEN:7000,bind={link.addr_b},reuseaddr,fork", "PIPE"])
    out = link.run("a", ["socat", "-t", "2", "-", f"TCP:{link.addr_b}:7000,retry=50,interval=0.05"],
                   input=b"across the veth\n", timeout=20)  # fmt: skip
    assert out.stdout == b"across the veth\n"
    assert echo.poll() is None
    client, server = _connected_pair(link)  # and from Python, through in_netns
    with client, server:
        assert client.getsockname()[0] == link.addr_a and server.getsockname()[0] == link.addr_b
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"


@pytest.mark.e2e
def test_tbf_limits_bulk_transfer_and_counters_count(link_factory) -> None:
    link = link_factory(rate="50mbit")
    before = link.counters()
    client, server = _connected_pair(link)
    with client, server:
        sent, rate = _bulk(client, server, 2.0)
    after = link.counters()
    assert 0.75 * 50e6 <= rate <= 1.25 * 50e6, f"{rate / 1e6:.1f} Mbit/s through a 50 Mbit/s tbf"
    assert after["a"]["tx_bytes"] - before["a"]["tx_bytes"] >= sent
    assert after["b"]["rx_bytes"] - before["b"]["rx_bytes"] >= sent
    assert after["b"]["tx_bytes"] > before["b"]["tx_bytes"]  # the ACKs


@pytest.mark.e2e
def test_set_rate_at_runtime(link: Link) -> None:
    link.set_rate("10mbit")
    for ns, dev in ((link.ns_a, link.dev_a), (link.ns_b, link.dev_b)):
        (qdisc,) = _qdiscs(ns, dev)
        assert qdisc["kind"] == "tbf" and qdisc["options"]["rate"] == 10_000_000 // 8
        assert abs(qdisc["options"]["burst"] - tbf_burst(10_000_000)) <= 2  # tc rounds to its time units
    client, server = _connected_pair(link)
    with client, server:
        _, rate = _bulk(client, server, 1.0)
    assert 0.75 * 10e6 <= rate <= 1.25 * 10e6, f"{rate / 1e6:.1f} Mbit/s through a 10 Mbit/s tbf"
    link.set_rate(None)
    assert all(q["kind"] != "tbf" for q in _qdiscs(link.ns_a, link.dev_a) + _qdiscs(link.ns_b, link.dev_b))


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["drop", "down"])
def test_cut_stalls_established_tcp_and_restore_resumes_intact(link: Link, mode: str) -> None:
    client, server = _connected_pair(link)
    with client, server:
        client.sendall(b"before")
        assert server.recv(6) == b"before"
        link.cut(mode)
        assert link.is_cut
        payload = os.urandom(300_000)
        sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
        sender.start()
        server.settimeout(1.0)
        with pytest.raises(TimeoutError):  # stalled: nothing arrives, and no reset either
            server.recv(65536)
        link.restore()
        server.settimeout(10)
        got = bytearray()
        while len(got) < len(payload):
            chunk = server.recv(1 << 20)
            assert chunk, "the connection ended instead of resuming"
            got += chunk
        sender.join(10)
        assert bytes(got) == payload


@pytest.mark.e2e
def test_cut_connection_eventually_times_out_without_reset(link: Link) -> None:
    client, server = _connected_pair(link)
    with client, server:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 800)
        link.cut()
        client.sendall(b"into the void")
        client.settimeout(10)
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc_info:
            client.recv(1)
        assert exc_info.value.errno == errno.ETIMEDOUT, exc_info.value  # a timeout, not ECONNRESET
        assert time.monotonic() - t0 < 5
        link.restore()
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the peer was not told anything either
            server.recv(1)


@pytest.mark.e2e
def test_namespaces_and_processes_gone_after_exit() -> None:
    with pytest.raises(RuntimeError, match="boom"), Link() as lk:
        names = lk.namespaces
        assert set(names) <= _netns_names()
        sleeper = lk.popen("a", ["sleep", "60"])
        raise RuntimeError("boom")
    assert not set(names) & _netns_names()
    assert sleeper.wait(5) == -9


@pytest.mark.e2e
@pytest.mark.parametrize("ending", ["exit", "SIGKILL"])
def test_a_crashed_process_leaves_no_namespaces(ending: str) -> None:
    """Normal exit without close(): atexit deletes them. SIGKILL: the next sweep (at Link.start) does."""
    code = (
        "import os, subprocess, sys\n"
        "from dataplane.testing.netns import Link\n"
        "lk = Link().start()\n"
        "lk.popen('a', ['sleep', '60'], stdout=subprocess.DEVNULL)\n"
        "print(lk.ns_a, lk.ns_b, flush=True)\n"
        + ("os.kill(os.getpid(), 9)\n" if ending == "SIGKILL" else "sys.exit(0)\n")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30)
    names = set(proc.stdout.split())
    assert len(names) == 2, proc.stderr
    if ending == "SIGKILL":
        assert names <= _netns_names()  # nobody could clean up...
        assert names <= set(sweep_stale())  # ...until the next sweep
    assert not names & _netns_names()


@pytest.mark.e2e
def test_sweep_removes_only_namespaces_of_dead_processes(link: Link) -> None:
    with open("/proc/sys/kernel/pid_max") as fh:
        dead = int(fh.read()) + 1  # no process can have this pid
    stale = f"dp-a-{dead}-0badc0de"
    alive = f"dp-b-{os.getppid()}-0badc0de"  # our parent: running, and older than the namespace
    for name in (stale, alive):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = sweep_stale()
        names = _netns_names()
        assert stale in removed and stale not in names
        assert alive in names and set(link.namespaces) <= names  # running owners are left alone
    finally:
        for name in (stale, alive):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.mark.e2e
def test_in_netns_moves_only_the_calling_thread(link: Link) -> None:
    def current() -> str:
        return os.readlink("/proc/thread-self/ns/net")

    home = current()
    seen: list[str] = []
    entered, sampled = threading.Event(), threading.Event()

    def other_thread() -> None:  # started before: stays home while the main thread is in A
        entered.wait(5)
        seen.append(current())
        sampled.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with in_netns(link.ns_a):
        inside = current()
        entered.set()
        sampled.wait(5)
        born_inside: list[str] = []
        child = threading.Thread(target=lambda: born_inside.append(current()))  # inherits A
        child.start()
        child.join()
    t.join()
    assert inside != home and seen == [home] and born_inside == [inside] and current() == home


def test_link_refuses_addresses_outside_10_8() -> None:
    with pytest.raises(ValueError, match="10.0.0.0/8"):
        Link(subnet="192.168.1.0/30")
    with pytest.raises(ValueError):
        Link(subnet="10.1.1.0/31")


def test_parse_rate_and_burst() -> None:
    assert parse_link_rate("50mbit") == 50_000_000
    assert parse_link_rate("1.5Gbit") == 1_500_000_000
    assert parse_link_rate(8000) == 8000
    for bad in ("50mbps", "fast", "-1mbit", "1"):
        with pytest.raises(ValueError):
            parse_link_rate(bad)
    assert tbf_burst(50_000_000) == 62_500  # 10 ms worth: one tick at HZ=100
    assert tbf_burst(1_000_000) == 16 * 1024  # floor
    assert tbf_burst(1_000_000, mtu=9000) == 4 * 9014


# --------------------------------------------------------------------------- the fault proxy


async def _echo_server(events: list[str]) -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            events.append("eof")
        except ConnectionError as exc:
            events.append(type(exc).__name__)
        finally:
            writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_fault_proxy_forwards_counts_and_severs_both_ends() -> None:
    server_saw: list[str] = []
    server = await _echo_server(server_saw)
    async with FaultProxy(server.sockets[0].getsockname()[:2]) as proxy:
        conns = [await asyncio.open_connection(*proxy.address) for _ in range(3)]
        for reader, writer in conns:
            writer.write(b"0123456789")
            assert await reader.readexactly(10) == b"0123456789"
        await proxy.wait_connections(3)
        assert proxy.stats() == {"bytes_up": 30, "bytes_down": 30, "connections_total": 3, "active": 3}
        assert proxy.sever_all() == 3
        for reader, _ in conns:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 5)
        for _ in range(100):
            if len(server_saw) == 3:
                break
            await asyncio.sleep(0.01)
        assert server_saw == ["ConnectionResetError"] * 3  # the target side was severed too
        assert proxy.active == 0
        # still accepting: a reconnect works
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"again")
        assert await reader.readexactly(5) == b"again"
        writer.close()
    server.close()


async def test_fault_proxy_pause_resume_and_refusal() -> None:
    server = await _echo_server([])
    async with FaultProxy(server.sockets[0].getsockname()[:2]) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        proxy.pause()
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        assert proxy.paused and proxy.active == 1
        proxy.resume()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
        proxy.set_accepting(False)
        r2, _ = await asyncio.open_connection(*proxy.address)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r2.read(1), 5)
        assert proxy.active == 1
        writer.close()
    server.close()


@pytest.mark.e2e
async def test_fault_proxy_between_namespaces(link: Link) -> None:
    """Listen in cluster A, dial into cluster B: severing is seen on both sides of the veth."""
    with link.in_netns("b"):
        listener = socket.create_server((link.addr_b, 0))
    saw: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError as exc:
            saw.append(type(exc).__name__)

    server = await asyncio.start_server(echo, sock=listener)
    target = (link.addr_b, listener.getsockname()[1])
    async with FaultProxy(target, (link.addr_a, 0), listen_netns=link.ns_a, target_netns=link.ns_a) as proxy:
        with link.in_netns("a"):
            sock = socket.create_connection(proxy.address)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"x" * 100_000)
        assert len(await reader.readexactly(100_000)) == 100_000
        assert link.counters()["b"]["rx_bytes"] >= 100_000
        proxy.sever_all()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        for _ in range(200):
            if saw:
                break
            await asyncio.sleep(0.01)
        assert saw == ["ConnectionResetError"]
    server.close()
