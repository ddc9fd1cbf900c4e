"""Start and stop real QEMU processes running the test guest.

A :class:`VMSpec` says what to run (memory, disks as ``-blockdev`` nodes with
explicit node names, incoming migration, guest workload parameters); a
:class:`QemuVM` runs it in a directory of its own::

    with QemuVM(VMSpec(disks=[Disk("a.qcow2", "qcow2")], cmdline={"disk_rate": 20}), tmp) as vm:
        vm.wait_heartbeat(3)
        ...  # drive it over QMP at vm.qmp_path

Every QEMU is spawned in its own process group with ``PR_SET_PDEATHSIG`` =
SIGKILL, and is tracked in a module registry (:func:`kill_all`, run at exit),
so no QEMU outlives the Python process that started it, even one that
crashes.

``VMSpec.netns`` runs QEMU inside a network namespace (``setns`` in the child
before ``exec``; the pid, the process group and the death signal stay those
of QEMU itself), so that it can speak TCP across a
:class:`~dataplane.testing.netns.Link`.

The accelerator comes from ``DATAPLANE_ACCEL`` (default ``tcg``; ``kvm`` on
real hosts); ``DATAPLANE_QEMU`` overrides the ``qemu-system-x86_64`` binary.
This is not the project's QMP driver (``qmp_driver``): QMP is only used here
to wait for readiness and to quit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from dataplane.testing import guest as _guest
from dataplane.testing.journal import Heartbeat, RamCheckPass, SerialLog, parse_serial
from dataplane.testing.netns import CLONE_NEWNET, NETNS_DIR

__all__ = [
    "ACCEL_ENV",
    "QEMU_ENV",
    "Disk",
    "GuestRamError",
    "QemuVM",
    "VMError",
    "VMSpec",
    "VMStartError",
    "FLOOR_QEMU_VERSION",
    "binary_version",
    "default_accel",
    "floor_qemu_binary",
    "disk_sha256",
    "fill_random",
    "images_identical",
    "kill_all",
    "live_vms",
    "make_disk",
    "qemu_binary",
    "started_pids",
    "verify_continued",
    "write_bytes",
    "write_pattern",
]

ACCEL_ENV = "DATAPLANE_ACCEL"
QEMU_ENV = "DATAPLANE_QEMU"
_SOCK_MAX = 100  # sun_path is 108 bytes; keep a margin

T = TypeVar("T")


class VMError(RuntimeError):
    """A QEMU process or disk image operation failed; the message carries QEMU's own words."""


class VMStartError(VMError):
    """QEMU exited (or never became ready) during :meth:`QemuVM.start`."""


class GuestRamError(AssertionError):
    """The guest found a page of its RAM that is not what it wrote, or its kernel hit a bug.

    Subclasses AssertionError so that pytest shows it as a test failure.
    """


def default_accel() -> str:
    """Return the accelerator from ``DATAPLANE_ACCEL`` (default ``tcg``)."""
    return os.environ.get(ACCEL_ENV, "").strip() or "tcg"


def qemu_binary() -> str | None:
    """Return the path of the QEMU system emulator (``DATAPLANE_QEMU`` or PATH), or None if absent."""
    override = os.environ.get(QEMU_ENV)
    if override:
        return override if os.access(override, os.X_OK) else shutil.which(override)
    return shutil.which("qemu-system-x86_64")


#: The oldest QEMU the data plane still supports; its binaries are unpacked beside the primary QEMU.
FLOOR_QEMU_VERSION = "7.2"


def floor_qemu_binary() -> str | None:
    """Return the QEMU 7.2 floor's wrapper (``scripts/qemu-floor.sh`` unpacks it into the cache), or None."""
    path = _guest.cache_dir().parent / f"qemu-{FLOOR_QEMU_VERSION}" / "qemu-system-x86_64"
    return str(path) if os.access(path, os.X_OK) else None


def binary_version(binary: str) -> str:
    """Return the ``X.Y.Z`` version a QEMU binary reports (``--version``).

    Raises VMError if it does not run or says no version.
    """
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VMError(f"{binary} --version: {exc}") from exc
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    if m is None:
        raise VMError(f"{binary} --version says no version: {out.strip()[:200]!r}")
    return m.group(1)


