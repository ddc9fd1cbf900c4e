"""Faults at every step around the switchover: never do both copies of the guest run, and every
outcome is told as it is.

Each cell migrates a small guest across the namespaces with `dataplane migrate` / `dataplane receive`,
holds one role at a named point (:mod:`dataplane.migration.hooks`, reached through files in a
directory the harness watches: no timing luck), injects one fault there, lets the roles go on and
then checks, in this order:

1. both QEMUs are asked (again a second later): never both running;
2. each report that was made agrees with what runs: ``completed`` means the destination runs,
   ``rolled-back`` that the destination does not (and, from the source, that the source runs),
   ``in-doubt`` that the reporting side's guest does not run;
3. the cell's expected outcomes (where the protocol fixes them) hold;
4. if neither copy runs, `dataplane resolve` on both sides (or `--peer-destroyed` on the source
   when the destination QEMU is gone) leaves exactly one running;
5. the copy that runs goes on: its heartbeat with the same boot id and clean passes of the guest's
   RAM checker (every stamped page verified, no kernel fault); a destination that runs has the
   source's data disk byte for byte; a source that runs has nothing of the migration left and its
   data disk as before.

Points (see the hooks module): before-continue, after-continue, source-completed (source);
destination-completed, after-resume (destination). Faults: the link cut for longer than the grace
period, every TCP connection reset (`ss -K`), `kill -9` or SIGTERM of either role. Modes:
`--postcopy auto` (the default: QEMU's return path is on), `--postcopy never` and `--multifd 2`
(no return path: the source QEMU completes once the bytes are in the local relay).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cclm_support import Clusters, MiB, Role, make_vms

from dataplane.migration.hooks import HOOK_DIR_ENV, POINTS
from dataplane.testing.vm import QemuVM, disk_sha256, images_identical, verify_continued

pytestmark = [pytest.mark.e2e, pytest.mark.matrix]

GRACE = "3"
SOURCE_POINTS = ("before-continue", "after-continue", "source-completed")
FAULTS = ("link-cut", "tcp-reset", "kill-migrate", "kill-receive", "term-migrate", "term-receive")
MODES = {"postcopy-auto": [], "postcopy-never": ["--postcopy", "never"], "multifd-2": ["--multifd", "2"]}

#: Outcomes the protocol fixes, per (point, fault), whatever the mode: (source, destination); None
#: where timing between the two processes decides (the invariant and the agreement still hold).
EXPECTED: dict[tuple[str, str], tuple[set[str] | None, set[str] | None]] = {
    **{(p, "tcp-reset"): ({"completed"}, {"completed"}) for p in POINTS},
    ("before-continue", "term-migrate"): ({"rolled-back"}, {"rolled-back"}),
    ("before-continue", "term-receive"): ({"rolled-back"}, {"rolled-back"}),
    ("after-continue", "term-migrate"): ({"rolled-back"}, {"rolled-back"}),
    ("source-completed", "term-migrate"): ({"rolled-back"}, {"rolled-back"}),
    ("source-completed", "term-receive"): ({"rolled-back"}, {"rolled-back"}),
    ("source-completed", "link-cut"): ({"in-doubt"}, {"in-doubt"}),
    ("source-completed", "kill-migrate"): (None, {"in-doubt"}),
    ("after-resume", "link-cut"): ({"in-doubt", "completed"}, {"completed"}),
    ("after-resume", "kill-migrate"): (None, {"completed"}),
    ("after-resume", "kill-receive"): ({"in-doubt", "completed"}, None),
    ("after-resume", "term-migrate"): ({"completed"}, {"completed"}),
    ("after-resume", "term-receive"): ({"completed"}, {"completed"}),
}


class Hooks:
    """The hook directories of the two roles; every point but the held one is open."""

    def __init__(self, tmp: Path, point: str) -> None:
        self.point = point
        self.dirs = {"migrate": tmp / "hooks-a", "receive": tmp / "hooks-b"}
        self.held = "migrate" if point in SOURCE_POINTS else "receive"
        for role, d in self.dirs.items():
            d.mkdir()
            for p in POINTS:
                if not (role == self.held and p == point):
                    (d / f"{p}.go").touch()

    def env(self, role: str) -> dict[str, str]:
        return {HOOK_DIR_ENV: str(self.dirs[role])}

    def wait(self, proc: Role, timeout: float = 120.0) -> None:
        flag = self.dirs[self.held] / f"{self.point}.reached"
        deadline = time.monotonic() + timeout
        while not flag.exists():
            assert proc.popen.poll() is None, (
                f"{self.held} ended before {self.point}:\n{proc.stderr()[-3000:]}")
            assert time.monotonic() < deadline, f"{self.point} not reached:\n{proc.stderr()[-3000:]}"
            time.sleep(0.02)

    def release(self) -> None:
        (self.dirs[self.held] / f"{self.point}.go").touch()


def _reset_connections(cl: Clusters, port: int) -> None:
    """Destroy every TCP connection of the channel, on both sides (the peers see errors)."""
    for side, filt in (("a", ["dport", "=", f":{port}"]), ("b", ["sport", "=", f":{port}"])):
        cl.link.run(side, ["ss", "-K", *filt], check=True, capture_output=True)


def _status(vm: QemuVM) -> str:
    """The run state of a QEMU, or ``gone`` when it exited (QEMU 7.2 exits on a failed incoming)."""
    if not vm.is_running():
        return "gone"
    try:
        return str(vm.qmp("query-status")["status"])
    except Exception:  # noqa: BLE001 - a QEMU that stopped answering counts as gone
        return "gone"


def _never_both(src: QemuVM, dst: QemuVM) -> tuple[str, str]:
    states = (_status(src), _status(dst))
    time.sleep(1.0)  # a resume that comes late still counts
    again = (_status(src), _status(dst))
    for s, d in (states, again):
        assert not (s == "running" and d == "running"), f"both copies run: source {s}, destination {d}"
    return again


def _agrees(report: dict[str, Any] | None, role: str, src: str, dst: str) -> None:
    if report is None:
        return
    outcome = report["outcome"]
    assert outcome in ("completed", "rolled-back", "in-doubt"), report
    if outcome == "completed":
        assert dst == "running", f"{role} says completed, the destination is {dst}: {report}"
        assert src != "running", report
    elif outcome == "rolled-back":
        assert dst != "running", f"{role} says rolled back, the destination is {dst}: {report}"
        if role == "migrate":
            assert src == "running", f"the source says rolled back, it is {src}: {report}"
    else:
        mine = src if role == "migrate" else dst
        assert mine != "running", f"{role} says in doubt, its guest is {mine}: {report}"
        assert "dataplane resolve" in report["error"], report


def _resolve(cl: Clusters, src: QemuVM, dst: QemuVM, dst_state: str) -> None:
    """Run `dataplane resolve` on both sides (or alone on the source when the destination QEMU is
    gone); assert that it succeeds."""
    if dst_state == "gone":
        rc = cl.link.run("a", [*_dp(), "resolve", "--qmp", str(src.qmp_path), "--peer-destroyed",
                               "--role", "source"], capture_output=True, text=True, timeout=120)
        assert rc.returncode == 0, rc.stderr
        return
    listen = Role(cl.link, "b", ["resolve", "--qmp", str(dst.qmp_path), "--listen", f"{cl.link.addr_b}:0",
                                 "--certs", str(cl.pki), "--timeout", "60"], cl.tmp / "resolve-b.log")
    line = listen.wait_stderr(r"resolve listening on \S+:\d+", 30)
    port = line.rsplit(":", 1)[1].strip()
    dial = Role(cl.link, "a", ["resolve", "--qmp", str(src.qmp_path), "--to", f"{cl.link.addr_b}:{port}",
                               "--certs", str(cl.pki), "--timeout", "60"], cl.tmp / "resolve-a.log")
    assert dial.wait(120) == 0, dial.stderr()[-3000:]
    assert listen.wait(60) == 0, listen.stderr()[-3000:]


def _record(point: str, fault: str, mode: str, outcomes: dict[str, str | None], resolved: bool,
            runs: str) -> None:
    """Append the cell's result to $SWITCHOVER_MATRIX_LOG (JSON lines), when set: the matrix table."""
    path = os.environ.get("SWITCHOVER_MATRIX_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"point": point, "fault": fault, "mode": mode, **outcomes,
                                "resolved": resolved, "runs": runs}) + "\n")


