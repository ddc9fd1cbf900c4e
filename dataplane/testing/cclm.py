"""A reusable cross-cluster live migration (CCLM) scenario: two "clusters", a real guest, three paths.

Used by the CCLM benchmark (``benches/test_bench_cclm.py``), by end-to-end
tests and by the demo. The pieces:

* :class:`Clusters`: two network namespaces joined by a shaped veth
  (:class:`~dataplane.testing.netns.Link`, e.g. 1 Gbit/s) and a certificate
  set from two CAs (``dataplane certs init --two-cas``; the server
  certificate carries ``dataplane-server`` and side B's address, the one the
  source dials).
* :class:`DiskLayout` / :func:`write_disk`: a data disk with a mix of
  text-like, random and zero regions separated by holes (e.g. ~300 MiB of
  data in a 1 GiB raw image).
* :class:`GuestRecipe`: memory size, the workload (heartbeat, memory dirtying
  rate and pattern, disk journal) and the disks. Every guest has a small
  journal disk (``jrnl``, ``/dev/vda``, written by the agent) and the data
  disk (``data``, ``/dev/vdb``).
* :class:`Scenario`: boots a source VM in namespace A and a destination VM in
  namespace B (``-incoming defer -S``, empty disks of the same sizes and
  node names), and migrates between them along one of three paths:

  ``direct``
      QEMU-native, driven the libvirt way (:mod:`dataplane.migration` as a
      library), plain TCP between the two QEMUs across the veth (NBD server
      and ``migrate-incoming`` on B's address).
  ``kubevirt-like``
      the same sequence, but each socket (the migration stream and the NBD
      server) is relayed through its own stunnel mutual-TLS pair, as
      virt-handler does: QEMU talks to a local unix socket, a stunnel client
      in A carries it to a stunnel server in B, which connects to the
      destination QEMU's unix socket.
  ``ours``
      ``dataplane receive`` in B and ``dataplane migrate`` in A (mutual TLS
      with the two CAs); their ``--output json`` lines are collected.

  Each run measures, besides checking the result:

  - **total time**: from the start of the migration (for the library paths
    the destination preparation included, as ``dataplane migrate`` includes
    it; for ours the start of the ``dataplane migrate`` process) to the
    destination's ``RESUME`` event;
  - **downtime as the guest feels it**: from the source's ``STOP`` event to
    the destination's ``RESUME`` event, both from QEMU's own event
    timestamps (one host clock), read on a monitor of their own
    (:class:`EventRecorder`) that no migration role touches;
  - **wire bytes**: the veth counters (tx of both ends, read inside each
    namespace) over the migration.

  Verification (:meth:`Scenario.verify`): the heartbeat continues on the
  destination with the source's boot id and a newer counter, the journal on
  the destination's disk verifies, and, when the destination stayed paused,
  the destination's disks are identical to the source's.

Two additions for the demo (``python -m dataplane.demo``):

* **loopback mode** (``Clusters(loopback=True)``): when namespaces are not
  available (not root), both "clusters" are the current network namespace:
  every process and both QEMUs run here, ``dataplane receive`` listens on
  127.0.0.1, there is no rate limit and no veth, so the wire bytes are the
  channel's own figures (its ``report`` lines) instead of veth counters.
* **compare, then resume** (``Scenario.run(..., compare_then_resume=True)``):
  the migration leaves the destination paused; with the source frozen at
  the switchover (postmigrate) and the destination paused, every disk of the
  destination is compared with the source's, and only then is the
  destination resumed (``cont``) and the heartbeat checked. Total time and
  ``switchover_ms`` end at the destination's migration ``completed`` event,
  so they exclude the time the destination was held for the comparison
  (``held_s``).

Everything started here is stopped by :meth:`Scenario.close` /
:meth:`Clusters.close` (also as context managers): QEMUs (which cannot
outlive this process anyway, see :mod:`dataplane.testing.vm`), relay and
role processes (started with a parent-death signal, in their own process
group) and the namespaces. Needs root and iproute2 (not in loopback mode),
QEMU, the built test guest and, for the kubevirt-like path, stunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from dataplane.testing.commands import ROOT, child_env, cli_has, dataplane_argv, stunnel_binary
from dataplane.testing.journal import JournalReport, verify_journal
from dataplane.testing.netns import Link, listening_tcp_ports
from dataplane.testing.textgen import make_text
from dataplane.testing.vm import (
    Disk,
    GuestRamError,
    QemuVM,
    VMError,
    VMSpec,
    images_identical,
    make_disk,
    run_async,
    verify_continued,
)

__all__ = [
    "PATHS",
    "Clusters",
    "DiskLayout",
    "EventRecorder",
    "GuestRecipe",
    "LocalLink",
    "MigrationRun",
    "RoleProcess",
    "Scenario",
    "ScenarioError",
    "StunnelRelay",
    "cli_has",
    "dataplane_argv",
    "stunnel_binary",
    "text_bytes",
    "write_disk",
]

MiB = 1 << 20
GiB = 1 << 30
PATHS = ("direct", "kubevirt-like", "ours")
SERVER_NAME = "dataplane-server"
CLIENT_NAME = "dataplane-client"
JOURNAL_NODE = "jrnl"
DATA_NODE = "data"

class ScenarioError(RuntimeError):
    """A step of the scenario failed: a process died or timed out, a migration did not complete,
    or a verification failed. The message has the reason and the relevant log tails."""


# --------------------------------------------------------------------------- helpers


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def _text_pool(seed: int, nbytes: int = 8 * MiB) -> bytes:
    """*nbytes* of prose-like text (:func:`dataplane.testing.textgen.make_text`), made once per seed."""
    return make_text(nbytes, seed)


def text_bytes(nbytes: int, seed: int = 1, *, part: int = 0) -> bytes:
    """*nbytes* of prose-like text: sentences of Zipf-chosen pseudo-words with numbers and punctuation.

    Built from an 8 MiB pool of unique text per *seed*, rotated by an offset
    that depends on *part* (so regions differ from each other; a compressor
    with a window below 8 MiB, like LZ4 or QEMU's, sees only fresh text).
    The page codec (LZ4) compresses it to about 0.35 of its size (in 256 KiB pieces), zlib -6 to
    about 0.22.
    """
    pool = _text_pool(seed)
    start = (part * 1_048_573 + 4096 * part) % len(pool)
    out = bytearray()
    while len(out) < nbytes:
        out += pool[start:start + nbytes - len(out)]
        start = 0
    return bytes(out)


def _random_bytes(nbytes: int, seed: int, part: int) -> bytes:
    return hashlib.shake_256(f"cclm-random-{seed}-{part}".encode()).digest(nbytes)


@dataclass(frozen=True)
class DiskLayout:
    """The data disk: ``size`` bytes, holding ``text`` + ``random`` + ``zero`` bytes of written data.

    The data is cut into ``chunk``-sized regions whose kinds are interleaved
    in proportion (text, random, zero, text, ...), spread evenly over the
    disk with holes (never written: sparse) between them. Zero regions are
    *written* zeros (allocated, as in a preallocated file system), which
    QEMU's mirror copies like data.
    """

    size: int = 1 * GiB
    text: int = 150 * MiB
    random: int = 90 * MiB
    zero: int = 60 * MiB
    chunk: int = 10 * MiB
    seed: int = 1

    def __post_init__(self) -> None:
        if self.chunk <= 0 or self.chunk % 4096:
            raise ValueError("chunk must be a positive multiple of 4096")
        if min(self.text, self.random, self.zero) < 0 or self.data_bytes > self.size:
            raise ValueError("text/random/zero must be >= 0 and fit in size")

    @classmethod
    def random_only(cls, size: int = 1 * GiB, data: int = 300 * MiB, **kwargs: Any) -> DiskLayout:
        """The same amount of data, all random (incompressible)."""
        return cls(size=size, text=0, random=data, zero=0, **kwargs)

    @property
    def data_bytes(self) -> int:
        """Bytes of written data (text + random + zero)."""
        return self.text + self.random + self.zero

    def regions(self) -> list[tuple[int, int, str]]:
        """``(offset, length, kind)`` of every written region, in disk order."""
        counts = {k: -(-n // self.chunk) for k, n in (("text", self.text), ("random", self.random),
                                                       ("zero", self.zero)) if n}
        left = {"text": self.text, "random": self.random, "zero": self.zero}
        total = sum(counts.values())
        if not total:
            return []
        order: list[str] = []
        done = dict.fromkeys(counts, 0)
        for i in range(total):  # the kind furthest behind its share goes next
            kind = min(counts, key=lambda k: (done[k] + 1) / counts[k] - (i + 1) / total)
            order.append(kind)
            done[kind] += 1
        stride = (self.size // total) // 4096 * 4096
        out = []
        for i, kind in enumerate(order):
            length = min(self.chunk, left[kind])
            left[kind] -= length
            out.append((i * stride, length, kind))
        return out


def write_disk(path: str | os.PathLike[str], layout: DiskLayout) -> Path:
    """Create the raw image *path* (sparse, ``layout.size`` bytes) and write *layout*'s data; return it.

    Raises OSError if the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(layout.size)
        for n, (offset, length, kind) in enumerate(layout.regions()):
            if kind == "text":
                data = text_bytes(length, layout.seed, part=n)
            elif kind == "random":
                data = _random_bytes(length, layout.seed, n)
            else:
                data = bytes(length)
            fh.seek(offset)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


# --------------------------------------------------------------------------- the guest


@dataclass(frozen=True)
class GuestRecipe:
    """The migrated guest: memory, workload (``dp.*`` parameters) and disks.

    ``dirty_mib`` MiB of guest memory are rewritten at ``dirty_rate`` MiB/s
    with ``pattern`` (``text``, ``random`` or ``zero``); the journal writes
    ``journal_rate`` records/s to the ``journal_mib`` MiB journal disk
    (``jrnl``, the guest's ``/dev/vda``); ``disk`` is the data disk
    (``data``, ``/dev/vdb``), None for none.

    ``check_rate`` paces the guest's RAM checker (MiB/s; its CPU comes out
    of the vCPU, and under TCG out of the host's cores).
    ``kernel_extra`` is appended to the guest kernel command line (the
    test guest's own base line already carries the ``pti=on`` workaround
    for QEMU 7.2 TCG's dirty logging, see dataplane/testing/guest.py).
    """

    memory_mib: int = 512
    dirty_mib: int = 128
    dirty_rate: int = 20
    pattern: str = "text"
    hb_ms: int = 100
    journal_mib: int = 16
    journal_rate: int = 10
    disk: DiskLayout | None = field(default_factory=DiskLayout)
    kernel_extra: str = ""
    check_rate: int | None = None  # MiB/s of the guest's RAM checker (None: the agent's default, 128)

    def cmdline(self) -> dict[str, object]:
        """The guest agent's ``dp.*`` parameters."""
        params: dict[str, object] = {"hb_ms": self.hb_ms, "dirty_mib": self.dirty_mib}
        if self.dirty_mib:
            params.update(dirty_mib=self.dirty_mib, dirty_rate=self.dirty_rate, pattern=self.pattern)
            if self.check_rate is not None:
                params.update(check_rate=self.check_rate)
        if self.journal_rate:
            params.update(disk="/dev/vda", disk_rate=self.journal_rate)
        return params


# --------------------------------------------------------------------------- clusters


LOOPBACK_ADDR = "127.0.0.1"


class LocalLink:
    """The stand-in for a :class:`~dataplane.testing.netns.Link` in loopback mode: no namespaces at all.

    Both sides are the current network namespace and share the address
    127.0.0.1; there is no veth (so no rate limit and no counters). It offers
    the part of :class:`Link`'s interface the scenario uses: ``addr_a`` /
    ``addr_b``, :meth:`netns` (None: QEMU is not moved), :meth:`in_netns`
    (a no-op), :meth:`popen` (with the same parent-death guard as
    :func:`dataplane.testing.netns.popen`), :meth:`counters` (empty) and
    :meth:`close` (kills what :meth:`popen` started).
    """

    def __init__(self) -> None:
        self.addr_a = LOOPBACK_ADDR
        self.addr_b = LOOPBACK_ADDR
        self.rate: int | None = None
        self._procs: list[subprocess.Popen[Any]] = []

    @staticmethod
    def _check_side(side: str) -> None:
        if side not in ("a", "b"):
            raise ValueError(f"unknown side {side!r}: use 'a' or 'b'")

    def start(self) -> LocalLink:
        """Nothing to create; return self."""
        return self

    def netns(self, side: str) -> None:
        """No namespace: processes of either side run in the current one."""
        self._check_side(side)
        return None

    def in_netns(self, side: str) -> contextlib.AbstractContextManager[None]:
        """A no-op context (the calling thread already is where *side* is)."""
        self._check_side(side)
        return contextlib.nullcontext()

    def popen(self, side: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start *argv* here, killed with this process (``setpriv --pdeathsig KILL``) and by :meth:`close`.

        *kwargs* go to :class:`subprocess.Popen`. Raises OSError if the command cannot be started.
        """
        self._check_side(side)
        prefix: list[str] = []
        if shutil.which("setpriv"):  # sh's $PPID is us unless we died before the death signal was armed
            guard = '[ "$PPID" = "$0" ] || exit 125; exec "$@"'
            prefix = ["setpriv", "--pdeathsig", "KILL", "--", "/bin/sh", "-c", guard, str(os.getpid())]
        proc = subprocess.Popen([*prefix, *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def counters(self) -> dict[str, dict[str, int]]:
        """No veth, no counters: always empty."""
        return {}

    def close(self) -> None:
        """Kill (process group, then process) whatever :meth:`popen` started and still runs. Never raises."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._procs.clear()

    def __repr__(self) -> str:
        return f"<LocalLink {LOOPBACK_ADDR}, unshaped>"


class Clusters:
    """Two "clusters": namespaces A (source) and B (destination) joined by a veth shaped to *rate*,
    and certificates from two CAs (cluster A's CA signs the client, cluster B's the server).

    With ``loopback`` both clusters are the current network namespace
    (:class:`LocalLink`: address 127.0.0.1, no veth, no rate limit; *rate*,
    ``subnet`` and ``latency_ms`` are ignored); this needs no root.

    ``workdir`` defaults to a new temporary directory, removed by :meth:`close`
    (a given one is kept). Use as a context manager or :meth:`start` /
    :meth:`close`.
    """

    def __init__(self, rate: int | float | str | None = "1gbit", *,
                 workdir: str | os.PathLike[str] | None = None, subnet: str = "10.200.0.0/30",
                 latency_ms: int = 50, loopback: bool = False) -> None:
        self.loopback = loopback
        self.link: Link | LocalLink = LocalLink() if loopback else Link(rate, subnet=subnet,
                                                                          latency_ms=latency_ms)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dp-cclm-"))
        self.certs_dir = self.workdir / "pki"
        self.certs: Any = None  # dataplane.certs.CertSet once started

    @property
    def addr_b(self) -> str:
        return self.link.addr_b

    def start(self) -> Clusters:
        """Create the link and the certificates; return self.

        Raises NetnsError (link), ScenarioError (``dataplane certs init`` failed).
        """
        try:
            self.link.start()
            self.workdir.mkdir(parents=True, exist_ok=True)
            if not (self.certs_dir / "manifest.json").exists():
                argv = [*dataplane_argv(), "certs", "init", str(self.certs_dir), "--two-cas",
                        "--server-name", SERVER_NAME, "--server-name", self.addr_b,
                        "--client-name", CLIENT_NAME]
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT,
                                      env=child_env(), check=False)
                if proc.returncode != 0:
                    raise ScenarioError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                                        f"{proc.stderr.strip()}")
            from dataplane.certs import load_cert_set

            self.certs = load_cert_set(self.certs_dir)
        except BaseException:
            self.close()
            raise
        return self

    def counters(self) -> dict[str, dict[str, int]]:
        """The veth counters (see :meth:`Link.counters`; empty in loopback mode). Raises NetnsError."""
        return self.link.counters()

    def close(self) -> None:
        """Delete the namespaces (killing what runs there) and an own work directory. Raises NetnsError."""
        try:
            self.link.close()
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Clusters:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --------------------------------------------------------------------------- events


