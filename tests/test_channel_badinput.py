"""Hostile input on a ``dataplane tunnel listen`` port, with a healthy session running next to it.

For each listener flavour (plaintext and mutual TLS) one listener process and
one healthy ``tunnel connect`` session live for the whole module. Every test
throws one kind of bad input at the listener while a fresh stream of the
healthy session carries data; the test checks that the offending connection
is closed with a clear log line (and, where the protocol allows, a GOAWAY or
REFUSE frame naming the error), and that the healthy stream arrives intact.
At the end the listener must still run, its memory must have stayed bounded,
and the healthy session must never have lost a connection.

Bad input: random bytes (up to 64 MiB), random bytes after a valid preface
and inside an authenticated TLS connection, truncated frames (then EOF, or
then silence until the handshake timeout), huge length fields, unknown frame
types, frames for unknown streams, a resume token replayed from another TLS
identity (and a wrong token), a client certificate from another CA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dataplane.certs import CertSet, init_certs
from dataplane.channel.errors import ErrorCode
from dataplane.channel.frames import (
    HEADER_SIZE,
    MAX_VERSION,
    MIN_VERSION,
    PREFACE_SIZE,
    FrameDecoder,
    FrameType,
    HelloParams,
    decode_preface,
    decode_text,
    encode_preface,
    frame_bytes,
)
from dataplane.channel.tls import TLSConfig, client_context

pytestmark = pytest.mark.e2e

MiB = 1 << 20
READY = re.compile(r"dataplane: tunnel (?:listening on|connected to) \S+:(\d+)")
SERVER_NAME = "dataplane-server"


# ====================================================================== processes and applications


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path
    stats: Path
    port: int = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise AssertionError(key)

    def wait_log(self, pattern: str, timeout: float = 15.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text())
            if m:
                return m.group(0)
            assert self.popen.poll() is None, f"exited ({self.popen.returncode}):\n{self.text()}"
            assert time.monotonic() < deadline, f"no /{pattern}/ after {timeout} s:\n{self.text()}"
            time.sleep(0.02)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        return self.popen.wait(15)


def start(args: list[str], workdir: Path, name: str) -> Proc:
    log, stats = workdir / f"{name}.log", workdir / f"{name}.json"
    with log.open("wb") as err:
        popen = subprocess.Popen([sys.executable, "-m", "dataplane", "--log-level", "info", "tunnel", *args,
                                  "--stats-json", str(stats)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    p = Proc(popen, log, stats)
    m = READY.search(p.wait_log(READY.pattern, 20))
    assert m is not None
    p.port = int(m.group(1))
    return p


@dataclass
class Sink:
    """A unix-socket target: each connection is read to EOF, hashed, and answered with the hex digest."""

    path: str
    digests: list[str] = field(default_factory=list)
    sock: socket.socket | None = None

    def start(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a stream reset by a failed test: Healthy.check reports it
            h = hashlib.sha256()
            buf = bytearray(MiB)
            while n := conn.recv_into(buf):
                h.update(memoryview(buf)[:n])
            self.digests.append(h.hexdigest())
            conn.sendall(h.hexdigest().encode())

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class Healthy:
    """A stream of the healthy session pushed from a thread while an attack runs."""

    def __init__(self, path: str, seed: int, size: int = 48 * MiB) -> None:
        self.data = random.Random(seed).randbytes(size)
        self.answer = b""
        self.error: BaseException | None = None
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            mv = memoryview(self.data)
            for i in range(0, len(mv), 256 * 1024):
                self.sock.sendall(mv[i:i + 256 * 1024])
                time.sleep(0.002)  # spread over the attack
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(60)
            while b := self.sock.recv(4096):
                self.answer += b
        except OSError as exc:
            self.error = exc
        finally:
            self.sock.close()

    def check(self) -> None:
        self.thread.join(90)
        assert self.error is None, f"the healthy stream failed: {self.error}"
        assert self.answer.decode() == hashlib.sha256(self.data).hexdigest(), "the healthy stream was damaged"


# ====================================================================== certificates


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name(cn, "elsewhere")).issuer_name(_name(cn, "elsewhere"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue_client(directory: Path, tag: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                 name: str = "dataplane-client") -> tuple[Path, Path]:
    """A clientAuth certificate named *name* (CN and DNS SAN) signed by the given CA; new key each time."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder().subject_name(_name(name, "dataplane")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, k = directory / f"{tag}.crt", directory / f"{tag}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return crt, k


