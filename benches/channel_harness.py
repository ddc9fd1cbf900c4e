"""Harness of the streaming-channel benchmarks (``benches/test_bench_channel.py``).

Pieces, each usable on its own:

* **Data**: :func:`make_text` (compressible text: Zipf phrases over a generated
  vocabulary, with numbers and punctuation; never constant) and
  :func:`make_random`; :func:`data_file` writes a buffer to a file once, which
  the source process loads and sends over and over.
* **Source and sink processes**: ``python -m benches.channel_harness source|sink``.
  The source loads the buffer, computes the CRC-32 of exactly the byte
  stream it is going to send (before it connects: off the clock), waits for a
  ``HOST PORT`` line on stdin, then ``sendall``\\ s the buffer repeatedly. The
  sink accepts one connection and ``recv_into``\\ s a pool of reusable 4 MiB
  buffers; a second thread runs ``zlib.crc32`` over each filled buffer
  (CRC-32 releases the GIL and runs at ~3.5 GB/s here, so it never limits the
  sink). Both print one JSON line with their byte count, CRC-32 and
  ``CLOCK_MONOTONIC`` times (shared by every process on the machine,
  namespaces included): a transfer lasts from the source's first ``send`` to
  the sink's last ``recv``.
* **Places**: :class:`Place` runs a process in the root namespace or in one
  side of a :class:`~dataplane.testing.netns.Link`.
* **Relay pairs**: :class:`RelayPair` is the one interface of "something
  that carries a TCP stream from an entry address to a target":
  :class:`SocatChain` (two socat relays), :class:`StunnelPair` (stunnel
  client + server, mutual TLS 1.3) and :class:`DataplaneTunnel` (``dataplane
  tunnel connect`` + ``dataplane tunnel listen``), and :class:`FramedFloor`
  (``python -m benches.channel_harness framed-relay``: the least work a
  relay can do and still frame and checksum every byte as our wire format
  does; a calibration of ``channel_plain_vs_socat2``, not a product).
* :func:`transfer` runs one timed, integrity-checked transfer through a relay
  pair (or directly), sampling the relays' memory (VmRSS every 50 ms, VmHWM at
  the end, from ``/proc/PID/status``) and CPU time (``/proc/PID/stat``).

Every process is started in its own session (process group) and killed by
group by :class:`Procs` when the run ends, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import mmap
import os
import queue
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dataplane.channel.frames import HEADER, HEADER_SIZE, FrameType, encode_frame
from dataplane.native.checksum import frame_checksum
from dataplane.testing.commands import child_env, dataplane_argv, stunnel_binary
from dataplane.testing.netns import listening_tcp_ports
from dataplane.testing.textgen import make_text

ROOT = Path(__file__).resolve().parent.parent
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SOCAT_BUFFER = 256 * KiB
SOCAT_DEFAULT_BUFFER = 8 * KiB  # socat's own -b default
SINK_SLOT = 4 * MiB
SINK_SLOTS = 8
STORE_LIMIT = 4 * GiB


def clock() -> float:
    """CLOCK_MONOTONIC: one clock for every process of the machine (network namespaces included)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# --------------------------------------------------------------------------- data

def make_random(nbytes: int, seed: int = 2) -> bytes:
    """*nbytes* of seeded pseudo-random bytes (incompressible)."""
    return random.Random(seed).randbytes(nbytes)


