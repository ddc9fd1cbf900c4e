"""``dataplane tunnel listen|connect``: argument parsing, error lines, lifecycle on loopback; the driver API.

Parsing and usage errors run ``dataplane.cli.main`` in-process. Lifecycle
tests run both ends as processes on 127.0.0.1 (no namespaces needed):
ready lines, SIGINT/SIGTERM shutdown with exit 0 and a final ``--stats-json``,
connection failures worded on one line with exit 1. The last tests drive
:class:`~dataplane.channel.server.ChannelServer` and
:class:`~dataplane.channel.client.ChannelClient` directly (bandwidth cap
changed at run time, stream callbacks).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dataplane.certs import CertSet, init_certs
from dataplane.channel.addr import Endpoint, parse_endpoint, parse_hostport, parse_mapping
from dataplane.cli import main
from dataplane.units import format_rate, parse_rate

MiB = 1 << 20
READY = re.compile(r"dataplane: tunnel (?:listening on|connected to) \S+:(\d+)")


# ====================================================================== parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("200M", 25e6), ("1G", 125e6), ("1g", 125e6), ("1.5G", 187.5e6), ("500k", 62.5e3), ("500kbit", 62.5e3),
    ("200Mbit/s", 25e6), ("200Mb/s", 25e6), ("8000000", 1e6), ("100MiB/s", 100 * MiB), ("1GiB/s", 1 << 30),
    ("50MB/s", 50e6), ("10kB/s", 1e4), ("4096B/s", 4096), ("0", None), ("off", None), ("unlimited", None),
])
def test_parse_rate(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("100mbps", "unknown unit 'mbps'"), ("fast", "invalid rate"), ("100MB", "unknown unit 'MB'"),
    ("1k", "too low"), ("-5M", "invalid rate"), ("100mB/s", "unknown unit"),
])
def test_parse_rate_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_rate(text)


def test_format_rate():
    assert format_rate(25e6) == "25.0 MB/s (200 Mbit/s)"
    assert format_rate(None) == "unlimited"


@pytest.mark.parametrize(("text", "kwargs", "expected"), [
    ("10.0.0.7:7000", {}, ("10.0.0.7", 7000)),
    ("dp.cluster-b.example:443", {}, ("dp.cluster-b.example", 443)),
    ("[::1]:7000", {}, ("::1", 7000)),
    (":7000", {"allow_empty_host": True}, ("", 7000)),
    ("127.0.0.1:0", {"allow_zero": True}, ("127.0.0.1", 0)),
])
def test_parse_hostport(text, kwargs, expected):
    assert parse_hostport(text, **kwargs) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.7", "expected HOST:PORT"), ("::1:7000", r"\[ADDRESS\]:PORT"), (":7000", "host is missing"),
    ("h:0", "out of range"), ("h:99999", "out of range"), ("h:x", "expected a number"),
    ("a b:1", "not an IP address nor a host name"), ("[10.0.0.1]:5", "not an IPv6 address"),
])
def test_parse_hostport_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_hostport(text)


def test_endpoints_and_mappings():
    assert parse_endpoint("unix:/run/qemu.sock") == Endpoint("unix", path="/run/qemu.sock")
    assert parse_endpoint("tcp:127.0.0.1:4444") == Endpoint("tcp", host="127.0.0.1", port=4444)
    assert str(parse_endpoint("tcp:[::1]:4444")) == "tcp:[::1]:4444"
    assert parse_endpoint("tcp::4444", listen=True) == Endpoint("tcp", host="", port=4444)
    assert parse_mapping("disk0=unix:/x") == ("disk0", Endpoint("unix", path="/x"))
    for bad, msg in [("udp:1.2.3.4:5", "expected unix"), ("unix:", "path is missing"),
                     ("unix:/" + "x" * 120, "107 bytes"), ("tcp::4444", "host is missing")]:
        with pytest.raises(ValueError, match=msg):
            parse_endpoint(bad)
    for bad, msg in [("mig", "expected NAME="), ("=unix:/x", "invalid stream name"),
                     ("a b=unix:/x", "invalid stream name")]:
        with pytest.raises(ValueError, match=msg):
            parse_mapping(bad)


# ====================================================================== usage errors (in-process)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return init_certs(tmp_path_factory.mktemp("pki") / "pki")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


LISTEN = ("tunnel", "listen", "--bind", "127.0.0.1:0", "--forward", "mig=unix:/tmp/x.sock")
CONNECT = ("tunnel", "connect", "--to", "127.0.0.1:7000", "--expose", "mig=unix:/tmp/y.sock")


@pytest.mark.parametrize(("argv", "code", "message"), [
    (LISTEN, 2, "dataplane tunnel listen: error: TLS needs --cert, --key, --ca (or --certs DIR made by "
                "'dataplane certs init'); --plaintext turns TLS off on an isolated test network"),
    ((*LISTEN, "--plaintext", "--peer-name", "x"), 2,
     "error: --plaintext disables TLS; do not combine it with --peer-name"),
    ((*CONNECT, "--plaintext", "--connections", "17"), 2, "argument --connections: at most 16 per session"),
    ((*CONNECT, "--plaintext", "--connections", "0"), 2, "argument --connections: must be at least 1, got 0"),
    ((*CONNECT, "--plaintext", "--bandwidth", "100mbps"), 2, "argument --bandwidth: invalid rate '100mbps'"),
    ((*CONNECT, "--plaintext", "--grace", "0"), 2, "argument --grace: must be a positive number of seconds"),
    ((*LISTEN, "--plaintext", "--forward", "mig=unix:/tmp/z"), 2, "--forward: the name 'mig' is given twice"),
    (("tunnel", "listen", "--bind", "127.0.0.1:0", "--forward", "mig", "--plaintext"), 2,
     "argument --forward: invalid mapping 'mig': expected NAME=unix:/PATH or NAME=tcp:HOST:PORT"),
    (("tunnel", "connect", "--to", "nowhere", "--expose", "a=unix:/x", "--plaintext"), 2,
     "argument --to: invalid address 'nowhere': expected HOST:PORT"),
    ((*LISTEN, "--plaintext", "--stats-json", "/nonexistent/dir/s.json"), 2,
     "--stats-json: directory /nonexistent/dir does not exist"),
    (("tunnel", "listen", "--bind", "0.0.0.0:0", "--forward", "m=unix:/tmp/x.sock", "--plaintext"), 2,
     "error: --plaintext on 0.0.0.0: any host that reaches it could write this side's data unauthenticated; "
     "use TLS, a loopback address, or add --plaintext-network-is-isolated"),
    (("tunnel", "listen", "--bind", ":0", "--forward", "m=unix:/tmp/x.sock", "--plaintext"), 2,
     "error: --plaintext on every interface: any host"),
    (("tunnel", "connect", "--to", "10.1.2.3:7000", "--expose", "a=unix:/x", "--plaintext"), 2,
     "error: --plaintext on 10.1.2.3: any host"),
    ((*CONNECT, "--certs", "/nonexistent"), 1, "--certs: /nonexistent holds no manifest.json"),
    ((*LISTEN, "--cert", "/nonexistent.crt", "--key", "/k", "--ca", "/c", "--peer-name", "p"), 1,
     "error: TLS certificate /nonexistent.crt does not exist"),
])
def test_usage_and_configuration_errors_are_one_line(capsys, argv, code, message):
    rc, err = run_cli(capsys, *argv)
    assert rc == code
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_peer_name_is_required_with_tls_files(capsys, pki):
    files = ("--cert", str(pki.server.cert), "--key", str(pki.server.key), "--ca", str(pki.server.trust))
    rc, err = run_cli(capsys, *LISTEN, *files)
    assert rc == 2
    assert ("TLS needs --peer-name NAME: the name the dialer's (client's) certificate must carry "
            "(its CN or a subjectAltName, e.g. --peer-name dataplane-client)") in err
    files = ("--cert", str(pki.client.cert), "--key", str(pki.server.key), "--ca", str(pki.client.trust))
    rc, err = run_cli(capsys, *CONNECT, *files, "--peer-name", "dataplane-server")
    assert rc == 1 and "the private key does not belong to the certificate" in err


def test_help_documents_both_commands(capsys):
    for cmd in ("listen", "connect"):
        assert main(["tunnel", cmd, "--help"]) == 0
        out = capsys.readouterr().out
        for word in ("--plaintext", "--certs DIR", "--compress", "--bandwidth RATE", "--grace SECONDS",
                     "--stats-json PATH", "100MiB/s", "examples:", "--peer-name NAME"):
            assert word in out, (cmd, word)
    assert main(["tunnel", "connect", "--help"]) == 0
    assert "--connections N" in capsys.readouterr().out


# ====================================================================== processes on loopback


class Proc:
    def __init__(self, args: list[str], workdir: Path, name: str, level: str = "info") -> None:
        self.log = workdir / f"{name}.log"
        self.stats = workdir / f"{name}.json"
        with self.log.open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "dataplane", "--log-level", level, "tunnel", *args,
                 "--stats-json", str(self.stats)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.port = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text())
            if m:
                return m
            assert self.popen.poll() is None, f"exited ({self.popen.returncode}):\n{self.text()}"
            assert time.monotonic() < deadline, f"no /{pattern}/ after {timeout} s:\n{self.text()}"
            time.sleep(0.02)

    def ready(self) -> Proc:
        self.port = int(self.wait_log(READY.pattern).group(1))
        return self

    def wait(self, timeout: float = 20.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.wait()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def procs() -> Any:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_server() -> tuple[socket.socket, int]:
    """A TCP target that answers each connection with the SHA-256 of what it read, after EOF."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                h = hashlib.sha256()
                while b := conn.recv(1 << 20):
                    h.update(b)
                conn.sendall(h.hexdigest().encode())

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def round_trip(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while b := s.recv(65536):
            out += b
        return out


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_plaintext_round_trip_then_clean_shutdown(procs, tmp_path, sig):
    srv, target = echo_server()
    listen = Proc(["listen", "--bind", "127.0.0.1:0", "--forward", f"echo=tcp:127.0.0.1:{target}",
                   "--plaintext", "--compress", "off"], tmp_path, "listen", "debug")
    procs.append(listen)
    listen.ready()
    expose = free_port()
    connect = Proc(["connect", "--to", f"127.0.0.1:{listen.port}", "--expose", f"echo=tcp:127.0.0.1:{expose}",
                    "--plaintext", "--connections", "3"], tmp_path, "connect", "debug")
    procs.append(connect)
    connect.ready()
    assert f"tunnel connected to 127.0.0.1:{listen.port} (3 connections)" in connect.text()
    assert "event loop: uvloop" in connect.text() and "event loop: uvloop" in listen.text()
    data = bytes(range(256)) * 40000
    assert round_trip(expose, data) == hashlib.sha256(data).hexdigest().encode()
    time.sleep(1.2)  # the periodic stats writer runs every second
    live = json.loads(connect.stats.read_text())
    assert live["role"] == "connect" and live["sessions"][0]["state"] == "established"
    assert connect.stop(sig) == 0
    assert listen.stop(sig) == 0
    srv.close()
    final = json.loads(connect.stats.read_text())["sessions"][0]
    assert final["bytes_sent"] == len(data) and final["bytes_received"] == 64
    assert final["state"] == "ended" and final["error"] is None
    (stream,) = final["streams"]
    assert stream["name"] == "echo" and stream["state"] == "closed" and stream["bytes_sent"] == len(data)
    lfinal = json.loads(listen.stats.read_text())
    assert lfinal["sessions"][0]["bytes_received"] == len(data)
    for p in (connect, listen):
        assert "Traceback" not in p.text()


@pytest.mark.e2e
def test_connect_exits_0_when_the_listener_closes_the_session(procs, tmp_path, pki):
    srv, target = echo_server()
    listen = Proc(["listen", "--bind", "127.0.0.1:0", "--forward", f"echo=tcp:127.0.0.1:{target}",
                   "--certs", str(pki.directory)], tmp_path, "listen")
    procs.append(listen)
    listen.ready()
    connect = Proc(["connect", "--to", f"127.0.0.1:{listen.port}", "--expose", f"echo=unix:{tmp_path}/e.sock",
                    "--certs", str(pki.directory)], tmp_path, "connect")
    procs.append(connect)
    connect.ready()
    assert listen.stop() == 0
    assert connect.wait() == 0
    assert "the listener closed the session" in connect.text()
    assert not (tmp_path / "e.sock").exists()  # the exposed unix socket is removed
    srv.close()


@pytest.mark.e2e
def test_listen_on_a_busy_port_fails_with_one_line(procs, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        p = Proc(["listen", "--bind", f"127.0.0.1:{port}", "--forward", "a=unix:/x", "--plaintext"],
                 tmp_path, "l")
        procs.append(p)
        assert p.wait() == 1
    expected = f"dataplane tunnel listen: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert expected in p.text()


@pytest.mark.e2e
def test_connect_gives_up_after_the_grace_period_when_nobody_listens(procs, tmp_path):
    port = free_port()
    t0 = time.monotonic()
    p = Proc(["connect", "--to", f"127.0.0.1:{port}", "--expose", f"a=unix:{tmp_path}/a.sock", "--plaintext",
              "--grace", "1.5"], tmp_path, "c")
    procs.append(p)
    assert p.wait() == 1
    assert 1.4 < time.monotonic() - t0 < 10
    assert p.text().count("retrying for up to 1.5 s") == 1, p.text()  # said once, before giving up
    assert re.search(rf"dataplane tunnel connect: error: cannot connect to 127\.0\.0\.1:{port}: no "
                     r"connection within the grace period; last error: connection refused \(nothing "
                     r"listens at the peer's address\)", p.text()), p.text()


@pytest.mark.e2e
def test_tls_refusals_are_fatal_and_worded(procs, tmp_path, pki):
    # the listener pins a client name our certificate does not carry
    listen = Proc(["listen", "--bind", "127.0.0.1:0", "--forward", "a=unix:/x", "--certs", str(pki.directory),
                   "--peer-name", "someone-else"], tmp_path, "listen")
    procs.append(listen)
    listen.ready()
    c1 = Proc(["connect", "--to", f"127.0.0.1:{listen.port}", "--expose", f"a=unix:{tmp_path}/a.sock",
               "--certs", str(pki.directory)], tmp_path, "c1")
    procs.append(c1)
    assert c1.wait() == 1
    assert (f"error: 127.0.0.1:{listen.port} refused the connection: peer closed the connection during or "
            "right after the TLS handshake (it probably refused our certificate or our name: see the peer's "
            "log)") in c1.text(), c1.text()
    listen.wait_log(r"refused a TLS connection: peer name mismatch: expected someone-else, got "
                    r"\['dataplane-client'\]")
    # the dialer pins a server name the listener's certificate does not carry
    c2 = Proc(["connect", "--to", f"127.0.0.1:{listen.port}", "--expose", f"a=unix:{tmp_path}/b.sock",
               "--certs", str(pki.directory), "--peer-name", "dp.elsewhere"], tmp_path, "c2")
    procs.append(c2)
    assert c2.wait() == 1
    assert (f"error: TLS to 127.0.0.1:{listen.port} failed: peer name mismatch: expected dp.elsewhere, "
            "got ['dataplane-server']") in c2.text(), c2.text()
    assert listen.stop() == 0


# ====================================================================== the driver API in-process


async def test_bandwidth_cap_can_change_while_streaming(tmp_path):
    from dataplane.channel.client import ChannelClient
    from dataplane.channel.server import ChannelServer
    from dataplane.channel.stream import StreamHandler

    got = bytearray()

    class Collect(StreamHandler):
        def on_data(self, stream, data):
            got.extend(data)
            stream.consumed(len(data))

    class Push(StreamHandler):
        def __init__(self) -> None:
            self.writable = asyncio.Event()

        def on_accepted(self, stream):
            self.writable.set()

        def on_writable(self, stream):
            self.writable.set()

    server = ChannelServer("127.0.0.1", 0, None, plaintext=True, on_stream=lambda st: st.accept(Collect()))
    _, port = await server.start()
    client = ChannelClient("127.0.0.1", port, None, plaintext=True, bandwidth=8e6)
    await client.start()
    push = Push()
    stream = client.open_stream("bulk", push)
    chunk = random.Random(3).randbytes(256 * 1024)  # incompressible: the cap is on wire bytes
    stop = False

    async def pump() -> None:
        view = memoryview(chunk)
        while not stop:
            await push.writable.wait()
            n = stream.send(view)
            if n < len(view):
                push.writable.clear()
            await asyncio.sleep(0)

    task = asyncio.create_task(pump())

    async def rate(seconds: float) -> float:
        await asyncio.sleep(0.3)  # let the previous setting drain
        n0, t0 = len(got), time.monotonic()
        await asyncio.sleep(seconds)
        return (len(got) - n0) / (time.monotonic() - t0)

    r1 = await rate(1.0)
    client.set_bandwidth(2e6)
    r2 = await rate(1.0)
    client.set_bandwidth(None)
    r3 = await rate(0.5)
    stop = True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert 6e6 < r1 < 10e6, r1
    assert 1.5e6 < r2 < 2.6e6, r2
    assert r3 > 20e6, r3
    assert client.stats()["sessions"][0]["bandwidth_limit"] is None
    await client.close()
    await server.close()
    assert client.done.done() and client.done.result() is None


async def test_streams_refused_by_the_callback_and_server_opened_streams(tmp_path):
    from dataplane.channel.client import ChannelClient
    from dataplane.channel.errors import ErrorCode
    from dataplane.channel.server import ChannelServer
    from dataplane.channel.stream import StreamHandler

    refused: list[tuple[str, int, str]] = []
    done = asyncio.Event()

    class Watch(StreamHandler):
        def on_refused(self, stream, code, reason):
            refused.append((stream.name, code, reason))
            done.set()

    server = ChannelServer("127.0.0.1", 0, None, plaintext=True,
                           on_stream=lambda st: st.refuse(f"nothing for {st.name}"))
    _, port = await server.start()
    client = ChannelClient("127.0.0.1", port, None, plaintext=True)
    client.open_stream("early", Watch())  # before start: queued until the session exists
    await client.start()
    await asyncio.wait_for(done.wait(), 5)
    assert refused == [("early", ErrorCode.REFUSED, "nothing for early")]
    # a stream opened by the server towards a client without on_stream is refused by the driver
    (drv,) = server.sessions.values()
    answer = asyncio.Event()
    reasons: list[str] = []

    class ServerSide(StreamHandler):
        def on_refused(self, stream, code, reason):
            reasons.append(reason)
            answer.set()

    drv.open_stream("reverse", ServerSide())
    await asyncio.wait_for(answer.wait(), 5)
    assert reasons == ["this side of the channel accepts no streams"]
    await client.close()
    await server.close()


def test_cli_event_loop_keeps_the_cyclic_gc_off_the_data_path():
    """Start-up objects are frozen out of collections and young collections are rare; cycles still go."""
    code = (
        "import gc, sys\n"
        "from dataplane.cli.common import run_loop\n"
        "class Cycle:\n"
        "    pass\n"
        "async def main():\n"
        "    frozen, threshold = gc.get_freeze_count(), gc.get_threshold()\n"
        "    c = Cycle(); c.me = c; del c\n"
        "    return int(not (frozen > 1000 and threshold[0] >= 35_000 and gc.collect() >= 1))\n"
        "sys.exit(run_loop(main))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


async def test_a_full_frame_read_into_the_send_buffer_is_written_at_once(tmp_path):
    """Bytes read straight into the send buffer are framed and written in the same callback once a frame
    is full (still in the CPU cache), not after the event loop has read more."""
    from dataplane.channel.client import ChannelClient
    from dataplane.channel.server import ChannelServer
    from dataplane.channel.stream import StreamHandler

    got = bytearray()
    done = asyncio.Event()
    data = random.Random(8).randbytes(3 << 20)

    class Collect(StreamHandler):
        def on_data(self, stream, chunk):
            got.extend(chunk)
            stream.consumed(len(chunk))
            if len(got) == len(data):
                done.set()

    class Opened(StreamHandler):
        def __init__(self) -> None:
            self.accepted = asyncio.Event()

        def on_accepted(self, stream):
            self.accepted.set()

    server = ChannelServer("127.0.0.1", 0, None, plaintext=True, on_stream=lambda st: st.accept(Collect()))
    _, port = await server.start()
    client = ChannelClient("127.0.0.1", port, None, plaintext=True)
    await client.start()
    opened = Opened()
    stream = client.open_stream("bulk", opened)
    await asyncio.wait_for(opened.accepted.wait(), 5)
    session = stream._drv.session  # the sans-IO core under the driver
    pos = 0
    while pos < len(data):  # no await in here: the event loop never runs a scheduled flush
        view = stream.get_send_buffer(1 << 20)
        n = min(len(view), len(data) - pos)
        assert n > 0  # 3 MiB is far below the stream's credit: the buffer is never empty here
        view[:n] = data[pos:pos + n]
        stream.send_buffer_updated(n)
        pos += n
        assert not session.frame_ready(stream.sid)
    await asyncio.wait_for(done.wait(), 10)
    assert bytes(got) == data
    await client.close()
    await server.close()
