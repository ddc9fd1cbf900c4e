"""Storage live migration in place (`dataplane.migration.slm`), on a real QEMU whose guest writes its
journal throughout: raw → qcow2 and qcow2 → raw at once, onto a loop block device, a target that
fills up mid-copy, an interrupt before the pivot, and a copy the guest outruns."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dataplane.migration import PlanRefused
from dataplane.migration.slm import DiskMove, SlmFailed, SlmOptions, storage_migrate
from dataplane.storage.targets import TargetError, parse_target
from dataplane.testing.journal import verify_journal
from dataplane.testing.vm import Disk, allocated_bytes, disk_sha256, fill_random, images_identical, make_disk
from qmp_driver import QemuDriver

MiB = 1 << 20


def _open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def _guest(vm_factory, tmp_path: Path, jrnl_fmt: str = "raw", data_fmt: str = "qcow2"):
    jrnl = make_disk(tmp_path / f"jrnl.{jrnl_fmt}", 16 * MiB, jrnl_fmt)
    data = make_disk(tmp_path / f"data.{data_fmt}", 64 * MiB, data_fmt)
    fill_random(data, 8 * MiB, data_fmt, offset=4 * MiB, seed=5)
    vm = vm_factory(disks=[Disk(jrnl, jrnl_fmt, node_name="jrnl"), Disk(data, data_fmt, node_name="data")],
                    cmdline={"hb_ms": 100, "disk": "/dev/vda", "disk_rate": 20}, memory_mib=128, name="vm")
    vm.wait_acks(3, 60)
    return vm, jrnl, data


def _uses(drv_blocks: list, node: str) -> str:
    for dev in drv_blocks:
        if dev.node_name == node:
            return dev.node_name
    raise AssertionError(f"no device uses node {node}: {[d.node_name for d in drv_blocks]}")


@pytest.mark.e2e
async def test_in_place_raw_to_qcow2_and_qcow2_to_raw(vm_factory, tmp_path):
    vm, jrnl, data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    want_data = disk_sha256(data, "qcow2")
    new_jrnl, new_data = tmp_path / "new-jrnl.qcow2", tmp_path / "new-data.raw"
    events: list[dict] = []
    async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
        report = await storage_migrate(drv, [DiskMove("jrnl", parse_target(str(new_jrnl), "qcow2")),
                                             DiskMove("data", parse_target(str(new_data), "raw"))],
                                       on_event=events.append)
        assert report.outcome == "completed", report
        blocks = await drv.query_block()
        files = {n.node_name: n.filename for n in await drv.query_named_block_nodes()}
        assert [files[d.node_name] for d in blocks if d.node_name] == [str(new_jrnl), str(new_data)]
        names = {n for n in files}
        assert "jrnl" not in names and "data" not in names  # the old nodes are gone
        assert await drv.query_jobs() == []
    held = _open_files(vm.pid)
    assert str(jrnl) not in held and str(data) not in held, held  # QEMU let go of the old files
    assert [d.pivoted for d in report.disks] == [True, True]
    assert report.copied >= 8 * MiB
    assert any(e.get("event") == "progress" for e in events)
    n = vm.serial().max_ack
    await asyncio.to_thread(vm.wait_acks, n + 5, 60)  # the journal goes on, on the new disk
    await asyncio.to_thread(vm.stop)
    verify_journal(str(new_jrnl), "qcow2", acked_upto=vm.serial().max_ack)
    assert images_identical(data, new_data, "qcow2", "raw")
    assert disk_sha256(new_data, "raw") == want_data
    # thin stays thin: the raw target holds about the 8 MiB of data, not its 64 MiB
    assert allocated_bytes(new_data) <= 8 * MiB * 1.05 + MiB, allocated_bytes(new_data)


@pytest.mark.e2e
async def test_onto_a_loop_block_device(vm_factory, tmp_path):
    if shutil.which("losetup") is None:
        pytest.fail("losetup is missing (util-linux)")
    vm, _jrnl, data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(80 * MiB)  # larger than the disk: used up to the disk's size
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
            target = parse_target(dev)
            assert target.kind == "device"
            report = await storage_migrate(drv, [DiskMove("data", target)])
            assert report.disks[0].file == dev
        await asyncio.to_thread(vm.stop)
        out = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(data),
                              f"json:{{\"driver\":\"raw\",\"size\":{64 * MiB},\"file\":"
                              f"{{\"driver\":\"host_device\",\"filename\":\"{dev}\"}}}}"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.e2e
async def test_a_target_that_cannot_keep_holes_is_named_in_the_report(vm_factory, tmp_path):
    """A target on ramfs, which cannot punch holes: the copy completes, and the report says that the
    target's written zeros stay allocated (a target on the test's own file system keeps its holes)."""
    vm, jrnl, _data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    mnt = Path(tempfile.mkdtemp(prefix="dp-ramfs-"))
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        moves = [DiskMove("jrnl", parse_target(str(mnt / "j.raw"), "raw")),
                 DiskMove("data", parse_target(str(tmp_path / "d.raw"), "raw"))]
        async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
            report = await storage_migrate(drv, moves)
        assert report.outcome == "completed"
        on_ramfs, kept = report.disks
        assert on_ramfs.holes.startswith("allocated: the file system of"), on_ramfs.holes
        assert "punch holes" in on_ramfs.holes and kept.holes == "kept"
        assert report.as_dict()["disks"][0]["holes"] == on_ramfs.holes
        n = vm.serial().max_ack
        await asyncio.to_thread(vm.wait_acks, n + 3, 60)
        await asyncio.to_thread(vm.stop)
        verify_journal(str(mnt / "j.raw"), "raw", acked_upto=vm.serial().max_ack)
        assert not [f for f in os.listdir(mnt) if f.startswith(".dataplane-holes-")]  # the probe is gone
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


@pytest.mark.e2e
async def test_target_that_fills_up_rolls_back(vm_factory, tmp_path):
    """The target's file system fills up mid-copy: the VM stays on its old disk, running, nothing of
    the migration left in QEMU, the target file kept and named."""
    vm, jrnl, data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    want = disk_sha256(data, "qcow2")
    small = Path(tempfile.mkdtemp(prefix="dp-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
            with pytest.raises(SlmFailed) as info:
                await storage_migrate(drv, [DiskMove("data", parse_target(str(small / "d.raw"), "raw"))])
            rep = info.value.report
            assert rep.outcome == "rolled-back" and str(small / "d.raw") in (rep.error or ""), rep
            assert not [n.node_name for n in await drv.query_named_block_nodes()
                        if n.node_name.startswith("dpslm")]  # this run's target nodes are gone
            assert await drv.query_jobs() == []
            files = {n.node_name: n.filename for n in await drv.query_named_block_nodes()}
            assert files["data"] == str(data)
            assert (await drv.query_status()).running
        assert (small / "d.raw").exists()
        n = vm.serial().max_ack
        await asyncio.to_thread(vm.wait_acks, n + 3, 60)
        await asyncio.to_thread(vm.stop)
        verify_journal(str(jrnl), "raw", acked_upto=vm.serial().max_ack)
        assert disk_sha256(data, "qcow2") == want
    finally:
        subprocess.run(["umount", str(small)], check=False)
        shutil.rmtree(small, ignore_errors=True)


@pytest.mark.e2e
async def test_interrupt_before_the_pivot_rolls_back(vm_factory, tmp_path):
    vm, _jrnl, data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    stop = asyncio.Event()
    events: list[dict] = []

    def on_event(e: dict) -> None:
        events.append(e)
        if e.get("event") == "progress" and e.get("disk_done", 0) > 0:
            stop.set()

    async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
        with pytest.raises(SlmFailed, match="interrupted") as info:
            await storage_migrate(drv, [DiskMove("data", parse_target(str(tmp_path / "n.qcow2"), "qcow2"))],
                                  SlmOptions(bandwidth=2 * MiB), on_event=on_event, interrupt=stop)
        assert info.value.report.outcome == "rolled-back"
        files = {n.node_name: n.filename for n in await drv.query_named_block_nodes()}
        assert files["data"] == str(data) and not [n for n in files if n.startswith("dpslm")]
        assert await drv.query_jobs() == []


@pytest.mark.e2e
async def test_refusals_change_nothing(vm_factory, tmp_path):
    vm, _jrnl, _data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    exists = tmp_path / "exists.raw"
    exists.write_bytes(b"x")
    async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
        before = sorted(n.node_name for n in await drv.query_named_block_nodes())
        with pytest.raises(PlanRefused, match="exists; give --reuse"):
            await storage_migrate(drv, [DiskMove("data", parse_target(str(exists)))])
        with pytest.raises(PlanRefused, match="no guest block device"):
            await storage_migrate(drv, [DiskMove("nope", parse_target(str(tmp_path / "n.raw")))])
        with pytest.raises(PlanRefused, match="reuse needs the same size|virtual size"):
            await storage_migrate(drv, [DiskMove("data", parse_target(str(exists)))], SlmOptions(reuse=True))
        assert sorted(n.node_name for n in await drv.query_named_block_nodes()) == before


def test_target_parsing():
    assert parse_target("/x/y.qcow2", "qcow2").kind == "file"
    assert parse_target('{"driver": "nbd", "server": {"type": "unix", "path": "/s"}}').kind == "blockdev"
    with pytest.raises(TargetError, match="needs a \"driver\""):
        parse_target('{"x": 1}')
    with pytest.raises(TargetError, match="unknown format"):
        parse_target("/x", "vmdk2")


@pytest.mark.e2e
async def test_a_guest_outrunning_the_copy_is_made_to_converge(qemu_platform, vm_factory, tmp_path):
    """The guest rewrites its 4 MiB journal disk at ~6 MiB/s while the copy is capped at 1 MiB/s: the
    background copy cannot converge, so the policy steps in (write-blocking: the running job switched
    where QEMU can, 8.2+; started over in that mode on QEMU 7.2, copying again what it had copied)
    and the migration completes."""
    jrnl = make_disk(tmp_path / "jrnl.raw", 4 * MiB)
    vm = vm_factory(disks=[Disk(jrnl, "raw", node_name="jrnl")], memory_mib=128, name="vm",
                    cmdline={"hb_ms": 100, "disk": "/dev/vda", "disk_rate": 100, "disk_rec": 65536})
    qemu_platform.check(vm)
    await asyncio.to_thread(vm.wait_acks, 20, 60)
    new = tmp_path / "new.raw"
    async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
        features = await drv.features()
        report = await storage_migrate(drv, [DiskMove("jrnl", parse_target(str(new)))],
                                       SlmOptions(bandwidth=1 * MiB, stall_window=3, timeout=240))
    actions = [d.action for d in report.decisions]
    assert "write-blocking" in actions, report.decisions  # switched (8.2+) or started over (7.2)
    step = next(d for d in report.decisions if d.action == "write-blocking")
    if features.block_job_change:
        assert "started over" not in step.reason and report.disks[0].copied_again == 0
    else:
        assert "started over in write-blocking mode" in step.reason, step
        assert report.disks[0].copied_again > 0
    assert report.outcome == "completed" and report.disks[0].file == str(new)
    # and back, where starting over is not allowed (restart_max_s=0): throttling on 7.2
    back = tmp_path / "back.raw"
    async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
        report = await storage_migrate(drv, [DiskMove("jrnl-dev", parse_target(str(back)))],
                                       SlmOptions(bandwidth=1 * MiB, stall_window=3, timeout=240,
                                                  restart_max_s=0))
    actions = [d.action for d in report.decisions]
    assert ("write-blocking" if features.block_job_change else "throttle") in actions, report.decisions
    assert report.outcome == "completed" and report.disks[0].copied_again == 0
    n = vm.serial().max_ack
    await asyncio.to_thread(vm.wait_acks, n + 20, 60)  # writes go on at full speed after the pivot
    await asyncio.to_thread(vm.stop)
    verify_journal(str(back), "raw", acked_upto=vm.serial().max_ack)


def test_copy_monitor_sees_a_sawtooth_that_does_not_shrink():
    from dataplane.migration.slm import CopyMonitor

    steady = CopyMonitor(1.0, 0.05, 0.0)
    assert not any(steady.stalled(t / 10, 100_000_000 - t * 1_000_000) for t in range(1, 60))  # a bulk copy
    saw = CopyMonitor(1.0, 0.05, 0.0)
    stalls = [saw.stalled(t / 10, [4, 3, 2, 1, 3, 4][t % 6] << 20) for t in range(1, 60)]
    assert any(stalls) and not any(stalls[:19])  # the first window only sets the mark


@pytest.mark.e2e
def test_storage_migrate_command(vm_factory, tmp_path):
    """`dataplane storage-migrate` end to end: JSON events, the report, exit 0; the guest on the new
    file; then a second run onto an existing file without --reuse is refused with one error line."""
    import json
    import sys

    vm, _jrnl, data = _guest(vm_factory, tmp_path)
    new = tmp_path / "cli.qcow2"
    cmd = [sys.executable, "-m", "dataplane", "storage-migrate", "--qmp", str(vm.qmp_path),
           "--disk", f"data={new}", "--format", "qcow2", "--output", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    report = events[-1]
    assert report["event"] == "report" and report["outcome"] == "completed", report
    assert report["disks"][0]["file"] == str(new) and report["disks"][0]["pivoted"]
    assert any(e["event"] == "progress" for e in events)
    again = subprocess.run([*cmd[:6], "--disk", f"jrnl={new}"], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in again.stderr.splitlines() if "error:" in ln]
    assert again.returncode == 1 and len(errors) == 1 and "exists; give --reuse" in errors[0], again.stderr
    bad = subprocess.run([*cmd[:4], "--disk", "nonsense"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected NODE=TARGET" in bad.stderr
    vm.stop()
    assert images_identical(data, new, "qcow2", "qcow2")