def data_file(directory: Path, kind: str, nbytes: int = 16 * MiB, seed: int = 1) -> Path:
    """Write (once) the *kind* (``text`` or ``random``) buffer into *directory*; return its path."""
    path = directory / f"{kind}-{nbytes}-{seed}.bin"
    if not path.exists():
        data = make_text(nbytes, seed) if kind == "text" else make_random(nbytes, seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def stream_pieces(buf: memoryview, size: int) -> Iterator[memoryview]:
    """The stream a source sends: *buf* repeated, cut at *size* bytes."""
    left = size
    while left > 0:
        piece = buf[:min(left, len(buf))]
        left -= len(piece)
        yield piece


# --------------------------------------------------------------------------- source / sink processes


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def run_source(data: Path, size: int) -> None:
    """Source process: announce the CRC, read ``HOST PORT`` from stdin, send *size* bytes, report."""
    buf = memoryview(data.read_bytes())
    crc = 0
    for piece in stream_pieces(buf, size):
        crc = zlib.crc32(piece, crc)
    _emit({"ready": True, "crc": crc})
    line = sys.stdin.readline().split()
    if not line:
        raise SystemExit("source: no target on stdin")
    host, port = line[0], int(line[1])
    sock = socket.create_connection((host, port), timeout=30)
    sock.settimeout(None)
    sent = 0
    cpu0 = _cpu_seconds()
    t_start = clock()
    for piece in stream_pieces(buf, size):
        sock.sendall(piece)
        sent += len(piece)
    t_sent = clock()
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(120)
    with contextlib.suppress(OSError):  # wait for the far end to close (the relay drained everything)
        while sock.recv(65536):
            pass
    sock.close()
    _emit({"sent": sent, "crc": crc, "t_start": t_start, "t_sent": t_sent,
           "cpu": _cpu_seconds() - cpu0})


def _sink_store(conn: socket.socket, area: mmap.mmap) -> dict[str, Any]:
    """Receive into *area* (pre-faulted, the announced size); CRC it after the last byte (off the clock)."""
    expect = len(area)
    mv = memoryview(area)
    scratch = memoryview(bytearray(SINK_SLOT))
    n = extra = extra_crc = 0
    t_first = t_last = 0.0
    while True:
        if n < expect:
            got = conn.recv_into(mv[n:])
            n += got
        else:  # more than announced: count it (the check fails) without storing it
            got = conn.recv_into(scratch)
            extra_crc = zlib.crc32(scratch[:got], extra_crc)
            extra += got
        if not got:
            break
        t_last = clock()
        if not t_first:
            t_first = t_last
    cpu = _cpu_seconds()
    crc = zlib.crc32(mv[:n])
    if extra:
        crc ^= extra_crc or 1  # anything but the source's CRC: the byte counts already differ
    mv.release()
    area.close()
    return {"received": n + extra, "crc": crc, "t_first": t_first, "t_last": t_last, "cpu": cpu}


def _sink_stream(conn: socket.socket) -> dict[str, Any]:
    """Receive into a pool of reused buffers; a second thread CRCs each filled buffer meanwhile."""
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(SINK_SLOTS):
        free.put(bytearray(SINK_SLOT))
    full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    state = {"crc": 0}

    def hasher() -> None:
        crc = 0
        while (item := full.get()) is not None:
            slot, n = item
            crc = zlib.crc32(memoryview(slot)[:n], crc)
            free.put(slot)
        state["crc"] = crc

    th = threading.Thread(target=hasher, daemon=True)
    th.start()
    received = 0
    t_first = t_last = 0.0
    eof = False
    while not eof:
        slot = free.get()
        mv = memoryview(slot)
        n = 0
        while n < SINK_SLOT:
            got = conn.recv_into(mv[n:])
            if not got:
                eof = True
                break
            t_last = clock()
            if not t_first:
                t_first = t_last
            n += got
        received += n
        full.put((slot, n))
    full.put(None)
    th.join()
    return {"received": received, "crc": state["crc"], "t_first": t_first, "t_last": t_last,
            "cpu": _cpu_seconds()}


def run_sink(bind: str, expect: int | None) -> None:
    """Sink process: accept one connection on *bind*, receive to EOF, report count, CRC-32 and times.

    With *expect* (the announced size, up to STORE_LIMIT) the stream is
    received into one pre-faulted mapping and hashed after the last byte, so
    hashing costs the transfer nothing; otherwise a hashing thread keeps up
    with a pool of reused buffers (that CPU then competes with the relays).
    """
    host, port = _parse_addr(bind)
    server = socket.create_server((host, port))
    store = expect is not None and 0 < expect <= STORE_LIMIT
    if store:  # pre-faulted before the port is announced: page faults stay off the clock
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        result_fn = functools.partial(_sink_store, area=mmap.mmap(-1, expect, flags=flags))
    else:
        result_fn = _sink_stream
    _emit({"port": server.getsockname()[1]})
    conn, _ = server.accept()
    server.close()
    cpu0 = _cpu_seconds()
    result = result_fn(conn)
    conn.close()
    _emit({**result, "cpu": result["cpu"] - cpu0, "mode": "store" if store else "stream"})


# --------------------------------------------------------------------------- places and processes


@dataclass(frozen=True)
class Place:
    """Where a process runs: the root namespace (``link=None``) or side ``"a"``/``"b"`` of a Link."""

    link: Any = None  # dataplane.testing.netns.Link (imported lazily: namespaces need root)
    side: str = "a"

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        if self.link is None:
            return subprocess.Popen(list(argv), **kwargs)
        return self.link.popen(self.side, list(argv), **kwargs)

    def free_port(self, host: str) -> int:
        """A TCP port free on *host* in this place (bound and released: a tiny race, fine for benches)."""
        ctx = self.link.in_netns(self.side) if self.link is not None else contextlib.nullcontext()
        with ctx, socket.socket() as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    def __str__(self) -> str:
        return "root namespace" if self.link is None else f"{self.link.netns(self.side)}"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[Any]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class HarnessError(RuntimeError):
    """A process of the harness failed or timed out; the message has its stderr tail."""


class Procs:
    """Starts processes (each in its own process group, stderr to a log file); kills them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self._n = itertools.count()

    def spawn(self, place: Place, name: str, argv: Sequence[str], *, stdin: int | None = None,
              stdout: int | None = None) -> Proc:
        log = self.workdir / f"{next(self._n):03d}-{name}.log"
        with log.open("wb") as err:
            popen = place.popen(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                stdout=stdout if stdout is not None else subprocess.DEVNULL, stderr=err,
                                start_new_session=True, cwd=ROOT, env=child_env())
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    @staticmethod
    def send_signal(proc: Proc, sig: int) -> None:
        """Send *sig* to *proc*'s process group, only while the process is not reaped (its pid is ours)."""
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    def stop(self, proc: Proc, sig: int = signal.SIGINT, timeout: float = 10) -> int | None:
        """Ask *proc* to stop with *sig*, then SIGKILL its group after *timeout*; return its status."""
        self.send_signal(proc, sig)
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
            return None

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.send_signal(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
            for f in (proc.popen.stdin, proc.popen.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        self.procs.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_json_line(proc: Proc, deadline: float) -> dict[str, Any]:
    """The next JSON line *proc* writes on stdout before *deadline* (clock()); HarnessError otherwise."""
    out: IO[bytes] = proc.popen.stdout  # type: ignore[assignment]
    fd = out.fileno()
    buf = b""
    while b"\n" not in buf:
        left = deadline - clock()
        if left <= 0:
            raise HarnessError(f"{proc.name}: no result within the time limit\n{proc.log_tail()}")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                proc.popen.wait(5)
                raise HarnessError(f"{proc.name} exited ({proc.popen.returncode}) without a result\n"
                                   f"{proc.log_tail()}")
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def wait_listening(proc: Proc, port: int, timeout: float = 20) -> None:
    """Wait until *port* listens in *proc*'s namespace; HarnessError if *proc* dies or time runs out."""
    deadline = clock() + timeout
    while port not in listening_tcp_ports(proc.pid):
        if proc.popen.poll() is not None:
            raise HarnessError(f"{proc.name} exited ({proc.popen.returncode})\n{proc.log_tail()}")
        if clock() > deadline:
            raise HarnessError(f"{proc.name}: port {port} not listening after {timeout} s\n{proc.log_tail()}")
        time.sleep(0.02)


def wait_log(proc: Proc, pattern: str, timeout: float = 30) -> str:
    """Wait until *proc*'s stderr log has a line matching *pattern*; return that line."""
    rx = re.compile(pattern)
    deadline = clock() + timeout
    while True:
        with contextlib.suppress(OSError):
            for line in proc.log.read_text(errors="replace").splitlines():
                if rx.search(line):
                    return line
        if proc.popen.poll() is not None:
            raise HarnessError(f"{proc.name} exited ({proc.popen.returncode}) before logging "
                               f"/{pattern}/\n{proc.log_tail()}")
        if clock() > deadline:
            raise HarnessError(f"{proc.name}: no /{pattern}/ on stderr after {timeout} s\n{proc.log_tail()}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- memory


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field (``VmHWM``, ``VmRSS``) of /proc/PID/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of *pid* (all its threads) from /proc/PID/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcSampler:
    """Samples VmRSS and CPU time of some pids every *interval* seconds in a thread.

    Keeps each process's VmRSS peak and the CPU seconds it used between the
    first and the last sample (a process that exits early keeps its last
    sample, at most *interval* old).
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_kib: dict[str, int] = dict.fromkeys(pids, 0)
        self._cpu_first: dict[str, float] = {}
        self._cpu_last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            kib = proc_status_kib(pid, "VmRSS")
            if kib is not None:
                self.peak_kib[name] = max(self.peak_kib[name], kib)
            cpu = proc_cpu_seconds(pid)
            if cpu is not None:
                self._cpu_first.setdefault(name, cpu)
                self._cpu_last[name] = cpu

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)
        self._sample()

    @property
    def cpu_seconds(self) -> dict[str, float]:
        return {name: self._cpu_last[name] - self._cpu_first[name] for name in self._cpu_last}

    def __enter__(self) -> ProcSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- relay pairs


def tunnel_unavailable_reason() -> str | None:
    """Why ``dataplane tunnel`` cannot be benchmarked (the command does not exist yet), or None."""
    try:
        proc = subprocess.run([*dataplane_argv(), "tunnel", "--help"], capture_output=True, timeout=60,
                              cwd=ROOT, env=child_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`dataplane tunnel --help` failed: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        return f"`dataplane tunnel` is not available: {err[-1] if err else proc.returncode}"
    return None


class RelayPair(ABC):
    """Two relay processes carrying one TCP stream: entry (source side) -> mid-hop -> target (sink side).

    ``entry`` / ``exit`` are where the two ends run; ``mid_host`` is the
    address the exit end listens on for the entry end (``127.0.0.1`` on
    loopback, side B's address across a Link). :meth:`start` starts both
    ends towards *target* (an address reachable from ``exit``) and returns
    the address the source dials from ``entry``.
    """

    label = "relay"

    def __init__(self, procs: Procs, entry: Place, exit: Place, mid_host: str = "127.0.0.1") -> None:
        self.procs = procs
        self.entry = entry
        self.exit = exit
        self.mid_host = mid_host
        self.ends: dict[str, Proc] = {}

    @abstractmethod
    def start(self, target: tuple[str, int]) -> tuple[str, int]: ...

    def endpoint_pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.ends.items()}

    def info(self) -> dict[str, Any]:
        """Anything worth printing about the last run (cipher, stats); read before :meth:`stop`."""
        return {}

    def stop(self) -> None:
        for p in self.ends.values():
            self.procs.stop(p, signal.SIGTERM)

    def describe(self) -> str:
        return self.label


class SocatChain(RelayPair):
    """``source -> socat A -> socat B -> target``: two single-connection socat relays with ``-b`` buffers."""

    label = "socat x2"

    def __init__(self, *args: Any, buffer: int = SOCAT_BUFFER, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = buffer

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        mid = self.exit.free_port(self.mid_host)
        entry = self.entry.free_port("127.0.0.1")
        b = self.procs.spawn(self.exit, "socat-b", ["socat", "-b", str(self.buffer),
                             f"TCP-LISTEN:{mid},bind={self.mid_host},reuseaddr",
                             f"TCP:{target[0]}:{target[1]}"])
        a = self.procs.spawn(self.entry, "socat-a", ["socat", "-b", str(self.buffer),
                             f"TCP-LISTEN:{entry},bind=127.0.0.1,reuseaddr",
                             f"TCP:{self.mid_host}:{mid}"])
        self.ends = {"a": a, "b": b}
        wait_listening(b, mid)
        wait_listening(a, entry)
        return "127.0.0.1", entry

    def describe(self) -> str:
        return f"socat x2 (-b {self.buffer})"


class FramedFloor(RelayPair):
    """Two ends of the minimal framed relay (:func:`run_framed_relay`): what framing and checksums cost.

    Not a product: it only measures, in the same run as socat, how fast a
    relay goes that does socat's work plus what our wire format demands of
    every byte (a 32-byte header per frame, an XXH3 checksum on both ends),
    without flow control, resumption, multiplexing or an event loop.
    """

    label = "minimal framed relay"

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        mid = self.exit.free_port(self.mid_host)
        entry = self.entry.free_port("127.0.0.1")
        py = [sys.executable, "-m", "benches.channel_harness", "framed-relay"]
        b = self.procs.spawn(self.exit, "framed-exit", [
            *py, "exit", "--bind", f"{self.mid_host}:{mid}", "--to", f"{target[0]}:{target[1]}"])
        wait_listening(b, mid)
        a = self.procs.spawn(self.entry, "framed-entry", [
            *py, "entry", "--bind", f"127.0.0.1:{entry}", "--to", f"{self.mid_host}:{mid}"])
        self.ends = {"entry": a, "exit": b}
        wait_listening(a, entry)
        return "127.0.0.1", entry

    def describe(self) -> str:
        return f"minimal framed relay ({FLOOR_FRAME // KiB} KiB frames, XXH3)"


class StunnelPair(RelayPair):
    """stunnel client (entry) + stunnel server (exit): TLS 1.3 only, mutual auth, names checked.

    Certificates are those of :func:`dataplane.certs.init_certs` (*certs* is
    its CertSet): the client presents ``client.crt`` and pins
    ``client-trust.pem`` and the server's name; the server requires a client
    certificate from ``server-trust.pem`` with the client's name.
    """

    label = "stunnel pair"

    def __init__(self, *args: Any, certs: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.certs = certs
        binary = stunnel_binary()
        if binary is None:
            raise HarnessError("stunnel is not installed")
        self.binary = binary

    def _conf(self, role: str, accept: str, connect: str) -> Path:
        ident = self.certs.client if role == "client" else self.certs.server
        peer = self.certs.server if role == "client" else self.certs.client
        lines = [
            "foreground = yes", "pid =", "debug = 6", "syslog = no",
            "[relay]",
            f"client = {'yes' if role == 'client' else 'no'}",
            f"accept = {accept}", f"connect = {connect}",
            f"cert = {ident.cert}", f"key = {ident.key}", f"CAfile = {ident.trust}",
            "verifyChain = yes", "requireCert = yes", f"checkHost = {peer.names[0]}",
            "sslVersionMin = TLSv1.3", "sslVersionMax = TLSv1.3",
        ]
        path = self.procs.workdir / f"stunnel-{role}-{os.getpid()}-{id(self)}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        mid = self.exit.free_port(self.mid_host)
        entry = self.entry.free_port("127.0.0.1")
        server = self._conf("server", f"{self.mid_host}:{mid}", f"{target[0]}:{target[1]}")
        client = self._conf("client", f"127.0.0.1:{entry}", f"{self.mid_host}:{mid}")
        b = self.procs.spawn(self.exit, "stunnel-server", [self.binary, str(server)])
        a = self.procs.spawn(self.entry, "stunnel-client", [self.binary, str(client)])
        self.ends = {"client": a, "server": b}
        wait_listening(b, mid)
        wait_listening(a, entry)
        return "127.0.0.1", entry

    def info(self) -> dict[str, Any]:
        for line in self.ends["client"].log.read_text(errors="replace").splitlines():
            m = re.search(r"(TLSv1\.\d) ciphersuite: (\S+)", line)
            if m:
                return {"tls": f"{m.group(1)} {m.group(2)}"}
        return {}


class DataplaneTunnel(RelayPair):
    """``dataplane tunnel connect --expose`` (entry) + ``dataplane tunnel listen --forward`` (exit).

    ``certs``: a CertSet for mutual TLS, or None for ``--plaintext``.
    ``extra``: more options for both ends (``--compress``, ``--connections`` goes to connect only).
    """

    label = "dataplane tunnel"
    STREAM = "bench"

    def __init__(self, *args: Any, certs: Any = None, compress: str | None = None,
                 connections: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.certs = certs
        self.compress = compress
        self.connections = connections
        self.stats_paths: dict[str, Path] = {}

    def _common(self, role: str) -> list[str]:
        argv: list[str] = []
        if self.certs is None:  # the namespaces' veth reaches no other host
            argv += ["--plaintext", "--plaintext-network-is-isolated"]
        else:
            ident = self.certs.server if role == "listen" else self.certs.client
            peer = self.certs.client if role == "listen" else self.certs.server
            argv += ["--cert", str(ident.cert), "--key", str(ident.key), "--ca", str(ident.trust),
                     "--peer-name", peer.names[0]]
        if self.compress is not None:
            argv += ["--compress", self.compress]
        stats = self.procs.workdir / f"tunnel-{role}-stats-{id(self)}.json"
        stats.unlink(missing_ok=True)
        self.stats_paths[role] = stats
        argv += ["--stats-json", str(stats)]
        return argv

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        mid = self.exit.free_port(self.mid_host)
        entry = self.entry.free_port("127.0.0.1")
        dp = dataplane_argv()
        listen = self.procs.spawn(self.exit, "tunnel-listen", [
            *dp, "tunnel", "listen", "--bind", f"{self.mid_host}:{mid}",
            "--forward", f"{self.STREAM}=tcp:{target[0]}:{target[1]}", *self._common("listen")])
        self.ends = {"listen": listen}
        wait_log(listen, r"tunnel listening on")
        conn_opts = ["--connections", str(self.connections)] if self.connections else []
        connect = self.procs.spawn(self.entry, "tunnel-connect", [
            *dp, "tunnel", "connect", "--to", f"{self.mid_host}:{mid}",
            "--expose", f"{self.STREAM}=tcp:127.0.0.1:{entry}", *conn_opts, *self._common("connect")])
        self.ends = {"connect": connect, "listen": listen}
        wait_log(connect, r"tunnel connected to")
        wait_listening(connect, entry)
        return "127.0.0.1", entry

    def stop(self) -> None:
        for p in self.ends.values():
            self.procs.stop(p, signal.SIGINT)

    def stats(self) -> dict[str, Any]:
        """The ``--stats-json`` documents of both ends (after :meth:`stop`), by role; missing ones omitted."""
        out: dict[str, Any] = {}
        for role, path in self.stats_paths.items():
            with contextlib.suppress(OSError, ValueError):
                out[role] = json.loads(path.read_text())
        return out

    def describe(self) -> str:
        opts = ["plaintext" if self.certs is None else "mTLS"]
        if self.compress:
            opts.append(f"compress {self.compress}")
        if self.connections:
            opts.append(f"{self.connections} connections")
        return f"dataplane tunnel ({', '.join(opts)})"


# --------------------------------------------------------------------------- one transfer


@dataclass
class Transfer:
    """One timed transfer: what was sent and received, how long it took, the relays' memory."""

    label: str
    size: int
    seconds: float
    sent: int
    sent_crc: int
    received: int
    received_crc: int
    hwm_kib: dict[str, int] = field(default_factory=dict)
    rss_peak_kib: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    wire: dict[str, dict[str, int]] | None = None  # veth counters delta, across a Link
    source_cpu: float = 0.0  # CPU seconds (user + system) of the source while sending
    relay_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of each relay end, sampled
    sink_cpu: float = 0.0

    @property
    def mb_per_s(self) -> float:
        """Application throughput in MB/s (10**6 bytes per second)."""
        return self.received / self.seconds / 1e6

    @property
    def intact(self) -> bool:
        return self.received == self.sent == self.size and self.received_crc == self.sent_crc

    def integrity(self) -> str:
        return (f"sent {self.sent} B crc32 {self.sent_crc:08x}, received {self.received} B "
                f"crc32 {self.received_crc:08x} (expected {self.size} B)")

    def max_hwm_mib(self) -> float:
        return max(self.hwm_kib.values(), default=0) / 1024


def transfer(procs: Procs, relay: RelayPair | None, data: Path, size: int, *, src: Place, dst: Place,
             sink_host: str = "127.0.0.1", timeout: float = 240, label: str | None = None) -> Transfer:
    """Send *size* bytes of *data* (repeated) from a source in *src* to a sink in *dst*, through *relay*.

    Without a relay the source dials the sink directly (the sink then binds
    *sink_host*). The relay is started for this transfer and stopped after
    it (its VmHWM read just before). Raises HarnessError if a process fails
    or the transfer does not end within *timeout* seconds.
    """
    deadline = clock() + timeout
    py = [sys.executable, "-m", "benches.channel_harness"]
    sink = procs.spawn(dst, "sink", [*py, "sink", "--bind", f"{sink_host}:0", "--expect", str(size)],
                       stdout=subprocess.PIPE)
    source = procs.spawn(src, "source", [*py, "source", "--data", str(data), "--size", str(size)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(read_json_line(sink, clock() + 30)["port"])
        entry = relay.start((sink_host, port)) if relay is not None else (sink_host, port)
        ready = read_json_line(source, clock() + 60)
        if not ready.get("ready"):
            raise HarnessError(f"source: unexpected {ready}")
        pids = relay.endpoint_pids() if relay is not None else {}
        link = src.link if src.link is not None else dst.link
        before = link.counters() if link is not None else None
        with ProcSampler(pids) as sampler:
            assert source.popen.stdin is not None
            source.popen.stdin.write(f"{entry[0]} {entry[1]}\n".encode())
            source.popen.stdin.flush()
            got = read_json_line(sink, deadline)
            sent = read_json_line(source, deadline)
        wire = None
        if before is not None:
            after = link.counters()
            wire = {s: {k: after[s][k] - before[s][k] for k in after[s]} for s in after}
        hwm = {name: proc_status_kib(pid, "VmHWM") or 0 for name, pid in pids.items()}
        info = relay.info() if relay is not None else {}
    finally:
        if relay is not None:
            relay.stop()
        for p in (source, sink):
            procs.stop(p, signal.SIGTERM, timeout=5)
    if isinstance(relay, DataplaneTunnel):
        info["stats"] = relay.stats()
    return Transfer(
        label=label or (relay.describe() if relay is not None else "direct TCP"),
        size=size,
        seconds=float(got["t_last"]) - float(sent["t_start"]),
        sent=int(sent["sent"]),
        sent_crc=int(sent["crc"]),
        received=int(got["received"]),
        received_crc=int(got["crc"]),
        hwm_kib=hwm,
        rss_peak_kib=dict(sampler.peak_kib),
        relay_cpu=sampler.cpu_seconds,
        info=info,
        wire=wire,
        source_cpu=float(sent.get("cpu", 0.0)),
        sink_cpu=float(got.get("cpu", 0.0)),
    )


# --------------------------------------------------------------------------- minimal framed relay

FLOOR_FRAME = 256 * KiB  # socat's -b: one read, one frame
_FLOOR_HEAD = HEADER_SIZE - 4  # the checksum covers header bytes 0..27


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill *view* from *sock*; False if the peer closed first (a clean end only before the first byte)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            if got:
                raise SystemExit(f"framed-relay: peer closed after {got} of {len(view)} bytes")
            return False
        got += n
    return True


def run_framed_relay(role: str, bind: str, to: str) -> None:
    """One end of the minimal framed relay (see :class:`FramedFloor`); returns when the stream has ended.

    ``entry``: accept one application connection on *bind*, dial the exit end
    at *to*, and send what it reads as DATA frames of our wire format (32-byte
    header, XXH3 frame checksum), one frame per read of up to FLOOR_FRAME.
    ``exit``: accept the entry end on *bind*, dial the target at *to*, check
    every frame's checksum and write its payload. Blocking sockets, one
    reused page-aligned buffer per end (as socat reuses its ``-b`` buffer),
    no flow control, no replay buffer, no second stream. Exits with an error
    on a checksum mismatch or a truncated frame.
    """
    host, port = _parse_addr(bind)
    with socket.create_server((host, port)) as srv:
        print(f"framed-relay {role} listening on {host}:{port}", file=sys.stderr, flush=True)
        inbound, _ = srv.accept()
    outbound = socket.create_connection(_parse_addr(to), timeout=30)
    outbound.settimeout(None)
    buf = memoryview(mmap.mmap(-1, FLOOR_FRAME))
    if role == "entry":
        offset = 0
        while n := inbound.recv_into(buf):
            head, payload = encode_frame(FrameType.DATA, buf[:n], stream_id=1, aux=n, offset=offset)
            pieces = [memoryview(head), payload]
            while pieces:  # sendmsg takes part of it when the socket buffer fills
                sent = outbound.sendmsg(pieces)
                while pieces and sent >= len(pieces[0]):
                    sent -= len(pieces.pop(0))
                if sent:
                    pieces[0] = pieces[0][sent:]
            offset += n
    else:
        head = memoryview(bytearray(HEADER_SIZE))
        while _recv_exactly(inbound, head):
            fields = HEADER.unpack_from(head)
            length, check = fields[3], fields[8]
            if length > FLOOR_FRAME:
                raise SystemExit(f"framed-relay: frame of {length} bytes (limit {FLOOR_FRAME})")
            payload = buf[:length]
            if not _recv_exactly(inbound, payload):
                raise SystemExit("framed-relay: peer closed inside a frame")
            if frame_checksum(head[:_FLOOR_HEAD], payload) != check:
                raise SystemExit("framed-relay: frame checksum mismatch")
            outbound.sendall(payload)
    outbound.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):  # the far end closes once it has everything
        while outbound.recv(65536):
            pass
    outbound.close()
    inbound.close()


# --------------------------------------------------------------------------- command line (the processes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.channel_harness",
                                     description="source and sink processes of the channel benchmarks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_src = sub.add_parser("source", help="send --size bytes of --data (repeated) to HOST PORT read on stdin")
    p_src.add_argument("--data", type=Path, required=True)
    p_src.add_argument("--size", type=int, required=True)
    p_sink = sub.add_parser("sink", help="accept one connection on --bind HOST:PORT and receive to EOF")
    p_sink.add_argument("--bind", default="127.0.0.1:0")
    p_sink.add_argument("--expect", type=int, help="announced size: receive into one buffer, hash afterwards")
    p_relay = sub.add_parser("framed-relay", help="one end of the minimal framed relay (FramedFloor)")
    p_relay.add_argument("role", choices=("entry", "exit"))
    p_relay.add_argument("--bind", required=True, help="HOST:PORT to accept one connection on")
    p_relay.add_argument("--to", required=True, help="HOST:PORT to dial once that connection is in")
    args = parser.parse_args(argv)
    if args.cmd == "source":
        run_source(args.data, args.size)
    elif args.cmd == "sink":
        run_sink(args.bind, args.expect)
    else:
        run_framed_relay(args.role, args.bind, args.to)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