# ====================================================================== a raw protocol client


def hello(join: tuple[bytes, bytes] | None = None) -> bytes:
    if join is None:
        return frame_bytes(FrameType.HELLO, HelloParams().pack())
    sid, token = join
    return frame_bytes(FrameType.HELLO, HelloParams(sid, token).pack(), flags=1)


@dataclass
class Frames:
    """What a raw client read until the listener closed the connection."""

    preface: tuple[int, int] | None
    frames: list[tuple[int, int, int, bytes]]  # type, aux, stream id, payload
    closed: bool
    error: str | None = None

    def of(self, ftype: int) -> list[tuple[int, int, int, bytes]]:
        return [f for f in self.frames if f[0] == ftype]


class Raw:
    """A hand-driven connection to the listener (plaintext, or TLS with the given config)."""

    def __init__(self, port: int, tls: TLSConfig | None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            sock = client_context(tls).wrap_socket(sock, server_hostname=SERVER_NAME)
        self.sock = sock
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_some(self, n: int, timeout: float = 10.0) -> bytes:
        """Read until at least *n* bytes are buffered (or EOF); return the buffer."""
        self.sock.settimeout(timeout)
        while len(self.buf) < n:
            b = self.sock.recv(65536)
            if not b:
                break
            self.buf += b
        return bytes(self.buf)

    def handshake(self, join: tuple[bytes, bytes] | None = None) -> HelloParams:
        """Preface + HELLO, read preface + WELCOME, send our ACK: the connection is ready."""
        self.send(encode_preface() + hello(join))
        got = self.read_some(PREFACE_SIZE + HEADER_SIZE + 80)
        decode_preface(got[:PREFACE_SIZE])
        (welcome,) = FrameDecoder(1 << 20).feed(got[PREFACE_SIZE:PREFACE_SIZE + HEADER_SIZE + 80])
        assert welcome.type == FrameType.WELCOME, welcome
        self.send(frame_bytes(FrameType.ACK, b"", aux=1, offset=32 << 20))
        return HelloParams.unpack(welcome.payload)

    def until_closed(self, timeout: float = 15.0) -> Frames:
        """Read everything until the listener closes; parse what came."""
        self.sock.settimeout(timeout)
        error = None
        try:
            while b := self.sock.recv(65536):
                self.buf += b
            closed = True
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as exc:
            closed, error = True, f"{type(exc).__name__}: {exc}"
        except TimeoutError:
            closed = False
        preface = decode_preface(self.buf[:PREFACE_SIZE]) if len(self.buf) >= PREFACE_SIZE else None
        frames = []
        with contextlib.suppress(Exception):
            for f in FrameDecoder(1 << 20).feed(bytes(self.buf[PREFACE_SIZE:])):
                frames.append((f.type, f.aux, f.stream_id, bytes(f.payload)))
        return Frames(preface, frames, closed, error)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def flood(raw: Raw, data: bytes, total: int) -> int:
    """Send up to *total* bytes of *data* (repeated) until the listener closes; return what was sent."""
    sent = 0
    mv = memoryview(data)
    raw.sock.settimeout(20)
    try:
        while sent < total:
            n = min(len(mv), total - sent)
            raw.sock.sendall(mv[:n])
            sent += n
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass
    return sent


# ====================================================================== the listener and the healthy session


@dataclass
class Bench:
    mode: str
    pki: CertSet
    workdir: Path
    listen: Proc
    connect: Proc
    sink: Sink
    src: str
    tls: TLSConfig | None  # the healthy client's identity (raw clients use it too)
    idle_rss_kib: int
    seed: int = 0

    def healthy(self) -> Healthy:
        self.seed += 1
        return Healthy(self.src, self.seed)

    def mark(self) -> int:
        return len(self.listen.text())

    def wait_no_pending(self, timeout: float = 5.0) -> None:
        """The listener's stats show no connection waiting for its handshake (none leaked)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.listen.stats.read_text())["pending_connections"] == 0:
                    return
            assert time.monotonic() < deadline, "a half-open connection is still pending at the listener"
            time.sleep(0.1)

    def logged_since(self, mark: int, pattern: str, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.listen.text()[mark:])
            if m:
                return m.group(0)
            since = self.listen.text()[mark:]
            assert time.monotonic() < deadline, f"no /{pattern}/ in the listener's log:\n{since}"
            time.sleep(0.02)


@pytest.fixture(scope="module", params=["plaintext", "tls"])
def bench(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    mode = request.param
    workdir = tmp_path_factory.mktemp(f"badinput-{mode}")
    pki = init_certs(workdir / "pki")
    short = Path(tempfile.mkdtemp(prefix="dp-bad-"))
    sink = Sink(str(short / "dst.sock"))
    sink.start()
    tls = ["--plaintext"] if mode == "plaintext" else ["--certs", str(pki.directory)]
    listen = start(["listen", "--bind", "127.0.0.1:0", "--forward", f"ram=unix:{sink.path}", "--grace", "5",
                    *tls], workdir, "listen")
    connect = start(["connect", "--to", f"127.0.0.1:{listen.port}", "--expose", f"ram=unix:{short}/src.sock",
                     "--connections", "2", *tls], workdir, "connect")
    time.sleep(0.5)
    b = Bench(mode, pki, workdir, listen, connect, sink, str(short / "src.sock"),
              None if mode == "plaintext" else pki.client_config(), listen.status_kib("VmRSS"))
    try:
        yield b
        assert listen.popen.poll() is None, f"the listener died:\n{listen.text()}"
        hwm = listen.status_kib("VmHWM")
        grew = (hwm - b.idle_rss_kib) // 1024
        assert grew < 128, f"the listener's VmHWM grew by {grew} MiB"
        assert connect.stop() == 0
        sess = json.loads(connect.stats.read_text())["sessions"][-1]
        assert sess["connections_lost"] == 0 and sess["reconnects"] == 0, "the healthy session was disturbed"
        assert "Traceback" not in listen.text(), listen.text()
        assert listen.stop() == 0
    finally:
        for p in (connect, listen):
            if p.popen.poll() is None:
                p.popen.kill()
        sink.close()
        shutil.rmtree(short, ignore_errors=True)


# ====================================================================== the attacks


def test_random_bytes_up_to_64_mib(bench: Bench) -> None:
    ok = bench.healthy()
    mark = bench.mark()
    raw = Raw(bench.listen.port, None)  # raw TCP even at a TLS listener: it is not a TLS client
    sent = flood(raw, random.Random(1).randbytes(MiB), 64 * MiB)
    res = raw.until_closed()
    raw.close()
    assert res.closed
    assert sent < 64 * MiB, "the listener kept reading random bytes"
    if bench.mode == "plaintext":
        bench.logged_since(mark, r"closing connection from 127\.0\.0\.1:\d+: not a dataplane channel peer "
                                 r"\(bad preface magic\) \(PROTOCOL\)")
    else:
        bench.logged_since(mark, r"refused a TLS connection: peer does not speak TLS")
    ok.check()


def test_random_bytes_after_a_valid_preface(bench: Bench) -> None:
    """Inside an authenticated TLS connection for the TLS listener: the channel layer must cope too."""
    ok = bench.healthy()
    mark = bench.mark()
    raw = Raw(bench.listen.port, bench.tls)
    raw.send(encode_preface())
    sent = flood(raw, random.Random(2).randbytes(MiB), 64 * MiB)
    res = raw.until_closed()
    raw.close()
    assert res.closed and sent < 64 * MiB
    assert res.preface == (MIN_VERSION, MAX_VERSION)
    bench.logged_since(mark, r"closing connection from 127\.0\.0\.1:\d+: .*\((PROTOCOL|FRAME_SIZE|CHECKSUM)"
                             r"\)")
    ok.check()


def test_truncated_frame_then_eof(bench: Bench) -> None:
    ok = bench.healthy()
    raw = Raw(bench.listen.port, bench.tls)
    raw.send(encode_preface() + hello()[:HEADER_SIZE + 40])  # HELLO announces 80 bytes, 40 follow
    if bench.tls is None:
        raw.sock.shutdown(socket.SHUT_WR)  # EOF in the middle of the frame
        res = raw.until_closed()
        assert res.closed and res.preface == (MIN_VERSION, MAX_VERSION) and res.frames == []
    else:
        assert decode_preface(raw.read_some(PREFACE_SIZE)[:PREFACE_SIZE]) == (MIN_VERSION, MAX_VERSION)
    raw.close()
    bench.wait_no_pending()
    ok.check()


def test_truncated_frame_then_silence_times_out(bench: Bench) -> None:
    """A slow-loris: half a HELLO, then nothing. The handshake timeout (10 s) closes it."""
    ok = bench.healthy()
    mark = bench.mark()
    raw = Raw(bench.listen.port, bench.tls)
    raw.send(encode_preface() + hello()[:HEADER_SIZE + 40])
    t0 = time.monotonic()
    res = raw.until_closed(timeout=20)
    raw.close()
    assert res.closed and 8 < time.monotonic() - t0 < 15
    bench.logged_since(mark, r"closing connection from 127\.0\.0\.1:\d+: handshake timed out \(TIMEOUT\)")
    ok.check()


def test_huge_length_fields(bench: Bench) -> None:
    ok = bench.healthy()
    mark = bench.mark()
    # before the handshake: a HELLO header claiming 4 GiB of payload
    raw = Raw(bench.listen.port, bench.tls)
    head = bytearray(frame_bytes(FrameType.HELLO, HelloParams().pack())[:HEADER_SIZE])
    struct.pack_into("!I", head, 4, 0xFFFFFFFF)
    raw.send(encode_preface() + bytes(head))
    res = raw.until_closed()
    raw.close()
    assert res.closed and res.frames == []
    bench.logged_since(mark, r"closing connection from 127\.0\.0\.1:\d+: .*\(FRAME_SIZE\)")
    # in a session: a DATA frame claiming 4 GiB ends that session, with GOAWAY FRAME_SIZE
    raw = Raw(bench.listen.port, bench.tls)
    raw.handshake()
    head = bytearray(frame_bytes(FrameType.DATA, b"x", stream_id=1, aux=1)[:HEADER_SIZE])
    struct.pack_into("!I", head, 4, 0xFFFFFFFF)
    raw.send(bytes(head) + bytes(1024))
    res = raw.until_closed()
    raw.close()
    (goaway,) = res.of(FrameType.GOAWAY)
    assert goaway[1] == ErrorCode.FRAME_SIZE, goaway
    bench.logged_since(mark, r"session \w+ with .* failed: .*\(FRAME_SIZE\)")
    ok.check()


def test_unknown_frame_types(bench: Bench) -> None:
    ok = bench.healthy()
    mark = bench.mark()
    raw = Raw(bench.listen.port, bench.tls)
    raw.send(encode_preface() + frame_bytes(0x7E, b"hello?"))
    res = raw.until_closed()
    raw.close()
    assert res.closed and res.frames == []
    bench.logged_since(mark, r"closing connection from 127\.0\.0\.1:\d+: .*\(PROTOCOL\)")
    raw = Raw(bench.listen.port, bench.tls)
    raw.handshake()
    raw.send(frame_bytes(0x66, b"\x00" * 100))
    res = raw.until_closed()
    raw.close()
    (goaway,) = res.of(FrameType.GOAWAY)
    assert goaway[1] == ErrorCode.PROTOCOL
    ok.check()


def test_frames_for_unknown_streams(bench: Bench) -> None:
    ok = bench.healthy()
    mark = bench.mark()
    raw = Raw(bench.listen.port, bench.tls)
    raw.handshake()
    raw.send(frame_bytes(FrameType.DATA, b"payload", stream_id=99, aux=7, offset=0))
    res = raw.until_closed()
    raw.close()
    (goaway,) = res.of(FrameType.GOAWAY)
    assert goaway[1] == ErrorCode.PROTOCOL and "unknown stream 99" in decode_text(goaway[3])
    bench.logged_since(mark, r"failed: DATA for unknown stream 99 \(PROTOCOL\)")
    # a FIN for a stream nobody opened
    raw = Raw(bench.listen.port, bench.tls)
    raw.handshake()
    raw.send(frame_bytes(FrameType.FIN, b"", stream_id=5, offset=0, seq=1))
    res = raw.until_closed()
    raw.close()
    (goaway,) = res.of(FrameType.GOAWAY)
    assert goaway[1] == ErrorCode.PROTOCOL
    ok.check()


def test_resume_token_replayed_from_another_identity(bench: Bench) -> None:
    """A session created by one TLS identity cannot be joined by another one holding its token."""
    ok = bench.healthy()
    mark = bench.mark()
    owner = Raw(bench.listen.port, bench.tls)
    params = owner.handshake()
    assert any(params.session_id) and any(params.token)
    if bench.mode == "tls":
        ca_cert = x509.load_pem_x509_certificate(bench.pki.cas[0].cert.read_bytes())
        ca_key = serialization.load_pem_private_key(bench.pki.cas[0].key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        crt, key = issue_client(bench.workdir, "impostor", ca_cert, ca_key)  # same CA, same name, other key
        impostor_tls: TLSConfig | None = TLSConfig.from_paths(crt, key, bench.pki.client.trust, SERVER_NAME)
        attempts = [(params.session_id, params.token)]
    else:  # no identities without TLS: at least a wrong token must be refused
        impostor_tls = None
        attempts = [(params.session_id, bytes(31) + b"\x01")]
    for join in attempts:
        thief = Raw(bench.listen.port, impostor_tls)
        thief.send(encode_preface() + hello(join))
        res = thief.until_closed()
        thief.close()
        (refuse,) = res.of(FrameType.REFUSE)
        assert refuse[1] == ErrorCode.RESUME_REFUSED, refuse
        assert not res.of(FrameType.WELCOME)
    bench.logged_since(mark, r"closing connection from 127\.0\.0\.1:\d+: unknown session, wrong resume "
                             r"token or wrong identity \(RESUME_REFUSED\)")
    # the owner's session is untouched: its own identity still joins it
    again = Raw(bench.listen.port, bench.tls)
    joined = again.handshake(join=(params.session_id, params.token))
    assert joined.session_id == params.session_id and not any(joined.token)
    again.close()
    owner.close()
    ok.check()


@pytest.mark.parametrize("bench", ["tls"], indirect=True)
def test_client_certificate_from_another_ca(bench: Bench) -> None:
    ok = bench.healthy()
    mark = bench.mark()
    ca_cert, ca_key = _ca("other-ca")
    crt, key = issue_client(bench.workdir, "foreign", ca_cert, ca_key)
    foreign = TLSConfig.from_paths(crt, key, bench.pki.client.trust, SERVER_NAME)
    raw = Raw(bench.listen.port, foreign)  # TLS 1.3: our handshake completes, the refusal comes on read
    with contextlib.suppress(OSError):
        raw.send(encode_preface() + hello())
    res = raw.until_closed()
    raw.close()
    assert res.closed and res.preface is None and res.frames == []
    bench.logged_since(mark, r"refused a TLS connection: peer certificate is not signed by the trusted "
                             r"CA bundle \S+server-trust\.pem")
    ok.check()