class EventRecorder:
    """Records every QMP event of one QEMU, from a monitor socket of its own, in a background thread.

    Events carry QEMU's timestamps (host wall clock), so events of two QEMUs
    on one host can be subtracted. :meth:`start` raises ScenarioError if the
    monitor cannot be reached.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "qemu") -> None:
        self.path = Path(path)
        self.name = name
        self.events: list[Any] = []  # qmp_driver.Event, in arrival order
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def start(self, timeout: float = 15.0) -> EventRecorder:
        self._thread = threading.Thread(target=self._run, name=f"events-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ScenarioError(f"{self.name}: event monitor {self.path} not connected within {timeout} s")
        if self._error is not None:
            raise ScenarioError(f"{self.name}: event monitor {self.path}: {self._error}") from self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported through start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        from qmp_driver import QemuDriver

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        drv = await QemuDriver.connect_socket(str(self.path))
        try:
            drv.on_event(self.events.append)
            self._ready.set()
            await self._stop.wait()
        finally:
            await drv.close()

    def first(self, name: str, *, after: float = 0.0,
              where: Callable[[Any], bool] | None = None) -> Any | None:
        """The first recorded event called *name* with a timestamp >= *after* (wall clock s), or None.

        ``where``, if given, must also accept the event
        (e.g. ``lambda ev: ev.data.get("status") == "completed"``).
        """
        return next((ev for ev in list(self.events) if ev.name == name and ev.timestamp >= after
                     and (where is None or where(ev))), None)

    def wait_for(self, name: str, timeout: float, *, after: float = 0.0,
                 alive: Callable[[], bool] | None = None) -> Any:
        """Wait for :meth:`first` (*name*, *after*) to exist and return it.

        Raises ScenarioError after *timeout* seconds or as soon as *alive()* is false.
        """
        deadline = time.monotonic() + timeout
        while True:
            ev = self.first(name, after=after)
            if ev is not None:
                return ev
            if alive is not None and not alive():
                raise ScenarioError(f"{self.name}: gone while waiting for event {name}")
            if time.monotonic() > deadline:
                names = [e.name for e in self.events][-10:]
                raise ScenarioError(f"{self.name}: no {name} event within {timeout} s (last events: {names})")
            time.sleep(0.02)

    def stop(self) -> None:
        """Disconnect (idempotent; never raises)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


