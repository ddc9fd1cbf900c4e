"""What the cross-cluster tests share: the two `dataplane` roles in their namespaces, certificates
from two CAs, a pair of small test VMs, and the checks of which copy of the guest runs."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from dataplane.testing.cclm import RoleProcess, ScenarioError, dataplane_argv
from dataplane.testing.netns import Link
from dataplane.testing.vm import Disk, QemuVM, fill_random, make_disk, verify_continued

MiB = 1 << 20


class Role(RoleProcess):
    """One `dataplane` role running in a namespace (:class:`RoleProcess`), waitable on its JSON events."""

    def __init__(self, link: Link, side: str, argv: list[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.changed = threading.Condition()
        prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []  # env execs in place
        super().__init__(link, side, f"dataplane-{argv[0]}", [*prefix, *dataplane_argv(), *argv], log,
                         on_json=self._notify)

    def _notify(self, _event: dict[str, Any]) -> None:
        with self.changed:
            self.changed.notify_all()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_event(self, pred: Any, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for ev in self.json_lines:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"no such event within {timeout} s; events {self.json_lines[-5:]}\n"
                                         f"stderr:\n{self.stderr()[-3000:]}")
                self.changed.wait(min(left, 0.2))

    def wait(self, timeout: float = 180.0) -> int:
        try:
            return super().wait(timeout)
        except ScenarioError:
            self.stop(signal.SIGKILL)
            raise AssertionError(f"still running after {timeout} s; last events {self.json_lines[-3:]}\n"
                                 f"{self.stderr()[-3000:]}") from None

    def report(self) -> dict[str, Any]:
        reports = [e for e in self.json_lines if e.get("event") == "report"]
        assert reports, f"no report; stderr:\n{self.stderr()[-3000:]}"
        return reports[-1]


class Clusters:
    """Certificates from two CAs and the two roles across ``link``."""

    def __init__(self, link: Link, tmp: Path, daemons: dict[str, Path] | None = None) -> None:
        self.link = link
        self.tmp = tmp
        #: side -> the API socket of that side's `dataplane serve`: the roles then run through it
        self.daemons = daemons or {}
        self.pki = tmp / "pki"
        subprocess.run([sys.executable, "-m", "dataplane", "certs", "init", str(self.pki), "--two-cas",
                        "--server-name", link.addr_b], check=True, capture_output=True)
        # the relays' unix sockets live here: keep the paths short (AF_UNIX allows 107 bytes, and
        # pytest's tmp_path grows with the run number, the worker and the test's name)
        short = Path(tempfile.mkdtemp(prefix="dpc-"))
        weakref.finalize(self, shutil.rmtree, short, True)
        self.workdirs = {side: short / f"work-{side}" for side in "ab"}
        for wd in self.workdirs.values():
            wd.mkdir()

    def receive(self, dst: QemuVM, *extra: str, env: dict[str, str] | None = None,
                log: str = "receive.log") -> tuple[Role, int]:
        return self.receive_argv(["--qmp", str(dst.qmp_path)], *extra, env=env, log=log)

    def _through(self, side: str) -> list[str]:
        return ["--daemon", f"unix:{self.daemons[side]}"] if side in self.daemons else []

    def receive_argv(self, qemu: list[str], *extra: str, env: dict[str, str] | None = None,
                     log: str = "receive.log") -> tuple[Role, int]:
        """Start `dataplane receive` in B for the QEMU named by *qemu*; return it and its port."""
        argv = [*self._through("b"), "receive", *qemu, "--listen", f"{self.link.addr_b}:0",
                "--certs", str(self.pki), "--output", "json", "--workdir", str(self.workdirs["b"]), *extra]
        role = Role(self.link, "b", argv, self.tmp / log, env)
        line = role.wait_stderr(r"receive listening on \S+:\d+", 30)
        port = int(line.split("receive listening on", 1)[1].split()[0].rsplit(":", 1)[1])
        return role, port

    def migrate(self, src: QemuVM, port: int, *extra: str, certs: list[str] | None = None,
                env: dict[str, str] | None = None, log: str = "migrate.log") -> Role:
        return self.migrate_argv(["--qmp", str(src.qmp_path)], port, *extra, certs=certs, env=env, log=log)

    def migrate_argv(self, qemu: list[str], port: int, *extra: str, certs: list[str] | None = None,
                     env: dict[str, str] | None = None, log: str = "migrate.log") -> Role:
        """Start `dataplane migrate` in A for the QEMU named by *qemu*, to B's *port*."""
        tls = certs if certs is not None else ["--certs", str(self.pki)]
        argv = [*self._through("a"), "migrate", *qemu, "--to", f"{self.link.addr_b}:{port}", *tls,
                "--output", "json", "--workdir", str(self.workdirs["a"]), *extra]
        return Role(self.link, "a", argv, self.tmp / log, env)

    def assert_workdirs_clean(self) -> None:
        for side, wd in self.workdirs.items():
            assert list(wd.iterdir()) == [], f"left over in cluster {side}'s workdir: {list(wd.iterdir())}"


def make_vms(vm_factory: Any, tmp: Path, *, src_sizes: tuple[int, int] = (16 * MiB, 32 * MiB),
         dst_sizes: tuple[int, int] | None = None, data_fill: int = 8 * MiB, memory: int = 128,
         cmdline: dict[str, object] | None = None, qcow2: bool = True,
         names: tuple[str, str] = ("src", "dst")) -> tuple[QemuVM, QemuVM, dict[str, Path]]:
    fmt = "qcow2" if qcow2 else "raw"
    paths = {
        "s0": make_disk(tmp / "s0.raw", src_sizes[0]), "s1": make_disk(tmp / f"s1.{fmt}", src_sizes[1], fmt),
        "d0": make_disk(tmp / "d0.raw", (dst_sizes or src_sizes)[0]),
        "d1": make_disk(tmp / f"d1.{fmt}", (dst_sizes or src_sizes)[1], fmt),
    }
    if data_fill:
        fill_random(paths["s1"], data_fill, fmt, offset=MiB, seed=11)
    params = {"hb_ms": 100, "disk": "/dev/vda", "disk_rate": 20}
    params.update(cmdline or {})
    src = vm_factory(disks=[Disk(paths["s0"], "raw", node_name="jrnl"),
                            Disk(paths["s1"], fmt, node_name="data")],
                     cmdline=params, memory_mib=memory, name=names[0])
    dst = vm_factory(disks=[Disk(paths["d0"], "raw", node_name="jrnl"),
                            Disk(paths["d1"], fmt, node_name="data")],
                     memory_mib=memory, incoming="defer", paused=True, name=names[1])
    src.wait_acks(3, 60)
    return src, dst, paths


def source_intact(src: QemuVM) -> None:
    """The source runs, with none of the migration's nodes or jobs left, and its guest goes on."""
    assert src.qmp("query-status")["status"] == "running"
    nodes = [n["node-name"] for n in src.qmp("query-named-block-nodes")]
    assert not [n for n in nodes if n.startswith("dpmig")], nodes
    assert src.qmp("query-jobs") == []
    caps = {c["capability"]: c["state"] for c in src.qmp("query-migrate-capabilities")}
    assert not caps["pause-before-switchover"] and not caps["postcopy-ram"] and not caps["multifd"]
    n = len(src.heartbeats())
    src.wait_heartbeat(n + 3, 60)
    src.verify_next_ram_pass(60)  # a whole clean pass after the rollback


def continues_on(dst: QemuVM, src: QemuVM) -> str:
    """The guest runs on at *dst*: heartbeat, same boot id, a clean RAM checker pass, no kernel fault."""
    return verify_continued(src, dst).boot_id