def _dp() -> list[str]:
    from dataplane.testing.cclm import dataplane_argv

    return dataplane_argv()


def _goes_on(vm: QemuVM) -> None:
    n = len(vm.heartbeats())
    vm.wait_heartbeat(n + 3, 60)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("point", POINTS)
def test_switchover_fault(point: str, fault: str, mode: str, vm_factory: Any, link_factory: Any,
                          tmp_path: Path) -> None:
    link = link_factory("1gbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, src_sizes=(4 * MiB, 8 * MiB), data_fill=2 * MiB,
                               memory=128, cmdline={"dirty_mib": 4, "dirty_rate": 2})
    data_before = disk_sha256(paths["s1"], "qcow2")
    hooks = Hooks(tmp_path, point)
    rcv, port = cl.receive(dst, "--grace", GRACE, env=hooks.env("receive"))
    mig = cl.migrate(src, port, "--grace", GRACE, *MODES[mode], env=hooks.env("migrate"))
    held = mig if hooks.held == "migrate" else rcv
    hooks.wait(held)

    killed: set[str] = set()
    if fault == "link-cut":
        link.cut()
    elif fault == "tcp-reset":
        _reset_connections(cl, port)
    else:
        action, role = fault.split("-")
        proc = mig if role == "migrate" else rcv
        proc.popen.send_signal(signal.SIGKILL if action == "kill" else signal.SIGTERM)
        if action == "kill":
            killed.add(role)
        else:  # the process has the signal before the held point goes on
            proc.wait_stderr("SIGTERM received", 30)
    hooks.release()
    try:
        codes = {name: (None if name in killed else p.wait(180)) for name, p in (("migrate", mig),
                                                                                ("receive", rcv))}
    finally:
        if link.is_cut:
            link.restore()
    reports = {name: (None if name in killed else p.report())
               for name, p in (("migrate", mig), ("receive", rcv))}
    outcomes = {name: (r["outcome"] if r else None) for name, r in reports.items()}
    for name, code in codes.items():
        if code is not None:
            want = {"completed": 0, "rolled-back": 1, "in-doubt": 3}[outcomes[name]]
            assert code == want, f"{name} exited {code} for {outcomes[name]}"

    s, d = _never_both(src, dst)
    _agrees(reports["migrate"], "migrate", s, d)
    _agrees(reports["receive"], "receive", s, d)
    want_src, want_dst = EXPECTED.get((point, fault), (None, None))
    if want_src is not None and outcomes["migrate"] is not None:
        assert outcomes["migrate"] in want_src, (outcomes, mig.stderr()[-3000:])
    if want_dst is not None and outcomes["receive"] is not None:
        assert outcomes["receive"] in want_dst, (outcomes, rcv.stderr()[-3000:])

    resolved = s != "running" and d != "running"
    if resolved:
        _resolve(cl, src, dst, d)
        s, d = _never_both(src, dst)
        assert "running" in (s, d), f"nothing runs after resolve: source {s}, destination {d}"
    _record(point, fault, mode, outcomes, resolved, "destination" if d == "running" else "source")

    if d == "running":
        # the guest runs on at the destination, whole: same boot, its RAM checker's passes clean
        verify_continued(src, dst, ram_passes=3, timeout=90)
        dst.stop()
        src.kill()
        assert images_identical(paths["s1"], paths["d1"], "qcow2", "qcow2")
    else:
        assert s == "running", f"neither copy runs: source {s}, destination {d}"
        nodes = [n["node-name"] for n in src.qmp("query-named-block-nodes")]
        assert not [n for n in nodes if n.startswith("dpmig")], nodes
        assert src.qmp("query-jobs") == []
        _goes_on(src)
        src.verify_next_ram_pass(60)  # a whole clean RAM pass after the fault
        src.kill()
        assert disk_sha256(paths["s1"], "qcow2") == data_before


def test_resolve_refuses_without_a_peer_or_a_role(tmp_path: Path) -> None:
    """`dataplane resolve` with nothing to talk to changes nothing and says why."""
    import sys

    out = subprocess.run([sys.executable, "-m", "dataplane", "resolve", "--qmp", str(tmp_path / "q.sock"),
                          "--peer-destroyed"], capture_output=True, text=True)
    assert out.returncode == 2 and "--peer-destroyed needs --role" in out.stderr