# --------------------------------------------------------------------------- processes


class RoleProcess:
    """A process started in one namespace: stderr to a log file, stdout read line by line.

    Lines of stdout that are JSON objects are collected in :attr:`json_lines`;
    ``on_json``, if given, is called with each of
    them as it arrives (from the reader thread; its exceptions are ignored).
    The process runs in its own process group with a parent-death signal
    (:meth:`Link.popen`); :meth:`stop` ends it.
    """

    def __init__(self, link: Link | LocalLink, side: str, name: str, argv: Sequence[str], log: Path,
                 on_json: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.name = name
        self.on_json = on_json
        self.argv = list(argv)
        self.log = log
        self.json_lines: list[dict[str, Any]] = []
        with open(log, "wb") as err:
            self.popen: subprocess.Popen[bytes] = link.popen(
                side, self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True, cwd=ROOT, env=child_env())
        self._reader = threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True,
                                        name=f"stdout-{name}")
        self._reader.start()

    def _read(self, out: IO[bytes] | None) -> None:
        if out is None:
            return
        for raw in out:
            line = raw.decode(errors="replace").rstrip("\n")
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    self.json_lines.append(obj)
                    if self.on_json is not None:
                        with contextlib.suppress(Exception):
                            self.on_json(obj)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr_tail(self, lines: int = 25) -> str:
        return _tail(self.log, lines)

    def describe(self) -> str:
        """The command line, the exit status and the tail of stderr (for error messages)."""
        rc = self.popen.poll()
        state = "running" if rc is None else f"exit status {rc}"
        return f"{self.name} ({state}): {' '.join(self.argv)}\n--- stderr tail:\n{self.stderr_tail()}"

    def wait_stderr(self, pattern: str, timeout: float) -> str:
        """Wait for a stderr line matching *pattern*; return it. Raises ScenarioError (died / timeout)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                for line in self.log.read_text(errors="replace").splitlines():
                    if rx.search(line):
                        return line
            if self.popen.poll() is not None:
                raise ScenarioError(f"{self.name} exited before printing /{pattern}/\n{self.describe()}")
            if time.monotonic() > deadline:
                raise ScenarioError(f"{self.name}: no /{pattern}/ on stderr within {timeout} s\n"
                                    f"{self.describe()}")
            time.sleep(0.02)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; return its status.

        Raises ScenarioError on timeout (the process keeps running).
        """
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ScenarioError(f"{self.name} still running after {timeout} s\n{self.describe()}") from exc
        self._reader.join(5)
        return rc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send *sig* to the process group, SIGKILL it after *timeout*; return the status. Never raises."""
        for s in (sig, signal.SIGKILL):
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, s)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout if s == sig else 5)
                break
        self._reader.join(5)
        if self.popen.stdout is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()
        return self.popen.poll()


class StunnelRelay:
    """One stunnel mutual-TLS pair carrying one socket from side A to side B, as virt-handler does.

    The client end in A accepts on the unix socket *entry* and dials
    ``server_addr:port`` across the link; the server end in B accepts there
    and connects to the unix socket *target*. TLS 1.3 only, both sides
    present certificates of the :class:`Clusters` set, verify the chain
    against the other cluster's CA and pin the peer's name.
    """

    def __init__(self, clusters: Clusters, name: str, entry: Path, target: Path, port: int,
                 logdir: Path) -> None:
        binary = stunnel_binary()
        if binary is None:
            raise ScenarioError("stunnel is not installed (apt-get install stunnel4)")
        self.clusters = clusters
        self.name = name
        self.entry = entry
        self.target = target
        self.port = port
        self.logdir = logdir
        self.binary = binary
        self.ends: dict[str, RoleProcess] = {}

    def _conf(self, role: str, accept: str, connect: str) -> Path:
        certs = self.clusters.certs
        me = certs.client if role == "client" else certs.server
        peer = certs.server if role == "client" else certs.client
        lines = [
            "foreground = yes", "pid =", "debug = 6", "syslog = no",
            f"[{self.name}]",
            f"client = {'yes' if role == 'client' else 'no'}",
            f"accept = {accept}", f"connect = {connect}",
            f"cert = {me.cert}", f"key = {me.key}", f"CAfile = {me.trust}",
            "verifyChain = yes", "requireCert = yes", f"checkHost = {peer.names[0]}",
            "sslVersionMin = TLSv1.3", "sslVersionMax = TLSv1.3",
        ]
        path = self.logdir / f"stunnel-{self.name}-{role}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 20.0) -> StunnelRelay:
        """Start the server end (B), then the client end (A); wait until both listen.

        Raises ScenarioError if an end exits or does not listen within *timeout* s.
        """
        link = self.clusters.link
        addr = f"{self.clusters.addr_b}:{self.port}"
        self.entry.unlink(missing_ok=True)
        server = self._conf("server", addr, str(self.target))
        client = self._conf("client", str(self.entry), addr)
        for role, side, conf in (("server", "b", server), ("client", "a", client)):
            name = f"stunnel-{self.name}-{role}"
            self.ends[role] = RoleProcess(link, side, name, [self.binary, str(conf)],
                                          self.logdir / f"{name}.log")
        deadline = time.monotonic() + timeout
        while not (self.port in listening_tcp_ports(self.ends["server"].pid) and self.entry.exists()):
            for end in self.ends.values():
                if end.popen.poll() is not None:
                    raise ScenarioError(f"stunnel end exited\n{end.describe()}")
            if time.monotonic() > deadline:
                raise ScenarioError(f"stunnel pair {self.name} not listening after {timeout} s")
            time.sleep(0.02)
        return self

    def cipher(self) -> str | None:
        """The negotiated TLS version and cipher suite, from the client's log (None if not found)."""
        end = self.ends.get("client")
        if end is None:
            return None
        m = re.search(r"(TLSv1\.\d) ciphersuite: (\S+)", end.stderr_tail(400))
        return f"{m.group(1)} {m.group(2)}" if m else None

    def stop(self) -> None:
        """Stop both ends (never raises)."""
        for end in self.ends.values():
            end.stop()
        self.entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- one migration


@dataclass
class MigrationRun:
    """The outcome and the measurements of one migration.

    ``total_time`` (s): from the start of the migration to the destination's
    ``RESUME`` (for a paused destination: to the end of the roles);
    ``downtime_ms``: source ``STOP`` to destination ``RESUME`` (QEMU event
    timestamps; None for a paused destination); ``wire_bytes``: tx bytes of
    both veth ends during the migration; ``report``: the final report (ours:
    its ``report`` JSON line; the library paths: the MigrationReport as a
    dict); ``info``: anything else
    worth printing (stunnel cipher, options).

    ``started_at``: wall-clock start of the migration; ``switchover_ms``:
    source ``STOP`` to the destination's migration ``completed`` event (None
    if either is missing); ``held_s``: with ``compare_then_resume``, how long
    the destination stayed paused after ``completed`` for the disk comparison
    before ``cont``; ``wire_source``: where ``wire_bytes`` comes from (the
    veth counters, or in loopback mode the channel's report); ``heartbeat``:
    the source's last and the destination's first and last heartbeat
    counters and the boot id, once verified; ``ram_check_ms``: how long the
    guest's RAM checker took for its last full pass on the destination;
    ``guest_fault``: set when the migrated guest is damaged (a bad RAM page,
    a kernel fault, or the destination QEMU gone after the switchover).
    """

    path: str
    ok: bool
    total_time: float = 0.0
    downtime_ms: float | None = None
    qemu_downtime_ms: float | None = None
    wire_bytes: int = 0
    wire: dict[str, dict[str, int]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    verified: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    switchover_ms: float | None = None
    held_s: float | None = None
    wire_source: str = "veth"
    heartbeat: dict[str, Any] = field(default_factory=dict)
    ram_check_ms: int | None = None
    guest_fault: str | None = None

    def summary(self) -> str:
        """One line with the figures."""
        down = "n/a" if self.downtime_ms is None else f"{self.downtime_ms:.0f} ms"
        qd = "" if self.qemu_downtime_ms is None else f" (QEMU says {self.qemu_downtime_ms:.0f} ms)"
        state = "ok" if self.ok else f"FAILED: {self.error}"
        return (f"{self.path}: total {self.total_time:.2f} s, downtime {down}{qd}, "
                f"wire {self.wire_bytes / MiB:.1f} MiB - {state}")


class Scenario:
    """Boots a source VM (namespace A) and a destination VM (namespace B) and migrates between them.

    *recipe* says what the guest is; ``workdir`` holds the master disk image
    (written once) and one directory per run. One scenario runs any number of
    migrations, one at a time, each with a fresh pair of VMs (:meth:`run`).
    ``log``, if given, is called with a one-line description of each step as
    it happens (for a human watching). ``watch_s``: after a resumed
    destination verified, keep watching it this long for a bad RAM page or a
    kernel fault (a kernel that trips over a lost page may take seconds).
    """

    def __init__(self, clusters: Clusters, recipe: GuestRecipe, workdir: str | os.PathLike[str] | None = None,
                 *, kernel: str | os.PathLike[str] | None = None,
                 initrd: str | os.PathLike[str] | None = None,
                 log: Callable[[str], None] | None = None, watch_s: float = 0.0) -> None:
        self.clusters = clusters
        self._log = log
        self.recipe = recipe
        self.workdir = Path(workdir) if workdir is not None else clusters.workdir / "scenario"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kernel = kernel
        self.initrd = initrd
        self.watch_s = watch_s
        self._sockdir = Path(tempfile.mkdtemp(prefix="dpcc-", dir="/tmp"))  # short: sun_path is 108 bytes
        self._runs = itertools.count()
        self._vm_pairs = itertools.count()
        self._vms: list[QemuVM] = []
        self._recorders: list[EventRecorder] = []
        self._procs: list[RoleProcess] = []
        self._relays: list[StunnelRelay] = []
        self.master: Path | None = None
        self.src: QemuVM | None = None
        self.dst: QemuVM | None = None
        self.src_events: EventRecorder | None = None
        self.dst_events: EventRecorder | None = None

    def _say(self, msg: str) -> None:
        if self._log is not None:
            with contextlib.suppress(Exception):
                self._log(msg)

    def _where(self, side: str) -> str:
        ns = self.clusters.link.netns(side)
        return f"namespace {ns}" if ns else "this namespace (loopback)"

    # -- disks and VMs

    def master_image(self) -> Path | None:
        """The data disk image with the recipe's data, written on first use (None without a data disk)."""
        layout = self.recipe.disk
        if layout is None:
            return None
        if self.master is None:
            name = f"master-{layout.size}-{layout.text}-{layout.random}-{layout.zero}-{layout.seed}.raw"
            self._say(f"writing the data disk image: {layout.size / MiB:.0f} MiB holding "
                      f"{layout.text / MiB:.0f} MiB text-like, {layout.random / MiB:.0f} MiB random and "
                      f"{layout.zero / MiB:.0f} MiB zero data, with holes between")
            self.master = write_disk(self.workdir / name, layout)
        return self.master

    def _spec(self, disks: list[Disk], ev_sock: Path, side: str, **fields: Any) -> VMSpec:
        ev = str(ev_sock).replace(",", ",,")
        return VMSpec(
            memory_mib=self.recipe.memory_mib, disks=disks, netns=self.clusters.link.netns(side),
            extra_args=["-chardev", f"socket,id=evqmp,path={ev},server=on,wait=off",
                        "-mon", "chardev=evqmp,mode=control"],
            kernel=self.kernel, initrd=self.initrd, append_extra=self.recipe.kernel_extra, **fields)

    def start_vms(self, rundir: Path, *, settle_acks: int = 3,
                  timeout: float = 90.0) -> tuple[QemuVM, QemuVM]:
        """Boot the source (running the workload, in A) and the destination (paused, incoming, in B).

        The source's data disk is a sparse copy of :meth:`master_image`; the
        destination's disks are empty raw images of the same sizes and node
        names. Waits until the source guest's workload runs (memory dirtier
        ready, *settle_acks* journal records acknowledged). Raises
        VMStartError, VMError or TimeoutError.
        """
        rundir.mkdir(parents=True, exist_ok=True)
        n = next(self._vm_pairs)
        src_disks = [Disk(make_disk(rundir / "src-jrnl.raw", self.recipe.journal_mib * MiB), "raw",
                          node_name=JOURNAL_NODE)]
        dst_disks = [Disk(make_disk(rundir / "dst-jrnl.raw", self.recipe.journal_mib * MiB), "raw",
                          node_name=JOURNAL_NODE)]
        master = self.master_image()
        if master is not None:
            src_data = rundir / "src-data.raw"
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(master), str(src_data)],
                           check=True)
            src_disks.append(Disk(src_data, "raw", node_name=DATA_NODE))
            dst_disks.append(Disk(make_disk(rundir / "dst-data.raw", master.stat().st_size), "raw",
                                  node_name=DATA_NODE))
        src_ev, dst_ev = self._sockdir / f"ev-src{n}.sock", self._sockdir / f"ev-dst{n}.sock"
        src = QemuVM(self._spec(src_disks, src_ev, "a", cmdline=self.recipe.cmdline(), name="cclm-src"),
                     rundir / "src")
        self._vms.append(src)
        src.start()
        self._say(f"source QEMU {src.qemu_version()} started in {self._where('a')} (pid {src.pid}, "
                  f"{self.recipe.memory_mib} MiB, "
                  f"disks {', '.join(d.node_name or '?' for d in src_disks)})")
        dst = QemuVM(self._spec(dst_disks, dst_ev, "b", incoming="defer", paused=True, name="cclm-dst"),
                     rundir / "dst")
        self._vms.append(dst)
        dst.start()
        self._say(f"destination QEMU {dst.qemu_version()} started in {self._where('b')} (pid {dst.pid}): "
                  "-incoming defer, paused, "
                  "empty disks of the same sizes")
        self.src, self.dst = src, dst
        self.src_events = EventRecorder(src_ev, "source").start()
        self.dst_events = EventRecorder(dst_ev, "destination").start()
        self._recorders += [self.src_events, self.dst_events]
        if self.recipe.dirty_mib:
            src.wait_for_serial(r"DIRTY_READY", timeout)
        if self.recipe.journal_rate and settle_acks:
            src.wait_acks(settle_acks, timeout)
        beats = src.wait_heartbeat(2, timeout)
        self._say(f"source guest is up: heartbeat #{beats[-1].counter} (boot id {beats[-1].boot_id}), "
                  + (f"workload dirtying {self.recipe.dirty_mib} MiB at {self.recipe.dirty_rate} MiB/s "
                     f"({self.recipe.pattern}), " if self.recipe.dirty_mib else "")
                  + f"journal acknowledged up to #{src.serial().max_ack}")
        return src, dst

    def stop_vms(self) -> None:
        """Stop the event recorders and both VMs of the current run (never raises)."""
        for rec in self._recorders:
            rec.stop()
        self._recorders.clear()
        for vm in self._vms:
            vm.stop(timeout=5)
        self._vms.clear()

    # -- the three paths

    def run(self, path: str, *, resume: bool = True, extra_args: Sequence[str] = (), timeout: float = 300.0,
            verify: bool = True, rundir: Path | None = None, compare_then_resume: bool = False,
            on_event: Callable[[dict[str, Any]], None] | None = None) -> MigrationRun:
        """Boot a fresh VM pair, migrate along *path* (one of :data:`PATHS`), measure, verify, tear down.

        ``resume=False`` leaves the destination paused (``dataplane receive
        --paused`` / ``finish_target(resume=False)``); then the disks are
        compared instead of the heartbeat. ``compare_then_resume`` does both:
        the destination is left paused by the migration, its disks are
        compared with the frozen source's while both QEMUs still run, then it
        is resumed with ``cont`` and the heartbeat and the journal are checked
        (``resume`` is ignored; see :meth:`verify`). ``extra_args`` go to
        ``dataplane migrate`` (ours only); ``on_event`` is called with each JSON
        line ``dataplane migrate`` prints, as it prints it (ours only; from a
        reader thread). A failed migration or verification is
        reported in the result (``ok`` False, ``error``), never raised; a
        failure to set up the run (VMs, relays) raises ScenarioError,
        VMError or TimeoutError.
        """
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}: one of {PATHS}")
        if compare_then_resume:
            resume = False  # the migration itself leaves the destination paused
        rundir = rundir or self.workdir / f"run{next(self._runs)}-{path}"
        try:
            src, dst = self.start_vms(rundir)
            # Write back what earlier runs (and the copy of the source image) left dirty in the page
            # cache now, not in the kernel's flusher threads during this run's measured window.
            os.sync()
            result = MigrationRun(path, ok=False)
            try:
                if path == "ours":
                    self._run_ours(result, rundir, resume=resume, extra_args=extra_args, timeout=timeout,
                                   on_event=on_event)
                else:
                    self._run_library(result, rundir, kubevirt=path == "kubevirt-like", resume=resume,
                                      timeout=timeout)
            except ScenarioError as exc:
                result.error = str(exc)
            if result.error is None and compare_then_resume:
                done = self._completed_event(result.started_at)
                if done is not None:  # total time up to the switchover, not the comparison hold
                    result.total_time = done.timestamp - result.started_at
            if result.error is None and verify:
                try:
                    if compare_then_resume:
                        self.verify(result, resume=True, compare_first=True)
                    else:
                        self.verify(result, resume=resume)
                except (ScenarioError, AssertionError, TimeoutError, OSError, VMError) as exc:
                    result.error = f"verification failed: {type(exc).__name__}: {exc}"
                    if isinstance(exc, (GuestRamError, VMError)):  # damaged, or gone after the switchover
                        result.guest_fault = str(exc)
            result.ok = result.error is None
            return result
        finally:
            self._stop_procs()
            self.stop_vms()

    def _start_window(self) -> tuple[float, dict[str, dict[str, int]]]:
        return time.time(), self.clusters.counters()

    def _completed_event(self, t0: float) -> Any | None:
        """The destination's migration ``completed`` event after *t0* (None if not recorded)."""
        if self.dst_events is None:
            return None
        return self.dst_events.first("MIGRATION", after=t0 - 1,
                                     where=lambda ev: ev.data.get("status") == "completed")

    def _end_window(self, result: MigrationRun, t0: float, before: dict[str, dict[str, int]],
                    resume: bool, timeout: float) -> None:
        """Fill total time, downtime and wire bytes once the migration is over."""
        assert self.src_events is not None and self.dst_events is not None and self.dst is not None
        result.started_at = t0
        stop = self.src_events.first("STOP", after=t0 - 1)
        done = self._completed_event(t0)
        if stop is not None and done is not None:
            result.switchover_ms = (done.timestamp - stop.timestamp) * 1000
        if resume:
            dst = self.dst
            resumed = self.dst_events.wait_for("RESUME", timeout, after=t0 - 1, alive=dst.is_running)
            result.total_time = resumed.timestamp - t0
            if stop is not None:
                result.downtime_ms = (resumed.timestamp - stop.timestamp) * 1000
        else:
            result.total_time = time.time() - t0
        after = self.clusters.counters()
        result.wire = {s: {k: after[s][k] - before[s][k] for k in after[s]} for s in after}
        result.wire_bytes = sum(w["tx_bytes"] for w in result.wire.values())
        if self.clusters.loopback:  # no veth: the channel's own count (its streams, both ways, before TLS)
            result.wire_source = "the channel's report (loopback mode: no veth to count)"
            result.wire_bytes = int(result.report.get("wire_bytes") or 0)

    def _run_library(self, result: MigrationRun, rundir: Path, *, kubevirt: bool, resume: bool,
                     timeout: float) -> None:
        from dataplane.migration import (
            MigrationError,
            MigrationOptions,
            abort_target,
            discover_plan,
            finish_target,
            migrate_source,
            prepare_target,
        )
        from qmp_driver import DriverError, QemuDriver

        src_vm, dst_vm = self.src, self.dst
        assert src_vm is not None and dst_vm is not None
        addr_b = self.clusters.addr_b
        nbd_port, mig_port = self._free_ports("b", addr_b, 2)
        nbd_dst: str | dict[str, Any]
        nbd_src: str | dict[str, Any]
        if kubevirt:
            sock = self._sockdir
            n = len(self._relays)
            dst_nbd, dst_mig = sock / f"b-nbd{n}.sock", sock / f"b-mig{n}.sock"
            src_nbd, src_mig = sock / f"a-nbd{n}.sock", sock / f"a-mig{n}.sock"
            nbd_dst, mig_dst = str(dst_nbd), f"unix:{dst_mig}"
            nbd_src, mig_src = str(src_nbd), f"unix:{src_mig}"
            relays = [StunnelRelay(self.clusters, "nbd", src_nbd, dst_nbd, nbd_port, rundir),
                      StunnelRelay(self.clusters, "migration", src_mig, dst_mig, mig_port, rundir)]
            self._relays += relays
            for relay in relays:
                relay.start()
            result.info["relay"] = "stunnel pair per socket (NBD, migration), TLS 1.3, mutual auth"
        else:
            nbd_dst = nbd_src = {"type": "inet", "host": addr_b, "port": str(nbd_port)}
            mig_dst = mig_src = f"tcp:{addr_b}:{mig_port}"
            result.info["relay"] = "none: plain TCP between the QEMUs across the veth"

        async def migrate() -> tuple[dict[str, Any], float, dict[str, dict[str, int]]]:
            async with await QemuDriver.connect_socket(str(src_vm.qmp_path)) as s, \
                    await QemuDriver.connect_socket(str(dst_vm.qmp_path)) as d:
                t0, before = self._start_window()
                # libvirt's sequence: its NBD target node has no detect-zeroes
                plan = await discover_plan(s, options=MigrationOptions(mirror_detect_zeroes=False))
                await prepare_target(d, plan, nbd_dst, mig_dst)
                try:
                    report = await migrate_source(s, plan, lambda disk: nbd_src, mig_src)
                except BaseException:
                    await abort_target(d)
                    raise
                await finish_target(d, resume=resume, timeout=timeout)
                return dataclasses.asdict(report), t0, before

        try:
            report, t0, before = run_async(migrate, None)
        except (MigrationError, DriverError) as exc:
            rep = getattr(exc, "report", None)
            result.report = dataclasses.asdict(rep) if rep is not None else {}
            tails = "".join(f"\n{e.describe()}" for r in self._relays for e in r.ends.values())
            raise ScenarioError(f"{type(exc).__name__}: {exc}{tails}") from exc
        result.report = report
        result.qemu_downtime_ms = report.get("downtime_ms")
        if kubevirt:
            result.info["tls"] = self._relays[-1].cipher()
        self._end_window(result, t0, before, resume, timeout)

    def _run_ours(self, result: MigrationRun, rundir: Path, *, resume: bool, extra_args: Sequence[str],
                  timeout: float, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        assert self.src is not None and self.dst is not None
        link, certs = self.clusters.link, str(self.clusters.certs_dir)
        (port,) = self._free_ports("b", self.clusters.addr_b)
        listen = f"{self.clusters.addr_b}:{port}"
        dp = dataplane_argv()
        recv_argv = [*dp, "receive", "--qmp", str(self.dst.qmp_path), "--listen", listen, "--certs", certs,
                     "--output", "json"]
        if not resume:
            recv_argv.append("--paused")
        recv = RoleProcess(link, "b", "dataplane-receive", recv_argv, rundir / "receive.log")
        self._procs.append(recv)
        recv.wait_stderr(r"receive listening on", 60)
        self._say(f"`dataplane receive` listening on {listen} in {self._where('b')} (pid {recv.pid}"
                  + (", --paused)" if not resume else ")"))
        mig_argv = [*dp, "migrate", "--qmp", str(self.src.qmp_path), "--to", listen, "--certs", certs,
                    "--output", "json", *extra_args]
        t0, before = self._start_window()
        mig = RoleProcess(link, "a", "dataplane-migrate", mig_argv, rundir / "migrate.log", on_json=on_event)
        self._procs.append(mig)
        result.info["argv"] = " ".join(mig_argv[len(dp):])
        self._say(f"`dataplane migrate` started in {self._where('a')} (pid {mig.pid}), dialing {listen}")
        rc = mig.wait(timeout)
        reports = [x for x in mig.json_lines if x.get("event") == "report"]
        result.report = reports[-1] if reports else {}
        if rc != 0 or result.report.get("outcome") != "completed":
            recv.stop(signal.SIGINT)
            raise ScenarioError(f"`dataplane migrate` exit status {rc}, report {result.report or 'none'}\n"
                                f"{mig.describe()}\n{recv.describe()}")
        result.qemu_downtime_ms = result.report.get("downtime_ms")
        try:
            rrc = recv.wait(60)
        except ScenarioError:
            recv.stop(signal.SIGINT)
            raise
        if rrc != 0:
            raise ScenarioError(f"`dataplane receive` exit status {rrc}\n{recv.describe()}")
        self._say(f"both roles exited 0: outcome {result.report.get('outcome')}, destination "
                  f"{result.report.get('destination') or ('running' if resume else 'paused')}")
        self._end_window(result, t0, before, resume, timeout)

    def _free_ports(self, side: str, host: str, n: int = 1) -> list[int]:
        """*n* distinct TCP ports free on *host* in *side*'s namespace (bound, then released)."""
        with self.clusters.link.in_netns(side), contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(n)]
            for s in socks:
                s.bind((host, 0))
            return [int(s.getsockname()[1]) for s in socks]

    def _stop_procs(self) -> None:
        for relay in self._relays:
            relay.stop()
        self._relays.clear()
        for proc in self._procs:
            proc.stop(signal.SIGINT)
        self._procs.clear()

    # -- verification

    def verify(self, result: MigrationRun, *, resume: bool = True, timeout: float = 60.0,
               compare_first: bool = False) -> None:
        """Check that the migration really happened; append what was checked to ``result.verified``.

        With ``resume``: the destination prints heartbeats with the source's
        boot id and newer counters, and its RAM checker completes two whole
        passes with no bad page and no kernel fault (when the recipe dirties
        memory); the source is stopped (postmigrate). Then
        both VMs are stopped and the journal on the destination's journal
        disk verifies up to the last acknowledged record. Without
        ``resume``: the destination stayed paused, both VMs are stopped and
        every destination disk is identical to the source's.

        ``compare_first`` (with ``resume``, for a destination the migration
        left paused): first check that the destination is paused, compare
        every disk with the source's while both QEMUs are frozen (``qemu-img
        compare -U``), then resume the destination (``cont``, waiting for its
        ``RESUME`` event; ``result.held_s`` and ``result.downtime_ms``, source
        ``STOP`` to that ``RESUME``, are filled in) and go on as with ``resume``.

        Raises ScenarioError, or AssertionError (JournalError, GuestRamError: a bad RAM page or a kernel
        fault on the destination) on a failed check.
        """
        src, dst = self.src, self.dst
        assert src is not None and dst is not None
        status = src.qmp("query-status")["status"]
        if status != "postmigrate":
            raise ScenarioError(f"the source is {status!r} after the migration, not 'postmigrate'")
        last = src.heartbeats()[-1]
        if compare_first:
            self._check_paused(dst)
            self._say("the destination is paused, the source frozen (postmigrate): comparing every disk")
            self._compare_disks(result, list(src.spec.disks), list(dst.spec.disks))
            assert self.dst_events is not None
            cont_at = time.time()
            done = self._completed_event(result.started_at)
            if done is not None:
                result.held_s = cont_at - done.timestamp
            self._say("resuming the destination (`cont` on its QMP socket)")
            dst.qmp("cont")
            resumed = self.dst_events.wait_for("RESUME", timeout, after=cont_at - 1, alive=dst.is_running)
            stop = self.src_events.first("STOP", after=result.started_at - 1) if self.src_events else None
            if stop is not None:
                result.downtime_ms = (resumed.timestamp - stop.timestamp) * 1000
        if resume:
            try:
                verify_continued(src, dst, ram_passes=3 if self.recipe.dirty_mib else 0, timeout=timeout,
                                 watch_s=self.watch_s)
            except (GuestRamError, VMError):
                raise
            except Exception as exc:
                raise ScenarioError(f"the guest does not run on at the destination: {exc}") from exc
            beats = [hb for hb in dst.heartbeats() if hb.counter > last.counter]
            result.verified.append(f"heartbeat continues on the destination (#{last.counter} -> "
                                   f"#{beats[-1].counter}, boot {last.boot_id})")
            if self.recipe.dirty_mib:
                passes = dst.serial().ram_passes
                result.verified.append(f"every page of the guest's {self.recipe.dirty_mib} MiB checked area "
                                       f"verified on the destination ({len(passes)} checker passes of "
                                       f"{passes[-1].ms} ms, no bad page, no kernel fault)")
                result.ram_check_ms = passes[-1].ms
            result.heartbeat = {"source_last": last.counter, "destination_first": beats[0].counter,
                                "destination_last": beats[-1].counter, "boot_id": last.boot_id}
            if self.recipe.journal_rate:
                dst.wait_acks(src.serial().max_ack + 2, timeout)
        else:
            self._check_paused(dst)
        acked = max(src.serial().max_ack, dst.serial().max_ack)
        src_disks, dst_disks = list(src.spec.disks), list(dst.spec.disks)
        self.stop_vms()
        if self.recipe.journal_rate:
            rep: JournalReport = verify_journal(str(dst_disks[0].path), "raw", acked_upto=acked,
                                                expect_boot_id=last.boot_id)
            result.verified.append(f"journal verifies ({rep.records} records up to #{rep.last_seq}, "
                                   f"acknowledged #{acked})")
        if not resume:
            self._compare_disks(result, src_disks, dst_disks)

    @staticmethod
    def _check_paused(dst: QemuVM) -> None:
        n = len(dst.heartbeats())
        time.sleep(0.5)
        if len(dst.heartbeats()) != n or dst.qmp("query-status")["running"]:
            raise ScenarioError("the destination runs although it should stay paused")

    def _compare_disks(self, result: MigrationRun, src_disks: list[Disk], dst_disks: list[Disk]) -> None:
        """Compare every destination disk with the source's (``qemu-img compare -U``); raise ScenarioError."""
        t = time.monotonic()
        for a, b in zip(src_disks, dst_disks, strict=True):
            if not images_identical(a.path, b.path, a.fmt, b.fmt):
                raise ScenarioError(f"disk {b.node_name}: destination {b.path} differs from "
                                    f"source {a.path}")
        result.verified.append("destination disks identical to the source's")
        sizes = ", ".join(f"{b.node_name} {Path(b.path).stat().st_size / MiB:.0f} MiB" for b in dst_disks)
        result.info["disks_compared"] = sizes
        result.info["compare_s"] = time.monotonic() - t

    # -- lifecycle

    def close(self) -> None:
        """Stop every process and VM of the scenario and remove its socket directory (never raises)."""
        self._stop_procs()
        self.stop_vms()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Scenario:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