# --------------------------------------------------------------------------- spec


@dataclass
class Disk:
    """A disk attached as ``-blockdev`` file node ``<node_name>-file``, format node ``<node_name>``,
    and ``-device virtio-blk-pci,drive=<node_name>,id=<device_id>``.

    ``node_name`` defaults to ``disk<i>`` and ``device_id`` to ``<node_name>-dev``
    (i = position in :attr:`VMSpec.disks`). In the guest the i-th disk is
    ``/dev/vd<a+i>``.
    """

    path: str | os.PathLike[str]
    fmt: str = "raw"
    node_name: str | None = None
    serial: str | None = None
    device_id: str | None = None
    cache_direct: bool = False
    read_only: bool = False


@dataclass
class VMSpec:
    """What to run. Source and destination of a migration use the same spec except
    ``incoming`` (and their disk paths / ``memory_backend_path``)."""

    memory_mib: int = 256
    disks: list[Disk] = field(default_factory=list)
    incoming: str | None = None  # e.g. "defer" -> -incoming defer
    paused: bool = False  # -S
    cmdline: dict[str, object] = field(default_factory=dict)  # guest dp.* parameters
    accel: str = field(default_factory=default_accel)
    memory_backend_path: str | os.PathLike[str] | None = None  # guest RAM in this (shared) file
    extra_args: list[str] = field(default_factory=list)
    smp: int = 1
    machine: str = "pc"
    cpu: str | None = None  # default: "max" under tcg, "host" under kvm
    kernel: str | os.PathLike[str] | None = None  # default: the built test guest
    initrd: str | os.PathLike[str] | None = None
    append_extra: str = ""  # raw extra kernel parameters
    no_reboot: bool = True  # a guest reboot or panic ends QEMU instead of silently rebooting
    name: str = "dp-guest"
    netns: str | None = None  # run QEMU inside this network namespace (a name under /run/netns)

    def node_names(self) -> list[str]:
        """Return the format node name of each disk, in order."""
        return [d.node_name or f"disk{i}" for i, d in enumerate(self.disks)]

    def qemu_args(self, *, qmp: Path, ctl_qmp: Path, serial: Path, pidfile: Path) -> list[str]:
        """Return QEMU's arguments (without the binary) for this spec.

        Without an explicit kernel/initrd the test guest is used (built first if
        needed). Raises VMError if that build fails.
        """
        kernel, initrd = self.kernel, self.initrd
        if kernel is None or initrd is None:
            try:
                art = _guest.build()  # cached: only reads the stamp when fresh
            except _guest.GuestBuildError as exc:
                raise VMError(str(exc)) from exc
            kernel = kernel if kernel is not None else art.kernel
            initrd = initrd if initrd is not None else art.initrd
        accel = self.accel
        cpu = self.cpu or ("host" if accel == "kvm" else "max")
        machine = f"{self.machine}"
        args: list[str] = ["-name", f"{_esc(self.name)},debug-threads=on", "-msg", "timestamp=on"]
        if self.memory_backend_path is not None:
            machine += ",memory-backend=ram0"
            args += [
                "-object",
                f"memory-backend-file,id=ram0,size={self.memory_mib}M,"
                f"mem-path={_esc(str(self.memory_backend_path))},share=on",
            ]
        accel_opt = f"{accel},tb-size=256" if accel == "tcg" else accel
        args += ["-machine", machine, "-accel", accel_opt, "-cpu", cpu, "-smp", str(self.smp)]
        args += ["-m", f"{self.memory_mib}M", "-nodefaults", "-no-user-config", "-display", "none"]
        if self.no_reboot:
            args.append("-no-reboot")
        args += ["-kernel", str(kernel), "-initrd", str(initrd)]
        args += ["-append", _guest.kernel_cmdline(self.cmdline, self.append_extra)]
        args += ["-chardev", f"file,id=serial0,path={_esc(str(serial))}", "-serial", "chardev:serial0"]
        args += ["-qmp", f"unix:{_esc(str(qmp))},server=on,wait=off"]
        args += ["-chardev", f"socket,id=ctlqmp,path={_esc(str(ctl_qmp))},server=on,wait=off"]
        args += ["-mon", "chardev=ctlqmp,mode=control"]
        args += ["-pidfile", str(pidfile)]
        for disk, node in zip(self.disks, self.node_names(), strict=True):
            file_node: dict[str, Any] = {
                "driver": "file",
                "filename": str(disk.path),
                "node-name": f"{node}-file",
                "cache": {"direct": disk.cache_direct, "no-flush": False},
            }
            fmt_node: dict[str, Any] = {"driver": disk.fmt, "file": f"{node}-file", "node-name": node}
            if disk.read_only:
                file_node["read-only"] = True
                fmt_node["read-only"] = True
            dev: dict[str, Any] = {
                "driver": "virtio-blk-pci",
                "drive": node,
                "id": disk.device_id or f"{node}-dev",
            }
            if disk.serial:
                dev["serial"] = disk.serial
            args += ["-blockdev", json.dumps(file_node), "-blockdev", json.dumps(fmt_node)]
            args += ["-device", json.dumps(dev)]
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        if self.paused:
            args.append("-S")
        return [*args, *self.extra_args]


