"""The daemon killed with SIGKILL in the middle of a job, then started again on the same state
directory: it finds its crash journal, cleans up what the job left in the QEMU, leaves the VM
running where it was, and reports what it did as the job's outcome (real QEMUs, TCG).

Each test first checks that the kill did leave something behind (a mirror job and its target node,
a source paused at the switchover), so that the clean-up it then asserts is the daemon's doing.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from cclm_support import Clusters, MiB, Role, make_vms, source_intact
from test_daemon import _guest, _old_disks_intact

from dataplane.daemon.client import DaemonClient
from dataplane.testing.journal import verify_journal
from dataplane.testing.vm import disk_sha256

pytestmark = pytest.mark.e2e


def call(sock: Path, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    async def go() -> Any:
        async with DaemonClient(str(sock)) as client:
            return await client._call(method, url, body)
    return asyncio.run(go())


def until(what: str, pred: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


def ready(sock: Path) -> bool:
    try:
        call(sock, "GET", "/readyz")
    except Exception:
        return False
    return True


def serve(sock: Path, state: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--api", f"unix:{sock}",
                             "--state-dir", str(state)], stderr=log.open("ab"))
    until("the daemon listening", lambda: sock.exists() or proc.poll() is not None, 30)
    assert proc.poll() is None, log.read_text()
    return proc


def test_kill_9_during_the_mirror_of_a_storage_migration(vm_factory, tmp_path):
    vm, jrnl, data = _guest(vm_factory, tmp_path)
    want = disk_sha256(data, "qcow2")
    short = Path(tempfile.mkdtemp(prefix="dpk-"))
    sock, state, log = short / "api.sock", tmp_path / "state", tmp_path / "serve.log"
    try:
        daemon = serve(sock, state, log)
        job = call(sock, "POST", "/v1/storage-migrations", {
            "qmp": str(vm.qmp_path), "bandwidth": 1 << 20,
            "disks": [{"disk": "data", "target": str(tmp_path / "new-data.qcow2"), "format": "qcow2"}]})
        until("the mirror running", lambda: vm.qmp("query-block-jobs"))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        # what the killed daemon left: the copy goes on in QEMU, into its target node
        assert [j["type"] for j in vm.qmp("query-block-jobs")] == ["mirror"]
        assert any(n["node-name"].startswith("dpslm") for n in vm.qmp("query-named-block-nodes"))
        assert list(state.glob("*.journal")), "no journal was left"

        daemon = serve(sock, state, log)
        until("the daemon ready", lambda: ready(sock))
        got = call(sock, "GET", f"/v1/storage-migrations/{job['id']}")
        assert got["state"] == "rolled-back", got
        assert got["report"]["reconciled"] and "rolled back" in got["error"], got
        actions = " | ".join(got["report"]["actions"])
        assert "cancelled" in actions and "deleted" in actions, actions
        assert not list(state.glob("*.journal"))
        assert vm.qmp("query-status")["status"] == "running"
        asyncio.run(_old_disks_intact(vm, jrnl, data))
        n = vm.serial().max_ack
        vm.wait_acks(n + 3, 60)  # the guest goes on writing its old journal disk
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log.read_text()
    finally:
        shutil.rmtree(short, ignore_errors=True)
    vm.stop()
    verify_journal(str(jrnl), "raw", acked_upto=vm.serial().max_ack)
    assert disk_sha256(data, "qcow2") == want


@pytest.mark.parametrize("point", ["mirror", "pre-switchover"])
def test_kill_9_of_the_source_daemon(point, vm_factory, link_factory, tmp_path):
    """The source daemon killed while its disks are mirrored (NBD nodes and mirror jobs in the
    source QEMU), or with the source QEMU paused in pre-switchover (mirrors ended, NBD nodes gone,
    migrate-continue next): after a restart the source runs again, nothing of the migration left
    on it, and the destination never ran the guest."""
    link = link_factory("100mbit" if point == "mirror" else "1gbit")
    short = Path(tempfile.mkdtemp(prefix="dpk-"))
    hooks = short / "hooks"
    hooks.mkdir()
    socks = {side: short / f"api-{side}.sock" for side in "ab"}

    def start(side: str, log: str) -> Role:
        env = {"DATAPLANE_TEST_HOOK_DIR": str(hooks)} if side == "a" else None
        role = Role(link, side, ["serve", "--api", f"unix:{socks[side]}", "--state-dir",
                                 str(short / f"state-{side}")], tmp_path / log, env)
        role.wait_stderr(r"serve listening on", 30)
        return role

    a, b = start("a", "serve-a.log"), start("b", "serve-b.log")
    try:
        cl = Clusters(link, tmp_path, daemons=socks)
        src, dst, paths = make_vms(vm_factory, tmp_path, src_sizes=(16 * MiB, 96 * MiB),
                                   data_fill=(48 if point == "mirror" else 8) * MiB)
        rcv, port = cl.receive(dst, "--grace", "5")  # how long it waits for a source that went away
        mig = cl.migrate(src, port, "--grace", "5")
        if point == "mirror":
            until("the mirrors running", lambda: src.qmp("query-block-jobs"), 120)
        else:
            until("the source at the switchover", lambda: (hooks / "before-continue.reached").exists(), 120)
            assert src.qmp("query-migrate")["status"] == "pre-switchover"
        a.stop(signal.SIGKILL)
        assert mig.wait(60) != 0  # its daemon went away: the command says so
        if point == "mirror":  # what the kill left: the NBD nodes (the mirrors fail with their sockets)
            assert any(n["node-name"].startswith("dpmig") for n in src.qmp("query-named-block-nodes"))
        else:
            assert src.qmp("query-status")["status"] != "running"  # left paused by the kill
        assert list((short / "state-a").glob("*.journal")), "no journal was left"

        a = start("a", "serve-a2.log")
        until("the source daemon ready", lambda: ready(socks["a"]))
        [job] = call(socks["a"], "GET", "/v1/migrations")["items"]
        assert job["state"] == "rolled-back" and job["report"]["reconciled"], job
        actions = " | ".join(job["report"]["actions"])
        if point == "mirror":
            assert "block node dpmig" in actions and "deleted" in actions, actions
        else:
            assert "migration (pre-switchover) cancelled" in actions, actions
            assert "capabilities restored" in actions, actions
        source_intact(src)
        # the destination lost its source before any commit: rolled back, the guest never ran there
        assert rcv.wait(120) != 0
        [received] = call(socks["b"], "GET", "/v1/receivers")["items"]
        assert received["state"] == "rolled-back", received
        # (its QEMU ends itself when an incoming migration fails; if it is still there, it is paused)
        assert not dst.is_running() or dst.qmp("query-status")["status"] != "running"
        for role in (a, b):
            assert role.stop(signal.SIGTERM, 30) == 0, role.stderr()[-3000:]
    finally:
        for role in (a, b):
            role.stop(signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)


def test_reconciliation_never_resumes_a_source_that_committed(vm_factory, tmp_path):
    """A journal that recorded a migration's commit (the source daemon died after writing it): the
    destination may run the guest, so reconciliation leaves the paused source alone, in doubt. The
    same journal without the commit resumes it. (Journals written here as a killed daemon leaves them;
    the QEMU is real.)"""
    import json

    from dataplane.daemon.journal import reconcile

    vm = vm_factory(memory_mib=128, cmdline={"hb_ms": 100}, name="paused")
    vm.wait_heartbeat(3, 60)
    vm.qmp("stop")

    def journal(name: str, commit: bool) -> Path:
        path = tmp_path / f"{name}.journal"
        records = [{"t": "job", "id": name, "kind": "migration", "params": {}},
                   {"t": "qemu", "qemu": 0, "where": {"qmp": str(vm.qmp_path)}, "status": "running"},
                   {"t": "qmp", "qemu": 0, "cmd": "migrate", "args": {"uri": "unix:/nowhere"}}]
        if commit:
            records.append({"t": "commit", "status": "completed"})
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    res = asyncio.run(reconcile(journal("mig-committed", commit=True)))
    assert res is not None and res.outcome == "in-doubt", res
    assert "dataplane resolve" in res.error
    assert vm.qmp("query-status")["status"] == "paused"
    res = asyncio.run(reconcile(journal("mig-not-committed", commit=False)))
    assert res is not None and res.outcome == "rolled-back", res
    assert any("resumed" in a for a in res.actions), res.actions
    assert vm.qmp("query-status")["status"] == "running"
    assert not list(tmp_path.glob("*.journal"))
