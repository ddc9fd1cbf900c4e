"""Real "clusters" for tests: two network namespaces joined by a veth pair, shaped and cut for real.

A :class:`Link` creates namespaces ``dp-a-<pid>-<hex>`` and ``dp-b-<pid>-<hex>``
(the pid is the creating process, which is how stale ones are recognised),
joined by the veth pair ``veth-a`` / ``veth-b`` with ``10.200.0.1/30`` and
``10.200.0.2/30`` (any /30 inside 10.0.0.0/8 may be chosen; nothing else is
allowed, so traffic never leaves the machine), loopback up in both::

    with Link(rate="50mbit") as link:
        server = link.popen("b", ["socat", "TCP-LISTEN:7000,reuseaddr", "EXEC:cat"])
        link.run("a", ["socat", "-", f"TCP:{link.addr_b}:7000"], input=b"hello")
        link.set_rate("10mbit"); link.cut(); link.restore()
        link.counters()  # {"a": {"tx_bytes": ..., "rx_bytes": ...}, "b": {...}}

Python code can open sockets inside a namespace with :func:`in_netns` and
use them from anywhere afterwards (a socket stays in the namespace it was
created in).

Rate limits are ``tc qdisc ... root tbf`` on *both* veth ends (each direction
is shaped at its sender). The burst is ``max(rate / 100 Hz, 16 KiB, 4 frames)``
bytes: at least one timer tick's worth of tokens at the lowest kernel HZ
(100), so the bucket can always refill fast enough to reach the rate, and
enough for a few full frames (tbf segments larger GSO packets); at 50 Mbit/s
that is 62.5 kB, 0.5 % of a one-second transfer. ``latency`` (default 50 ms)
bounds tbf's queue (``limit = rate * latency + burst``).

:meth:`Link.cut` black-holes the wire: an nftables ``netdev`` *ingress* chain
with policy drop on each veth end (the kernel lacks tc's drop action), so
every frame, ARP included, is silently lost on arrival. Nothing is reported
to the sockets: an established TCP connection stalls and retransmits, and
fails only by its own timeouts (``TCP_USER_TIMEOUT``, or tcp_retries2 after
~15 minutes) with ETIMEDOUT, never with an RST. :meth:`Link.restore` removes
the chains; a stalled connection resumes at its next retransmission (RTO
back-off: within ~2x the cut's length) with its data intact.
``cut(mode="down")`` sets the links down instead (senders then see local
routing errors, which is a different failure).

Cleanup always happens: :meth:`Link.close` (also on ``__exit__`` and at
interpreter exit through :mod:`atexit`) kills the processes started in the
namespaces and deletes them; :func:`sweep_stale` deletes namespaces left by
processes that died without cleaning up (SIGKILL), and is run by
:meth:`Link.start`. Namespaces of *running* processes are never touched, so
concurrent test runs do not disturb each other.

:class:`FaultProxy` is an asyncio TCP proxy that can sever every connection
at once, pause and resume forwarding, and count bytes.

Requires root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2, and nftables for
:meth:`Link.cut`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from dataplane.units import parse_link_rate

__all__ = [
    "CLONE_NEWNET",
    "DEFAULT_LATENCY_MS",
    "DEFAULT_SUBNET",
    "FaultProxy",
    "Link",
    "NETNS_DIR",
    "NetnsError",
    "close_all",
    "in_netns",
    "listening_tcp_ports",
    "netns_unavailable_reason",
    "popen",
    "run",
    "sweep_stale",
    "tbf_burst",
]

NETNS_DIR = Path("/run/netns")
DEFAULT_SUBNET = "10.200.0.0/30"
DEFAULT_LATENCY_MS = 50
_ALLOWED = ipaddress.IPv4Network("10.0.0.0/8")
_NAME_RE = re.compile(r"^dp-[ab]-(\d+)-[0-9a-f]+$")
CLONE_NEWNET = 0x40000000  # setns(2) flag: the fd is a network namespace
_NFT_TABLE = "dataplane_cut"
_MIN_BURST = 16 * 1024
_LOWEST_HZ = 100


class NetnsError(RuntimeError):
    """A namespace, link, qdisc or firewall operation failed; the message has the command and its stderr."""


# --------------------------------------------------------------------------- commands


def _cmd(argv: Sequence[str], *, input: bytes | None = None, check: bool = True, timeout: float = 20) -> str:
    """Run a short administrative command; return its stdout. Raises NetnsError on failure."""
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]} is not installed ({' '.join(argv)})") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {timeout} s") from exc
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise NetnsError(f"`{' '.join(argv)}` failed: {err}")
    return proc.stdout.decode(errors="replace")


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no iproute2, ``ip netns`` fails), or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    try:
        _cmd(["ip", "netns", "list"], timeout=10)
    except NetnsError as exc:
        return f"`ip netns` is unavailable: {exc}"
    return None


def popen(
    netns: str, argv: Sequence[str], *, die_with_parent: bool = True, **kwargs: Any
) -> subprocess.Popen[Any]:
    """Start *argv* inside network namespace *netns* (``ip netns exec``); return the Popen.

    ``ip netns exec`` replaces itself with the command, so the Popen's pid is
    the command's. With ``die_with_parent`` the command runs under
    ``setpriv --pdeathsig KILL`` and a shell guard that exits (status 125)
    if this process already died before the death signal was armed, so it
    never outlives us; note that the signal fires when the *thread* that
    started it exits (call it from a long-lived thread, or pass False and
    kill it yourself). *kwargs* go to :class:`subprocess.Popen`. Raises
    OSError if the command cannot be started.
    """
    prefix = []
    if die_with_parent:  # ip, setpriv and sh all exec in place: sh's $PPID is us unless we died
        guard = '[ "$PPID" = "$0" ] || exit 125; exec "$@"'
        prefix = ["setpriv", "--pdeathsig", "KILL", "--", "/bin/sh", "-c", guard, str(os.getpid())]
    return subprocess.Popen(["ip", "netns", "exec", netns, *prefix, *argv], **kwargs)


def run(
    netns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30, **kwargs: Any
) -> subprocess.CompletedProcess[Any]:
    """Run *argv* to completion inside *netns*; output is captured unless *kwargs* say otherwise.

    Raises subprocess.CalledProcessError (``check``, with the captured
    stderr) or subprocess.TimeoutExpired.
    """
    kwargs.setdefault("capture_output", True)
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=check, timeout=timeout, **kwargs)


# --------------------------------------------------------------------------- setns for Python code

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Run the body with the *calling thread* inside network namespace *netns*, then switch back.

    setns(2) (through ctypes: ``os.setns`` is Python 3.12+) moves only the
    calling OS thread: other threads, and the event loop if it runs in
    another thread, stay where they are; threads and processes *started* in
    the body inherit the namespace. Sockets created in the body belong
    to *netns* for their whole life and may be used from any thread
    afterwards. Do not ``await`` inside the body: other tasks of the loop
    would run in *netns* meanwhile. Raises NetnsError if the namespace does
    not exist or setns fails.
    """
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"network namespace {netns!r} cannot be opened: {exc.strerror}") from exc
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