def _esc(value: str) -> str:
    """Escape a value for QEMU's key=value option syntax (commas are doubled)."""
    return value.replace(",", ",,")


# --------------------------------------------------------------------------- spawning

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)

_REGISTRY: dict[int, QemuVM] = {}
_STARTED: list[int] = []
_REG_LOCK = threading.Lock()


def _make_preexec(parent: int, netns_fd: int | None = None) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent already died: do not start at all
            os._exit(127)
        if netns_fd is not None:  # stderr is QEMU's log file here: the reason lands in qemu.stderr
            if _libc is None or _libc.setns(netns_fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno() if _libc is not None else 0
                os.write(2, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}\n".encode())
                os._exit(126)

    return preexec


class _Spawner:
    """A thread that lives as long as the process and forks QEMU.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
    children are never forked from short-lived threads (e.g. asyncio.to_thread).
    """

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            fn, reply = self._q.get()
            try:
                reply.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                reply.put((False, exc))

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is threading.main_thread():
            return fn()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qemu-spawner", daemon=True)
                self._thread.start()
        reply: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._q.put((fn, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value


_SPAWNER = _Spawner()


def run_async(factory: Callable[[], Coroutine[Any, Any, T]], timeout: float | None) -> T:
    """Run a coroutine to completion on a private event loop in a helper thread.

    Works whether or not the caller is itself inside a running event loop.
    Raises whatever the coroutine raised, or TimeoutError (after *timeout*
    seconds; None: no limit).
    """
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["value"] = asyncio.run(asyncio.wait_for(factory(), timeout))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    t = threading.Thread(target=runner, name="qemu-qmp", daemon=True)
    t.start()
    t.join(None if timeout is None else timeout + 5)
    if t.is_alive():
        raise TimeoutError(f"QMP operation did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _qmp(path: Path, command: str, args: Mapping[str, object] | None = None) -> Any:
    from qemu.qmp import QMPClient

    client = QMPClient("dataplane-testing")
    await client.connect(str(path))
    try:
        return await client.execute(command, dict(args) if args else None)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def pid_alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def live_vms() -> list[QemuVM]:
    """Return the VMs started by this process that have not been reaped yet."""
    with _REG_LOCK:
        return list(_REGISTRY.values())


def started_pids() -> list[int]:
    """Return the pid of every QEMU this process ever started (for leak checks)."""
    with _REG_LOCK:
        return list(_STARTED)


def kill_all() -> list[int]:
    """SIGKILL every QEMU this process started that is still running; return their pids."""
    killed = []
    for vm in live_vms():
        if vm.pid is not None and vm.is_running():
            killed.append(vm.pid)
        vm.kill()
    return killed


atexit.register(kill_all)


# --------------------------------------------------------------------------- the VM


class QemuVM:
    """One QEMU process running a :class:`VMSpec` in *workdir*.

    Files in *workdir*: ``serial.log`` (guest console), ``qemu.stderr``,
    ``qemu.pid``, ``qemu.argv`` (the command line, one JSON list) and the QMP
    sockets ``qmp.sock`` (free for tests and the QMP driver; one client at a
    time) and ``qmp-ctl.sock`` (this class's own). Sockets move to a short
    directory under /tmp when *workdir* is too deep for a socket path.
    *workdir* defaults to a new temporary directory (left in place for
    inspection); *qemu* overrides the emulator binary.
    """

    def __init__(
        self,
        spec: VMSpec | None = None,
        workdir: str | os.PathLike[str] | None = None,
        *,
        qemu: str | None = None,
    ) -> None:
        self.spec = spec or VMSpec()
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dpvm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qemu = qemu
        self.serial_path = self.workdir / "serial.log"
        self.stderr_path = self.workdir / "qemu.stderr"
        self.pidfile_path = self.workdir / "qemu.pid"
        sockdir = self.workdir
        self._sockdir_tmp: Path | None = None
        if len(str(sockdir / "qmp-ctl.sock")) > _SOCK_MAX:
            self._sockdir_tmp = Path(tempfile.mkdtemp(prefix="dpvm-", dir="/tmp"))
            sockdir = self._sockdir_tmp
        self.qmp_path = sockdir / "qmp.sock"
        self.ctl_qmp_path = sockdir / "qmp-ctl.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self.started_at: float | None = None

    # -- state ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """QEMU's pid once started (None before)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited and been reaped (negative: killed by that signal)."""
        return self.proc.poll() if self.proc is not None else None

    def is_running(self) -> bool:
        """True while the QEMU process exists (started and not exited)."""
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        return f"<QemuVM pid={self.pid} dir={self.workdir}>"

    # -- start / stop ------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> QemuVM:
        """Spawn QEMU and wait until it answers on QMP; return self.

        Raises VMStartError (with the tail of QEMU's stderr) if QEMU is missing,
        exits early or does not become ready within *timeout* seconds (then it
        is killed); VMError if it was already started or the guest is not built.
        """
        if self.proc is not None:
            raise VMError(f"{self!r} was already started")
        binary = self.qemu or qemu_binary()
        if binary is None:
            raise VMStartError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
        for path in (self.qmp_path, self.ctl_qmp_path, self.pidfile_path, self.serial_path):
            path.unlink(missing_ok=True)
        self.argv = [
            binary,
            *self.spec.qemu_args(
                qmp=self.qmp_path,
                ctl_qmp=self.ctl_qmp_path,
                serial=self.serial_path,
                pidfile=self.pidfile_path,
            ),
        ]
        (self.workdir / "qemu.argv").write_text(json.dumps(self.argv) + "\n")
        netns_fd: int | None = None
        if self.spec.netns is not None:
            try:  # O_CLOEXEC: the child uses it before exec, QEMU never sees it
                netns_fd = os.open(NETNS_DIR / self.spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise VMStartError(f"network namespace {self.spec.netns!r} cannot be opened: "
                                   f"{exc.strerror}") from exc

        def spawn() -> subprocess.Popen[bytes]:
            with open(self.stderr_path, "wb") as err:
                return subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=self.workdir,
                    process_group=0,
                    preexec_fn=_make_preexec(os.getpid(), netns_fd),
                    close_fds=True,
                )

        try:
            self.proc = _SPAWNER.run(spawn)
        except OSError as exc:
            raise VMStartError(f"cannot run {binary}: {exc}") from exc
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
        self.started_at = time.monotonic()
        with _REG_LOCK:
            _REGISTRY[self.proc.pid] = self
            _STARTED.append(self.proc.pid)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.ctl_qmp_path.exists() and self.qmp_path.exists()):
            self._raise_if_exited("exited during start-up")
            if time.monotonic() > deadline:
                raise VMStartError(f"QEMU created no QMP socket within {timeout} s{self._stderr_tail()}")
            time.sleep(0.01)
        while True:
            try:
                run_async(
                    lambda: _qmp(self.ctl_qmp_path, "query-status"), max(1.0, deadline - time.monotonic())
                )
                return
            except Exception as exc:  # noqa: BLE001 - QEMU gone or not ready yet: decide below
                self._raise_if_exited("exited during start-up")
                if time.monotonic() > deadline:
                    raise VMStartError(
                        f"QEMU did not answer QMP within {timeout} s ({exc}){self._stderr_tail()}"
                    ) from exc
                time.sleep(0.05)

    def _raise_if_exited(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self._unregister()
            raise VMStartError(f"QEMU {what} (exit status {self.proc.returncode}){self._stderr_tail()}")

    def _stderr_tail(self, limit: int = 4000) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f"; QEMU said:\n{text[-limit:]}" if text else ""

    def _unregister(self) -> None:
        if self.proc is not None:
            with _REG_LOCK:
                _REGISTRY.pop(self.proc.pid, None)
        if self._sockdir_tmp is not None:
            shutil.rmtree(self._sockdir_tmp, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL QEMU (its whole process group) and reap it. Idempotent; never raises."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self._unregister()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Quit QEMU over QMP and wait for it to exit; SIGKILL it if that fails.

        Returns the exit status (None if it was never started). Never raises.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                run_async(lambda: _qmp(self.ctl_qmp_path, "quit"), timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.kill()
        return self.proc.returncode

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for QEMU to exit by itself and return its status.

        Raises VMError if it was never started, TimeoutError if still running after *timeout*.
        """
        if self.proc is None:
            raise VMError(f"{self!r} was never started")
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"QEMU pid {self.pid} still running after {timeout} s") from exc
        self._unregister()
        return rc

    def qemu_version(self) -> str:
        """Return the running QEMU's ``X.Y.Z`` version (QMP ``query-version``). Raises VMError."""
        q = self.qmp("query-version")["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']}"

    def qmp(self, command: str, args: Mapping[str, object] | None = None, timeout: float = 10.0) -> Any:
        """Run one QMP command on the private control socket and return its result.

        For quick checks only (it connects for each call); use ``qmp_path`` with
        the QMP driver for real work. Raises qemu.qmp's ExecuteError/ConnectError
        or TimeoutError.
        """
        return run_async(lambda: _qmp(self.ctl_qmp_path, command, args), timeout)

    def __enter__(self) -> QemuVM:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- serial console ------------------------------------------------------------------

    def serial_text(self) -> str:
        """Return the guest serial console output so far ('' before any)."""
        try:
            return self.serial_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def serial(self) -> SerialLog:
        """Return the agent's lines parsed from the serial log."""
        return parse_serial(self.serial_text())

    def heartbeats(self) -> list[Heartbeat]:
        """Return every heartbeat printed so far."""
        return self.serial().heartbeats

    def _diag(self) -> str:
        tail = self.serial_text()[-1500:]
        state = "running" if self.is_running() else f"exited with status {self.returncode}"
        return f"QEMU pid {self.pid} {state}; serial log tail:\n{tail}{self._stderr_tail(1500)}"

    def _wait(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value is not None:
                return value
            if self.proc is None or self.proc.poll() is not None:
                raise VMError(f"QEMU is not running while waiting for {what}: {self._diag()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout} s: {self._diag()}")
            time.sleep(0.05)

    def wait_for_serial(self, regex: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until *regex* (re.MULTILINE) matches the serial log and return the match.

        Raises TimeoutError or VMError (QEMU exited) with the tail of the log.
        """
        pattern = re.compile(regex, re.MULTILINE) if isinstance(regex, str) else regex
        return self._wait(
            lambda: pattern.search(self.serial_text()), timeout, f"serial match for {pattern.pattern!r}"
        )

    def wait_heartbeat(
        self, count: int = 1, timeout: float = 30.0, *, newer_than: int = 0
    ) -> list[Heartbeat]:
        """Wait until at least *count* heartbeats with counter > *newer_than* were printed; return them.

        Raises TimeoutError or VMError (QEMU exited) with the tail of the log.
        """

        def check() -> list[Heartbeat] | None:
            beats = [hb for hb in self.heartbeats() if hb.counter > newer_than]
            return beats if len(beats) >= count else None

        return self._wait(check, timeout, f"{count} heartbeat(s) after #{newer_than}")

    def check_ram(self) -> SerialLog:
        """Raise GuestRamError if the serial log so far shows a bad RAM page or a kernel fault.

        Returns the parsed log otherwise.
        """
        log = self.serial()
        problems = log.problems()
        if problems:
            raise GuestRamError(f"{self.spec.name} ({self.workdir.name}): the guest's memory is corrupt:\n  "
                                + "\n  ".join(problems) + f"\n{self._diag()}")
        return log

    def verify_ram(self, passes: int = 2, timeout: float = 60.0) -> list[RamCheckPass]:
        """Wait for *passes* full passes of the guest's RAM checker in this QEMU's serial log; return them.

        The agent's checker (``dp.check_rate``, on whenever ``dp.dirty_mib`` is set) walks the whole
        dirtied area and prints ``RAMCHECK`` after each pass. A destination's serial log starts at
        its resume (plus what was still in the guest's tty buffer), so with *passes* >= 3 at least
        one whole pass ran on the destination (see :func:`verify_continued`). Raises
        GuestRamError as soon as a bad page or a kernel fault shows, TimeoutError if the passes do
        not come (no checker in this guest, or it is too slow), VMError if QEMU exits.
        """

        def check() -> list[RamCheckPass] | None:
            log = self.check_ram()
            return log.ram_passes if len(log.ram_passes) >= passes else None

        try:
            return self._wait(check, timeout, f"{passes} full pass(es) of the guest's RAM checker")
        except VMError:
            self.check_ram()  # a guest that panicked and ended QEMU: say why
            raise

    def verify_next_ram_pass(self, timeout: float = 60.0) -> list[RamCheckPass]:
        """:meth:`verify_ram` for one more whole pass than the log shows now (a pass that starts from
        now on, e.g. after a rollback). Raises like :meth:`verify_ram`."""
        return self.verify_ram(len(self.serial().ram_passes) + 1, timeout)

    def wait_acks(self, seq: int, timeout: float = 30.0) -> int:
        """Wait until the guest acknowledged journal record *seq*; return the highest ACK seen.

        Raises TimeoutError or VMError (QEMU exited) with the tail of the log.
        """

        def check() -> int | None:
            top = self.serial().max_ack
            return top if top >= seq else None

        return self._wait(check, timeout, f"ACK {seq}")


def verify_continued(src: QemuVM, dst: QemuVM, *, beats: int = 3, ram_passes: int = 3,
                     timeout: float = 90.0, watch_s: float = 0.0) -> Heartbeat:
    """Check that the guest that ran in *src* now runs in *dst*, whole; return *src*'s last heartbeat.

    The destination prints *beats* heartbeats newer than the source's last one, with the same boot id
    (not a reboot); its RAM checker completes *ram_passes* full passes with no bad page (with 3, at
    least one whole pass ran on the destination, even if the line of a pass that ended on the source
    was still in the guest's tty buffer at the switchover and reached the destination's console);
    and neither console shows a kernel fault, also after
    watching the destination for *watch_s* seconds from that point (a kernel that trips over a lost
    page may take seconds to show it). Raises
    GuestRamError (lost or corrupt RAM, kernel BUG/Oops/panic), AssertionError (a reboot),
    TimeoutError or VMError.
    """
    src.check_ram()
    last = src.heartbeats()[-1]
    got = dst.wait_heartbeat(beats, timeout, newer_than=last.counter)
    boots = {hb.boot_id for hb in got}
    if boots != {last.boot_id}:
        raise AssertionError(f"destination boot ids {sorted(boots)} != source {last.boot_id}: "
                             "the guest rebooted")
    if ram_passes:
        dst.verify_ram(ram_passes, timeout)
    if watch_s > 0:
        end = time.monotonic() + watch_s

        def watched() -> bool | None:
            dst.check_ram()
            return True if time.monotonic() >= end else None

        dst._wait(watched, watch_s + timeout, f"{watch_s} s of watching the destination")
    dst.check_ram()
    return last


# --------------------------------------------------------------------------- disk images


def _qemu_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise VMError(f"{name} is not installed (apt-get install qemu-utils)")
    return exe


def _tool(cmd: list[str], what: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode not in ok:
        raise VMError(f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def make_disk(path: str | os.PathLike[str], size: int | str, fmt: str = "raw") -> Path:
    """Create an empty (sparse) disk image with ``qemu-img create``; return its path.

    *size* is bytes or a qemu-img size string (``"64M"``). Raises VMError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _tool(
        [_qemu_tool("qemu-img"), "create", "-q", "-f", fmt, str(path), str(size)], f"qemu-img create {path}"
    )
    return path


def write_pattern(
    path: str | os.PathLike[str],
    fmt: str = "raw",
    *,
    offset: int = 0,
    length: int = 1 << 20,
    pattern: int = 0xA5,
) -> None:
    """Fill ``[offset, offset+length)`` of the image's guest view with byte *pattern* (via qemu-io).

    Raises VMError (e.g. the image is in use by a running QEMU).
    """
    _tool(
        [
            _qemu_tool("qemu-io"),
            "-f",
            fmt,
            "-c",
            f"write -q -P {pattern & 0xFF} {offset} {length}",
            str(path),
        ],
        f"qemu-io write {path}",
    )


def write_bytes(path: str | os.PathLike[str], data: bytes, fmt: str = "raw", *, offset: int = 0) -> None:
    """Write *data* at *offset* of the image's guest view (via qemu-io). Raises VMError."""
    with tempfile.NamedTemporaryFile(prefix="dp-write-") as src:
        src.write(data)
        src.flush()
        _tool(
            [
                _qemu_tool("qemu-io"),
                "-f",
                fmt,
                "-c",
                f"write -q -s {src.name} {offset} {len(data)}",
                str(path),
            ],
            f"qemu-io write {path}",
        )


def fill_random(
    path: str | os.PathLike[str], length: int, fmt: str = "raw", *, offset: int = 0, seed: int = 0
) -> str:
    """Write *length* deterministic pseudo-random bytes (from *seed*) at *offset*; return their SHA-256.

    Raises VMError.
    """
    data = hashlib.shake_256(seed.to_bytes(8, "little")).digest(length)
    write_bytes(path, data, fmt, offset=offset)
    return hashlib.sha256(data).hexdigest()


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes allocated to the file *path* (``st_blocks * 512``, as ``du`` counts)."""
    return os.stat(path).st_blocks * 512


def disk_sha256(path: str | os.PathLike[str], fmt: str = "raw") -> str:
    """SHA-256 of the image's guest-visible content (qcow2 is converted to raw first).

    Raises VMError if qemu-img fails, OSError if the file is unreadable.
    """
    h = hashlib.sha256()

    def digest(raw: Path) -> str:
        with open(raw, "rb") as fh:
            while chunk := fh.read(4 << 20):
                h.update(chunk)
        return h.hexdigest()

    if fmt == "raw":
        return digest(Path(path))
    with tempfile.TemporaryDirectory(prefix="dp-sha-") as tmp:
        raw = Path(tmp) / "image.raw"
        _tool(
            [_qemu_tool("qemu-img"), "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(raw)],
            f"qemu-img convert {path}",
        )
        return digest(raw)


def images_identical(
    a: str | os.PathLike[str], b: str | os.PathLike[str], fmt_a: str = "raw", fmt_b: str | None = None
) -> bool:
    """True if two images have the same guest-visible content (``qemu-img compare``).

    Unallocated and zero-filled areas compare equal; if one image is larger, its
    extra area must be zero for them to be identical. Raises VMError if
    qemu-img cannot compare them (missing file, ...).
    """
    proc = _tool(
        [_qemu_tool("qemu-img"), "compare", "-U", "-f", fmt_a, "-F", fmt_b or fmt_a, str(a), str(b)],
        f"qemu-img compare {a} {b}",
        ok=(0, 1),
    )
    return proc.returncode == 0
