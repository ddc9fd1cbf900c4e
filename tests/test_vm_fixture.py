"""The QEMU process library and its fixtures: start, fail, stop, kill, never orphan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from dataplane.testing.guest import REPO_ROOT
from dataplane.testing.vm import (
    Disk,
    QemuVM,
    VMError,
    VMSpec,
    VMStartError,
    disk_sha256,
    fill_random,
    images_identical,
    live_vms,
    make_disk,
    pid_alive,
    write_pattern,
)


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


# --------------------------------------------------------------------------- command line (no QEMU)


def test_spec_builds_blockdev_nodes_and_options(monkeypatch, tmp_path):
    monkeypatch.setenv("DATAPLANE_ACCEL", "kvm")
    spec = VMSpec(
        memory_mib=192,
        disks=[
            Disk(tmp_path / "a,b.qcow2", "qcow2", serial="s1"),
            Disk(tmp_path / "c.raw", node_name="data"),
        ],
        incoming="defer",
        paused=True,
        cmdline={"hb_ms": 50},
        memory_backend_path=tmp_path / "ram",
        kernel="/k",
        initrd="/i",
    )
    args = spec.qemu_args(
        qmp=tmp_path / "q", ctl_qmp=tmp_path / "c", serial=tmp_path / "s", pidfile=tmp_path / "p"
    )
    assert args[args.index("-accel") + 1] == "kvm" and args[args.index("-cpu") + 1] == "host"
    assert "memory-backend=ram0" in args[args.index("-machine") + 1]
    assert f"mem-path={tmp_path}/ram,share=on" in args[args.index("-object") + 1]
    assert args[args.index("-m") + 1] == "192M"
    nodes = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-blockdev"]
    assert [n["node-name"] for n in nodes] == ["disk0-file", "disk0", "data-file", "data"]
    assert nodes[0]["filename"] == str(tmp_path / "a,b.qcow2") and nodes[1]["driver"] == "qcow2"
    devs = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-device"]
    assert devs == [
        {"driver": "virtio-blk-pci", "drive": "disk0", "id": "disk0-dev", "serial": "s1"},
        {"driver": "virtio-blk-pci", "drive": "data", "id": "data-dev"},
    ]
    assert args[args.index("-incoming") + 1] == "defer" and "-S" in args
    assert args[args.index("-append") + 1].endswith(" dp.hb_ms=50")
    assert spec.node_names() == ["disk0", "data"]
    monkeypatch.delenv("DATAPLANE_ACCEL")
    assert VMSpec().accel == "tcg"


def test_disk_helpers(tmp_path):
    raw = make_disk(tmp_path / "d.raw", "4M", "raw")
    qcow = make_disk(tmp_path / "d.qcow2", 4 << 20, "qcow2")
    assert raw.stat().st_size == 4 << 20
    assert images_identical(raw, qcow, "raw", "qcow2")
    digest = fill_random(raw, 1 << 20, offset=512 << 10, seed=7)
    assert fill_random(qcow, 1 << 20, "qcow2", offset=512 << 10, seed=7) == digest
    assert disk_sha256(raw) == disk_sha256(qcow, "qcow2")
    assert images_identical(raw, qcow, "raw", "qcow2")
    write_pattern(qcow, "qcow2", offset=3 << 20, length=4096, pattern=0x5A)
    assert not images_identical(raw, qcow, "raw", "qcow2")
    assert raw.read_bytes()[512 << 10 : (512 << 10) + 16] != bytes(16)
    with pytest.raises(VMError, match="compare"):
        images_identical(raw, tmp_path / "nope.raw")


# --------------------------------------------------------------------------- real QEMU processes


@pytest.mark.e2e
async def test_incoming_defer_paused_vm_answers_qmp(vm_factory, tmp_path):
    disk = make_disk(tmp_path / "d.qcow2", "16M", "qcow2")
    vm = vm_factory(
        incoming="defer", paused=True, disks=[Disk(disk, "qcow2")], memory_backend_path=tmp_path / "ram"
    )
    client = QMPClient("test")
    await client.connect(str(vm.qmp_path))
    try:
        status = await client.execute("query-status")
        assert status["status"] == "inmigrate" and status["running"] is False
        names = {n["node-name"] for n in await client.execute("query-named-block-nodes")}
        assert {"disk0", "disk0-file"} <= names
        memdevs = await client.execute("query-memdev")
        assert [(m["id"], m["share"], m["size"]) for m in memdevs] == [("ram0", True, 256 << 20)]
    finally:
        await client.disconnect()
    assert (tmp_path / "ram").stat().st_size == 256 << 20
    assert vm.heartbeats() == [] and vm.is_running()


@pytest.mark.e2e
def test_start_failure_reports_qemu_message(vm_factory, tmp_path):
    missing = tmp_path / "missing-disk.qcow2"
    with pytest.raises(VMStartError) as err:
        vm_factory(disks=[Disk(missing, "qcow2")])
    msg = str(err.value)
    assert "missing-disk.qcow2" in msg and "No such file or directory" in msg, msg
    assert not any(vm.spec.disks and vm.spec.disks[0].path == missing for vm in live_vms())
    with pytest.raises(VMStartError, match="cannot run"):
        QemuVM(VMSpec(), tmp_path / "nobin", qemu=str(tmp_path / "no-such-qemu")).start()


@pytest.mark.e2e
def test_kill_and_stop_leave_no_process(vm_factory, tmp_path):
    vm = vm_factory(paused=True)
    pid = vm.pid
    assert pid is not None and pid_alive(pid)
    assert int(Path(vm.pidfile_path).read_text()) == pid
    vm.kill()
    assert not Path(f"/proc/{pid}").exists(), "killed QEMU was not reaped"
    assert vm not in live_vms()
    vm.kill()  # idempotent
    with pytest.raises(VMError, match="not running"):
        vm.wait_heartbeat(1, timeout=5)

    vm2 = vm_factory(paused=True)
    assert vm2.stop() == 0  # QMP quit: a clean exit
    assert not pid_alive(vm2.pid)

    # Context manager; socket paths too long for sun_path move to /tmp.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with QemuVM(VMSpec(paused=True), deep) as vm3:
        assert len(str(vm3.qmp_path)) < 100 and vm3.qmp("query-status")["status"] == "prelaunch"
    assert not vm3.is_running() and not vm3.qmp_path.parent.exists()


CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from dataplane.testing.vm import QemuVM, VMSpec

    mode, workdir = sys.argv[1], sys.argv[2]
    vms = []

    def start():
        vms.append(QemuVM(VMSpec(paused=True), workdir).start())

    if mode == "thread":  # asked for by a short-lived thread that is gone before the crash
        t = threading.Thread(target=start)
        t.start()
        t.join()
        time.sleep(0.3)
    else:
        start()
    pid = vms[0].pid
    alive = os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    print(pid, "alive" if alive else "dead", flush=True)
    if mode == "exception":
        raise RuntimeError("test runner crashed")
    if mode == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["exit", "sigkill", "thread", "exception"])
def test_no_orphan_when_the_runner_crashes(guest, tmp_path, mode):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(tmp_path / "vm")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0
    words = proc.stdout.split()
    assert len(words) == 2, f"child printed {proc.stdout!r}; stderr: {proc.stderr[-2000:]}"
    pid, state = int(words[0]), words[1]
    try:
        assert state == "alive", "QEMU died before its runner crashed"
        assert _gone_within(pid, 5), f"QEMU pid {pid} survived its crashed runner ({mode})"
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