# --------------------------------------------------------------------------- rates


def tbf_burst(rate_bps: int, mtu: int = 1500) -> int:
    """The tbf bucket size in bytes for *rate_bps*: ``max(rate/100 Hz, 16 KiB, 4 full frames)``."""
    return max(rate_bps // 8 // _LOWEST_HZ, _MIN_BURST, 4 * (mtu + 14))


# --------------------------------------------------------------------------- stale namespaces


def _boot_time() -> float:
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise NetnsError("/proc/stat has no btime")


def _process_start(pid: int) -> float | None:
    """Wall-clock start time of *pid*, or None if it does not exist (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def sweep_stale() -> list[str]:
    """Delete the ``dp-{a,b}-<pid>-<hex>`` namespaces whose creating process is gone; return their names.

    A namespace is stale when its pid no longer runs, or runs but started
    after the namespace was created (the pid was reused). Namespaces of
    running processes (other test runs) and names of any other form are left
    alone. Raises nothing for a namespace that vanishes meanwhile.
    """
    removed = []
    for name in _list_netns():
        m = _NAME_RE.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            created = (NETNS_DIR / name).stat().st_mtime
        except FileNotFoundError:
            continue
        started = _process_start(pid)
        if started is not None and started <= created + 2:  # +2 s: btime has one-second resolution
            continue
        with contextlib.suppress(NetnsError):
            _cmd(["ip", "netns", "delete", name])
            removed.append(name)
    return removed


# --------------------------------------------------------------------------- the link

_LIVE: set[Link] = set()
_LIVE_LOCK = threading.Lock()


def close_all() -> list[str]:
    """Close every live :class:`Link` of this process and delete any other namespace it created.

    Returns the names of the namespaces that were still there (a leak, if
    the links should have been closed already). Run at interpreter exit.
    Never raises.
    """
    with _LIVE_LOCK:
        links = list(_LIVE)
    leaked = [ns for lk in links for ns in lk.namespaces if (NETNS_DIR / ns).exists()]
    for lk in links:
        with contextlib.suppress(Exception):
            lk.close()
    mine = re.compile(rf"^dp-[ab]-{os.getpid()}-[0-9a-f]+$")
    for name in _list_netns():
        if mine.match(name):
            if name not in leaked:
                leaked.append(name)
            Link._kill_inside(name)
            with contextlib.suppress(NetnsError):
                _cmd(["ip", "netns", "delete", name])
    return leaked


atexit.register(close_all)


class Link:
    """Two network namespaces joined by a veth pair, optionally rate-limited; a pair of "clusters".

    ``rate``: None (unshaped) or a rate for :func:`~dataplane.units.parse_link_rate`, applied to
    both directions. ``subnet``: a /30 (or wider) inside 10.0.0.0/8; side A
    gets its first host address, side B the second. ``latency_ms``: tbf's
    queue bound. ``mtu``: of both veth ends (default: the kernel's, 1500).

    Side arguments (``"a"``/``"b"``) also accept the full namespace name.
    Methods raise NetnsError when a command fails (with its stderr).
    """

    def __init__(
        self,
        rate: int | float | str | None = None,
        *,
        subnet: str = DEFAULT_SUBNET,
        latency_ms: int = DEFAULT_LATENCY_MS,
        mtu: int | None = None,
    ) -> None:
        net = ipaddress.ip_network(subnet, strict=True)
        if not isinstance(net, ipaddress.IPv4Network) or not net.subnet_of(_ALLOWED) or net.num_addresses < 4:
            raise ValueError(f"subnet {subnet!r} must be an IPv4 /30 or wider inside 10.0.0.0/8")
        hosts = list(net.hosts())[:2] if net.num_addresses <= 256 else [net[1], net[2]]
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.ns_a = f"dp-a-{tag}"
        self.ns_b = f"dp-b-{tag}"
        self.dev_a = "veth-a"
        self.dev_b = "veth-b"
        self.addr_a = str(hosts[0])
        self.addr_b = str(hosts[1])
        self.prefixlen = net.prefixlen
        self.latency_ms = int(latency_ms)
        self.mtu = mtu
        self._initial_rate = None if rate is None else parse_link_rate(rate)
        self.rate: int | None = None
        self.cut_mode: str | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._started = False
        self._closed = False

    # -- lifecycle

    def start(self) -> Link:
        """Create the namespaces, the veth pair, addresses, loopbacks and the rate limit; return self.

        Sweeps stale namespaces first. On failure everything created so far
        is deleted and NetnsError is raised.
        """
        if self._started:
            return self
        self._started = True
        sweep_stale()
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            for ns in (self.ns_a, self.ns_b):
                _cmd(["ip", "netns", "add", ns])
            _cmd(["ip", "-n", self.ns_a, "link", "add", self.dev_a, "type", "veth",
                  "peer", "name", self.dev_b, "netns", self.ns_b])  # fmt: skip
            for ns, dev, addr in ((self.ns_a, self.dev_a, self.addr_a), (self.ns_b, self.dev_b, self.addr_b)):
                if self.mtu is not None:
                    _cmd(["ip", "-n", ns, "link", "set", "dev", dev, "mtu", str(self.mtu)])
                _cmd(["ip", "-n", ns, "addr", "add", f"{addr}/{self.prefixlen}", "dev", dev])
                _cmd(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
                _cmd(["ip", "-n", ns, "link", "set", "dev", dev, "up"])
            if self._initial_rate is not None:
                self.set_rate(self._initial_rate)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill the processes started in the namespaces, then delete both namespaces (idempotent).

        Never raises for an already-deleted namespace; other failures are
        collected and raised as one NetnsError after every step was tried.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for ns in (self.ns_a, self.ns_b):
            if not (NETNS_DIR / ns).exists():
                continue
            self._kill_inside(ns)
            try:
                _cmd(["ip", "netns", "delete", ns])
            except NetnsError as exc:
                errors.append(str(exc))
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if errors:
            raise NetnsError("; ".join(errors))

    @staticmethod
    def _kill_inside(ns: str) -> None:
        """SIGKILL what still runs in *ns* (only processes our tests started there); never this process."""
        with contextlib.suppress(NetnsError):
            for pid in _cmd(["ip", "netns", "pids", ns]).split():
                if int(pid) != os.getpid():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), signal.SIGKILL)

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        rate = f"{self.rate} bit/s" if self.rate else "unshaped"
        return f"<Link {self.ns_a} {self.addr_a} <-> {self.ns_b} {self.addr_b}, {rate}>"

    # -- addressing

    def netns(self, side: str) -> str:
        """The namespace name of *side* (``"a"``, ``"b"`` or a full name). Raises ValueError otherwise."""
        if side in ("a", self.ns_a):
            return self.ns_a
        if side in ("b", self.ns_b):
            return self.ns_b
        raise ValueError(f"unknown side {side!r}: use 'a', 'b', {self.ns_a!r} or {self.ns_b!r}")

    @property
    def namespaces(self) -> tuple[str, str]:
        """``(ns_a, ns_b)``."""
        return (self.ns_a, self.ns_b)

    # -- shaping

    def set_rate(self, rate: int | float | str | None) -> None:
        """Rate-limit both directions to *rate* (:func:`~dataplane.units.parse_link_rate`), or unshape (None).

        Changes a running link in place (``tc qdisc replace``). Raises
        ValueError for a bad rate, NetnsError if tc fails.
        """
        if rate is None:
            for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
                _cmd(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            self.rate = None
            return
        bps = parse_link_rate(rate)
        burst = tbf_burst(bps, self.mtu or 1500)
        for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
            _cmd(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                  "rate", f"{bps}bit", "burst", str(burst), "latency", f"{self.latency_ms}ms"])  # fmt: skip
        self.rate = bps

    # -- faults

    def cut(self, mode: str = "drop") -> None:
        """Sever the wire without telling anyone: established TCP connections stall, no RST is sent.

        ``mode="drop"`` (default): nftables ingress chains with policy drop on
        both veth ends (every frame vanishes on arrival). ``mode="down"``:
        both veth ends set down (senders see local routing errors instead).
        Raises NetnsError if nft is missing or a command fails, ValueError for
        an unknown mode or if the link is already cut.
        """
        if self.cut_mode is not None:
            raise ValueError(f"the link is already cut ({self.cut_mode})")
        if mode == "drop":
            if shutil.which("nft") is None:
                raise NetnsError("Link.cut(mode='drop') needs nftables (`nft`): apt-get install nftables")
            for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
                hook = f'type filter hook ingress device "{dev}" priority -500; policy drop;'
                rules = f"table netdev {_NFT_TABLE} {{\n  chain ingress {{ {hook} }}\n}}\n"
                _cmd(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules.encode())
        elif mode == "down":
            for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
                _cmd(["ip", "-n", ns, "link", "set", "dev", dev, "down"])
        else:
            raise ValueError(f"unknown cut mode {mode!r}: use 'drop' or 'down'")
        self.cut_mode = mode

    def restore(self) -> None:
        """Undo :meth:`cut` (no-op if the link is not cut). Raises NetnsError if a command fails."""
        if self.cut_mode == "drop":
            for ns in (self.ns_a, self.ns_b):
                _cmd(["ip", "netns", "exec", ns, "nft", "delete", "table", "netdev", _NFT_TABLE])
        elif self.cut_mode == "down":
            for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
                _cmd(["ip", "-n", ns, "link", "set", "dev", dev, "up"])
        self.cut_mode = None

    @property
    def is_cut(self) -> bool:
        """True between :meth:`cut` and :meth:`restore`."""
        return self.cut_mode is not None

    # -- measuring

    def counters(self) -> dict[str, dict[str, int]]:
        """Byte counters of both veth ends: ``{"a": {"tx_bytes", "rx_bytes"}, "b": {...}}``.

        Read from ``/sys/class/net/<dev>/statistics`` inside each namespace
        (``ip netns exec`` mounts that namespace's sysfs). Raises NetnsError.
        """
        out: dict[str, dict[str, int]] = {}
        for side, ns, dev in (("a", self.ns_a, self.dev_a), ("b", self.ns_b, self.dev_b)):
            stats = f"/sys/class/net/{dev}/statistics"
            text = _cmd(["ip", "netns", "exec", ns, "cat", f"{stats}/tx_bytes", f"{stats}/rx_bytes"])
            tx, rx = (int(v) for v in text.split())
            out[side] = {"tx_bytes": tx, "rx_bytes": rx}
        return out

    # -- processes

    def popen(self, side: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start *argv* in *side*'s namespace (see module :func:`popen`); it is killed by :meth:`close`."""
        proc = popen(self.netns(side), argv, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, side: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run *argv* to completion in *side*'s namespace (see module :func:`run`)."""
        return run(self.netns(side), argv, **kwargs)

    def in_netns(self, side: str) -> contextlib.AbstractContextManager[None]:
        """:func:`in_netns` for *side*: the calling thread runs in that namespace for the body."""
        return in_netns(self.netns(side))


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in *pid*'s network namespace (from /proc/PID/net/tcp{,6}); empty if gone."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{name}") as fh:
            next(fh, None)
            for line in fh:
                cols = line.split()
                if len(cols) > 3 and cols[3] == "0A":
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


# --------------------------------------------------------------------------- fault proxy


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self, reset: bool) -> None:
        for writer in (self.client, self.target):
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """An asyncio TCP proxy (``listen`` -> ``target``) that injects faults into every connection it carries.

    - :meth:`sever_all`: abruptly close every proxied connection, both sides
      (an RST to each peer by default).
    - :meth:`pause` / :meth:`resume`: stop / restart forwarding without
      closing anything (peers see a stall, then TCP back-pressure).
    - :meth:`set_accepting` (False): new connections are reset at once, as
      when a listener is unreachable.
    - counters: ``bytes_up`` (client -> target), ``bytes_down``,
      ``connections_total``, ``active``.

    ``listen_netns`` / ``target_netns``: create the listening socket / the
    outgoing sockets inside those namespaces (through :func:`in_netns`);
    by default the event loop thread's namespace is used. Use as ``async
    with FaultProxy(target) as proxy:`` or :meth:`start` / :meth:`close`.
    """

    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        listen_netns: str | None = None,
        target_netns: str | None = None,
    ) -> None:
        self.target = target
        self.listen = listen
        self.listen_netns = listen_netns
        self.target_netns = target_netns
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections_total = 0
        self._conns: set[_Conn] = set()
        self._running = asyncio.Event()
        self._running.set()
        self._accepting = True
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> FaultProxy:
        """Start listening; return self. Raises OSError if the address cannot be bound."""
        if self.listen_netns is not None:
            with in_netns(self.listen_netns):
                sock = socket.create_server(self.listen, family=_family(self.listen[0]))
            self._server = await asyncio.start_server(self._handle, sock=sock)
        else:
            self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        return self

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` clients should dial. Raises RuntimeError before :meth:`start`."""
        if self._server is None:
            raise RuntimeError("FaultProxy is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        """The listening port."""
        return self.address[1]

    @property
    def active(self) -> int:
        """How many proxied connections are open now."""
        return len(self._conns)

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return not self._running.is_set()

    def stats(self) -> dict[str, int]:
        """The counters as a dict."""
        return {
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connections_total": self.connections_total,
            "active": self.active,
        }

    def sever_all(self, reset: bool = True) -> int:
        """Abruptly close every proxied connection on both sides; return how many were severed.

        With ``reset`` each socket is closed with SO_LINGER 0, so both peers
        get an RST (ECONNRESET); otherwise they see an EOF. Buffered data is
        discarded either way. New connections are still accepted.
        """
        conns = list(self._conns)
        self._conns.clear()
        for conn in conns:
            conn.abort(reset)
        return len(conns)

    def pause(self) -> None:
        """Stop forwarding in both directions; connections stay open and data waits (then back-pressures)."""
        self._running.clear()

    def resume(self) -> None:
        """Forward again everything that waited during :meth:`pause`."""
        self._running.set()

    def set_accepting(self, accepting: bool) -> None:
        """With False, every new connection is reset as soon as it is accepted (until set True again)."""
        self._accepting = accepting

    async def wait_connections(self, n: int, timeout: float = 10.0) -> None:
        """Wait until at least *n* proxied connections are open. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while self.active < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"FaultProxy: {self.active} connections open, waited for {n}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop listening and sever every connection (with RST)."""
        if self._server is not None:
            self._server.close()
        self.sever_all()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.target
        if self.target_netns is None:
            return await asyncio.open_connection(host, port)
        with in_netns(self.target_netns):
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if not self._accepting:
                _Conn(cwriter, cwriter).abort(reset=True)
                return
            try:
                treader, twriter = await self._dial()
            except OSError:
                _Conn(cwriter, cwriter).abort(reset=True)
                return
            conn = _Conn(cwriter, twriter)
            self._conns.add(conn)
            self.connections_total += 1
            conn.tasks = [
                asyncio.create_task(self._pump(conn, creader, twriter, up=True)),
                asyncio.create_task(self._pump(conn, treader, cwriter, up=False)),
            ]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
            if conn in self._conns:  # both directions ended normally
                self._conns.discard(conn)
                for writer in (cwriter, twriter):
                    writer.close()
        finally:
            self._handlers.discard(task)

    async def _pump(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        try:
            while True:
                await self._running.wait()
                data = await reader.read(65536)
                if not data:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()  # pass the half-close on
                    return
                await self._running.wait()  # paused while reading: hold the data
                writer.write(data)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            if conn in self._conns:  # one side broke: break the other too
                self._conns.discard(conn)
                conn.abort(reset=True)


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET
