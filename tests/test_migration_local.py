"""dataplane.migration on one host: two real QEMUs (TCG), disks over NBD unix sockets."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from dataplane.migration import (
    DiskPlan,
    MigrationOptions,
    MigrationPlan,
    MigrationProgress,
    MigrationReport,
    PlanRefused,
    RolledBack,
    abort_target,
    await_incoming,
    discover_plan,
    finish_target,
    image_paths,
    migrate_source,
    prepare_target,
    resolve_targets,
    resume_target,
    validate_target,
)
from dataplane.testing.journal import verify_journal
from dataplane.testing.ramstamp import PAGE, stamped_pages
from dataplane.testing.vm import (
    Disk,
    GuestRamError,
    allocated_bytes,
    disk_sha256,
    fill_random,
    images_identical,
    make_disk,
    verify_continued,
    write_bytes,
)
from qmp_driver import BlockDevice, BlockNode, CommandError, QemuDriver

MiB = 1 << 20


async def _snapshot(drv: QemuDriver) -> dict:
    """What a rollback must leave as it was."""
    return {"caps": await drv.query_migrate_capabilities(),
            "params": {k: v for k, v in (await drv.query_migrate_parameters()).items()
                       if k in ("max-bandwidth", "downtime-limit")},
            "nodes": sorted(n.node_name for n in await drv.query_named_block_nodes()),
            "jobs": [j.id for j in await drv.query_jobs()]}


async def _assert_source_intact(drv: QemuDriver, vm, before: dict) -> None:
    assert (await drv.query_status()).status == "running"
    assert await _snapshot(drv) == before
    assert not any(n.node_name.startswith("dpmig") for n in await drv.query_named_block_nodes())
    n = len(vm.heartbeats())
    await asyncio.to_thread(vm.wait_heartbeat, n + 3, 60)  # the guest keeps running
    await asyncio.to_thread(vm.verify_next_ram_pass, 60)  # its RAM is whole


# ------------------------------------------------------------------- plan (no QEMU)


def _node(name: str, size: int, ro: bool = False, driver: str | None = None) -> BlockNode:
    return BlockNode(name, driver or ("qcow2" if name == "d1" else "raw"), f"/x/{name}", ro, size, [])


def _dev(node: str, dev_id: str) -> BlockDevice:
    return BlockDevice("", f"/machine/peripheral/{dev_id}/virtio-backend", node, False, False)


def test_plan_json_roundtrip_and_validation():
    plan = MigrationPlan((DiskPlan("d0", 64 * MiB, "raw", "d0"), DiskPlan("d1", 32 * MiB, "qcow2", "e1")),
                         128 * MiB, MigrationOptions(max_bandwidth=8 * MiB, auto_converge=True))
    again = MigrationPlan.from_json(plan.to_json())
    assert again == plan
    validate_target(plan, [_node("d0", 64 * MiB), _node("d1", 32 * MiB), _node("other", 1)])
    with pytest.raises(PlanRefused, match=r"'d1': no block node"):
        validate_target(plan, [_node("d0", 64 * MiB)])
    with pytest.raises(PlanRefused, match=r"'d0': destination is smaller"):
        validate_target(plan, [_node("d0", 32 * MiB), _node("d1", 32 * MiB)])
    with pytest.raises(PlanRefused, match=r"'d1': the destination node is read-only"):
        validate_target(plan, [_node("d0", 64 * MiB), _node("d1", 32 * MiB, ro=True)])
    validate_target(plan, [_node("d0", 64 * MiB), _node("d1", 32 * MiB, driver="raw")])  # qcow2 into raw
    with pytest.raises(PlanRefused, match=r"'d1': the destination node is file, the source disk qcow2"):
        validate_target(plan, [_node("d0", 64 * MiB), _node("d1", 32 * MiB, driver="file")])
    # only the root nodes of guest devices, and only those the destination allows
    nodes = [_node("d0", 64 * MiB), _node("d1", 32 * MiB), _node("other", 1)]
    devices = [_dev("d0", "vda"), _dev("d1", "vdb")]
    validate_target(plan, nodes, devices)
    validate_target(plan, nodes, devices, allowed=["vda", "d1"])
    with pytest.raises(PlanRefused, match=r"'d1': the destination node is not the root node of a guest"):
        validate_target(plan, nodes, devices[:1])
    with pytest.raises(PlanRefused, match=r"'d1': not among the disks this destination accepts \(vda\)"):
        validate_target(plan, nodes, devices, allowed=["vda"])
    with pytest.raises(PlanRefused, match="version"):
        MigrationPlan.from_json('{"version": 99}')
    with pytest.raises(PlanRefused, match="malformed"):
        MigrationPlan.from_json('{"version": 1, "memory_size": 1, "disks": [{"node_name": "x"}]}')
    with pytest.raises(PlanRefused, match="duplicate"):
        MigrationPlan((DiskPlan("d0", 1, "raw", "a"), DiskPlan("d0", 1, "raw", "b")), 1)


def test_plan_disk_map():
    """A disk mapped onto a destination node of another name: version 2 on the wire (a version-1
    destination refuses it rather than writing the node of the source's name), validated against
    that node, which may be named by its device id there; two disks on one node are refused."""
    plan = MigrationPlan((DiskPlan("d0", 64 * MiB, "raw", "d0"),
                          DiskPlan("d1", 32 * MiB, "raw", "d1", "ua-new")), 128 * MiB)
    assert json.loads(plan.to_json())["version"] == 2
    assert MigrationPlan.from_json(plan.to_json()) == plan
    unmapped = MigrationPlan((DiskPlan("d0", 64 * MiB, "raw", "d0", "d0"),), 1)  # onto its own name: no map
    assert json.loads(unmapped.to_json())["version"] == 1 and "target_node" not in unmapped.to_json()
    nodes = [_node("d0", 64 * MiB), _node("d1", 32 * MiB), _node("new", 32 * MiB, driver="qcow2")]
    devices = [_dev("d0", "vda"), _dev("d1", "vdb"), _dev("new", "ua-new")]
    resolved = resolve_targets(plan, nodes, devices)
    assert [d.dest_node for d in resolved.disks] == ["d0", "new"]
    validate_target(resolved, nodes, devices)
    validate_target(resolved, nodes, devices, allowed=["vda", "ua-new"])
    with pytest.raises(PlanRefused, match=r"disk 'd1' -> 'new': not among the disks this destination"):
        validate_target(resolved, nodes, devices, allowed=["vda", "vdb"])
    with pytest.raises(PlanRefused, match=r"disk 'd1' -> 'ua-new': no block node of that name"):
        validate_target(plan, nodes, devices)  # unresolved: device ids are resolved first
    with pytest.raises(PlanRefused, match=r"disk 'd1' -> 'new': destination is larger"):
        validate_target(resolved, [*nodes[:2], _node("new", 64 * MiB)], devices)
    with pytest.raises(PlanRefused, match="two disks map onto one destination node"):
        MigrationPlan((DiskPlan("d0", 1, "raw", "d0", "x"), DiskPlan("d1", 1, "raw", "d1", "x")), 1)
    with pytest.raises(PlanRefused, match="two disks map onto one destination node"):
        MigrationPlan((DiskPlan("d0", 1, "raw", "d0", "d1"), DiskPlan("d1", 1, "raw", "d1")), 1)


# -------------------------------------------------------------------- real QEMUs


@pytest.mark.e2e
async def test_migrate_two_disks_raw_and_qcow2(vm_factory, tmp_path):
    s0, s1 = make_disk(tmp_path / "s0.raw", 64 * MiB), make_disk(tmp_path / "s1.qcow2", 32 * MiB, "qcow2")
    d0, d1 = make_disk(tmp_path / "d0.raw", 64 * MiB), make_disk(tmp_path / "d1.qcow2", 32 * MiB, "qcow2")
    fill_random(s1, 8 * MiB, "qcow2", offset=4 * MiB, seed=7)
    fill_random(s1, 1 * MiB, "qcow2", offset=30 * MiB, seed=8)
    write_bytes(s1, bytes(4 * MiB), "qcow2", offset=16 * MiB)  # written zeros: crossed as WRITE_ZEROES
    fill_random(d1, 4 * MiB, "qcow2", offset=16 * MiB, seed=9)  # ... over garbage on the destination
    want_s1 = disk_sha256(s1, "qcow2")
    src = vm_factory(disks=[Disk(s0, "raw", node_name="jrnl"), Disk(s1, "qcow2", node_name="data")],
                     cmdline={"hb_ms": 100, "disk_rate": 20}, memory_mib=128, name="src")
    dst = vm_factory(disks=[Disk(d0, "raw", node_name="jrnl"), Disk(d1, "qcow2", node_name="data")],
                     memory_mib=128, incoming="defer", paused=True, name="dst")
    await asyncio.to_thread(src.wait_acks, 5, 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    samples: list[MigrationProgress] = []
    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        plan = await discover_plan(s)
        assert [(x.node_name, x.size, x.format) for x in plan.disks] == [
            ("jrnl", 64 * MiB, "raw"), ("data", 32 * MiB, "qcow2")]
        assert plan.memory_size == 128 * MiB
        await prepare_target(d, MigrationPlan.from_json(plan.to_json()), nbd, mig)
        assert await image_paths(d, plan) == [str(d0), str(d1)]  # what the early writeback works on
        zeroes: set[str] = set()

        async def watch_targets() -> None:  # the mirror targets (NBD client nodes) while they exist
            while True:
                zeroes.update(str(n.raw.get("detect_zeroes")) for n in await s.query_named_block_nodes()
                              if n.driver == "nbd")
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch_targets())
        try:
            report = await migrate_source(s, plan, lambda disk: nbd, mig, progress=samples.append)
        finally:
            watcher.cancel()
        assert zeroes == {"unmap"}, zeroes
        await finish_target(d)
        assert (await s.query_status()).status == "postmigrate"
        assert (await d.query_status()).status == "running"
        assert not any(n.node_name.startswith("dpmig") for n in await s.query_named_block_nodes())
        assert await s.query_jobs() == []
    assert report.outcome == "completed" and report.phase == "completed" and report.error is None
    assert report.downtime_ms is not None and report.ram_transferred > 0
    assert report.disk_bytes >= 9 * MiB  # the data (holes cross as zero writes, or not at all)
    phases = [p.phase for p in samples]
    for phase in ("mirror", "mirror-ready", "precopy", "switchover", "completed"):
        assert phase in phases, phases
    last_src = await asyncio.to_thread(verify_continued, src, dst, timeout=60)  # heartbeat and RAM
    await asyncio.to_thread(dst.wait_acks, src.serial().max_ack + 3, 60)  # journal goes on at the dst
    await asyncio.to_thread(dst.stop)
    src.kill()
    acked = max(src.serial().max_ack, dst.serial().max_ack)
    verify_journal(str(d0), "raw", acked_upto=acked, expect_boot_id=last_src.boot_id)
    assert disk_sha256(d1, "qcow2") == want_s1


@pytest.mark.e2e
async def test_paused_destination_is_byte_identical(vm_factory, tmp_path):
    s0, d0 = make_disk(tmp_path / "s0.raw", 32 * MiB), make_disk(tmp_path / "d0.qcow2", 32 * MiB, "qcow2")
    src = vm_factory(disks=[Disk(s0, "raw")], cmdline={"hb_ms": 100, "disk_rate": 20}, memory_mib=128,
                     name="src")
    dst = vm_factory(disks=[Disk(d0, "qcow2")], memory_mib=128, incoming="defer", paused=True, name="dst")
    await asyncio.to_thread(src.wait_acks, 5, 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        plan = await discover_plan(s)
        await prepare_target(d, plan, nbd, mig)
        report = await migrate_source(s, plan, lambda disk: nbd, mig)
        await finish_target(d, resume=False)
        assert report.outcome == "completed"
        assert (await s.query_status()).status == "postmigrate"
        assert not (await d.query_status()).running
    n = len(dst.heartbeats())
    await asyncio.sleep(1.0)
    assert len(dst.heartbeats()) == n, "the destination runs although resume=False"
    await asyncio.to_thread(dst.stop)
    src.kill()
    assert images_identical(s0, d0, "raw", "qcow2")
    verify_journal(str(d0), "qcow2", acked_upto=src.serial().max_ack)


@pytest.mark.e2e
async def test_a_page_lost_in_migration_fails_the_ram_check(vm_factory, tmp_path):
    """The check after a migration can fail: the destination's RAM (a memory-backend-file in /dev/shm)
    gets one page back as it was before the source rewrote it, exactly what a lost dirty page leaves,
    and the verification of the migrated guest must say which page and which generations."""
    shm = Path(tempfile.mkdtemp(prefix="dp-ram-", dir="/dev/shm"))
    try:
        src = vm_factory(memory_mib=128, memory_backend_path=shm / "src.ram", name="src",
                         disks=[Disk(make_disk(tmp_path / "s0.raw", 8 * MiB), "raw")],
                         cmdline={"hb_ms": 100, "dirty_mib": 16, "dirty_rate": 8, "pattern": "text"})
        dst = vm_factory(memory_mib=128, memory_backend_path=shm / "dst.ram", incoming="defer", paused=True,
                         disks=[Disk(make_disk(tmp_path / "d0.raw", 8 * MiB), "raw")], name="dst")
        await asyncio.to_thread(src.verify_ram, 1, 60)
        with open(shm / "src.ram", "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mem:
            page = stamped_pages(mem)[1234]
            old = mem[page.offset : page.offset + PAGE]
            for _ in range(400):  # until the source has rewritten it (every 2 s)
                if mem[page.offset + 8 : page.offset + 16] != old[8:16]:
                    break
                await asyncio.sleep(0.05)
        mig = f"unix:{tmp_path / 'mig.sock'}"
        async with await QemuDriver.connect_socket(src.qmp_path) as s, \
                await QemuDriver.connect_socket(dst.qmp_path) as d:
            plan = await discover_plan(s)
            await prepare_target(d, plan, str(tmp_path / "nbd.sock"), mig)
            # (the source's page 1234 has moved on since `old` was read: see the loop above)
            nbd = str(tmp_path / "nbd.sock")
            report = await migrate_source(s, plan, lambda disk: nbd, mig)
            await finish_target(d, resume=False)
            assert report.outcome == "completed"
            with open(shm / "dst.ram", "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mem:
                now = stamped_pages(mem)[1234]
                assert now.offset == page.offset and now.generation > page.generation
                mem[page.offset : page.offset + PAGE] = old
            await d.execute("cont")
        with pytest.raises(GuestRamError, match=rf"page 1234: expected generation {now.generation}, "
                                                rf"found {page.generation} \(stale"):
            await asyncio.to_thread(verify_continued, src, dst, timeout=60)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.mark.e2e
async def test_smaller_destination_refused_before_anything_starts(vm_factory, tmp_path):
    s0, d0 = make_disk(tmp_path / "s0.raw", 64 * MiB, "raw"), make_disk(tmp_path / "d0.raw", 32 * MiB, "raw")
    src = vm_factory(disks=[Disk(s0, "raw")], cmdline={"hb_ms": 100, "disk_rate": 20}, memory_mib=128,
                     name="src")
    dst = vm_factory(disks=[Disk(d0, "raw")], memory_mib=128, incoming="defer", paused=True, name="dst")
    await asyncio.to_thread(src.wait_heartbeat, 2, 60)
    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        before = await _snapshot(s)
        dst_caps = await d.query_migrate_capabilities()
        plan = await discover_plan(s)
        with pytest.raises(PlanRefused, match=r"'disk0': destination is smaller than the source"):
            await prepare_target(d, plan, str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}")
        assert await d.query_block_exports() == []
        assert await d.query_migrate_capabilities() == dst_caps
        assert (await d.query_status()).status == "inmigrate"
        await _assert_source_intact(s, src, before)


@pytest.mark.e2e
async def test_destination_killed_during_mirror_rolls_back(vm_factory, tmp_path):
    s0, d0 = make_disk(tmp_path / "s0.raw", 64 * MiB, "raw"), make_disk(tmp_path / "d0.raw", 64 * MiB, "raw")
    fill_random(s0, 64 * MiB, "raw", seed=3)
    src = vm_factory(disks=[Disk(s0, "raw", node_name="big")], cmdline={"hb_ms": 100}, memory_mib=128,
                     name="src")
    dst = vm_factory(disks=[Disk(d0, "raw", node_name="big")], memory_mib=128, incoming="defer", paused=True,
                     name="dst")
    await asyncio.to_thread(src.wait_heartbeat, 2, 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    killed: list[MigrationProgress] = []

    def progress(p: MigrationProgress) -> None:
        if not killed and p.phase == "mirror" and p.disk_done >= 2 * MiB:
            killed.append(p)
            os.kill(dst.pid, signal.SIGKILL)

    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        before = await _snapshot(s)
        plan = await discover_plan(s, options=MigrationOptions(mirror_speed=8 * MiB, progress_interval=0.2))
        await prepare_target(d, plan, nbd, mig)
        with pytest.raises(RolledBack) as info:
            await migrate_source(s, plan, lambda disk: nbd, mig, progress=progress)
        await abort_target(d)  # the destination is gone: must not raise
        assert killed, "the mirror finished before the destination could be killed"
        report = info.value.report
        assert report.outcome == "rolled-back" and report.phase == "mirror", report
        assert "big" in report.error and "rollback:" not in report.error, report.error
        await _assert_source_intact(s, src, before)


@pytest.mark.e2e
async def test_cancel_during_precopy_rolls_back(vm_factory, tmp_path):
    s0, d0 = make_disk(tmp_path / "s0.raw", 32 * MiB, "raw"), make_disk(tmp_path / "d0.raw", 32 * MiB, "raw")
    src = vm_factory(disks=[Disk(s0, "raw")], memory_mib=128, name="src",
                     cmdline={"hb_ms": 100, "dirty_mib": 48, "dirty_rate": 50, "pattern": "random"})
    dst = vm_factory(disks=[Disk(d0, "raw")], memory_mib=128, incoming="defer", paused=True, name="dst")
    await asyncio.to_thread(src.wait_for_serial, r"DIRTY_READY", 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    in_precopy = asyncio.Event()
    reports: list[MigrationReport] = []

    def progress(p: MigrationProgress) -> None:
        if p.phase == "precopy" and p.ram_done > 0:
            in_precopy.set()

    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        before = await _snapshot(s)
        plan = await discover_plan(s, options=MigrationOptions(max_bandwidth=4 * MiB, progress_interval=0.2))
        await prepare_target(d, plan, nbd, mig)
        task = asyncio.create_task(migrate_source(s, plan, lambda disk: nbd, mig, progress=progress,
                                                  on_report=reports.append))
        await asyncio.wait_for(in_precopy.wait(), 60)
        task.cancel()  # what Ctrl-C does to the orchestrating task
        with pytest.raises(asyncio.CancelledError):
            await task
        await abort_target(d)
        assert len(reports) == 1
        report = reports[0]
        assert report.outcome == "rolled-back" and report.phase == "precopy", report
        assert report.error == "cancelled", report.error
        assert 0 < report.ram_transferred
        assert (await s.query_migrate()).status == "cancelled"
        await _assert_source_intact(s, src, before)


@pytest.mark.e2e
async def test_destination_killed_during_precopy_rolls_back(vm_factory, tmp_path):
    """Mirrors READY, migration active: the dst dies; migrate fails, READY mirrors are force-cancelled."""
    s0, d0 = make_disk(tmp_path / "s0.raw", 32 * MiB), make_disk(tmp_path / "d0.raw", 32 * MiB)
    src = vm_factory(disks=[Disk(s0, "raw")], memory_mib=128, name="src",
                     cmdline={"hb_ms": 100, "disk_rate": 20, "dirty_mib": 48, "dirty_rate": 50,
                              "pattern": "random"})
    dst = vm_factory(disks=[Disk(d0, "raw")], memory_mib=128, incoming="defer", paused=True, name="dst")
    await asyncio.to_thread(src.wait_for_serial, r"DIRTY_READY", 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    killed: list[MigrationProgress] = []

    def progress(p: MigrationProgress) -> None:
        if not killed and p.phase == "precopy" and p.ram_done > 0:
            killed.append(p)
            os.kill(dst.pid, signal.SIGKILL)

    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        before = await _snapshot(s)
        plan = await discover_plan(s, options=MigrationOptions(max_bandwidth=4 * MiB, progress_interval=0.2,
                                                               auto_converge=True))
        await prepare_target(d, plan, nbd, mig)
        with pytest.raises(RolledBack) as info:
            await migrate_source(s, plan, lambda disk: nbd, mig, progress=progress)
        assert killed
        report = info.value.report
        assert report.outcome == "rolled-back" and report.phase == "precopy", report
        assert "rollback:" not in report.error, report.error
        await _assert_source_intact(s, src, before)
    await asyncio.to_thread(src.wait_acks, src.serial().max_ack + 3, 60)  # its disk still takes writes


@pytest.mark.e2e
async def test_cancel_at_switchover_resumes_source(vm_factory, tmp_path):
    """Cancelled at pre-switchover, where the source guest is already stopped: it must run again."""
    s0, d0 = make_disk(tmp_path / "s0.raw", 32 * MiB), make_disk(tmp_path / "d0.raw", 32 * MiB)
    src = vm_factory(disks=[Disk(s0, "raw")], memory_mib=128, name="src",
                     cmdline={"hb_ms": 100, "disk_rate": 20})
    dst = vm_factory(disks=[Disk(d0, "raw")], memory_mib=128, incoming="defer", paused=True, name="dst")
    await asyncio.to_thread(src.wait_acks, 3, 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    tasks: list[asyncio.Task] = []
    reports: list[MigrationReport] = []

    def progress(p: MigrationProgress) -> None:
        if p.phase == "switchover":
            tasks[0].cancel()

    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        before = await _snapshot(s)
        plan = await discover_plan(s)
        await prepare_target(d, plan, nbd, mig)
        tasks.append(asyncio.create_task(migrate_source(s, plan, lambda disk: nbd, mig, progress=progress,
                                                        on_report=reports.append)))
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        await abort_target(d)
        assert [(r.outcome, r.phase, r.error) for r in reports] == [
            ("rolled-back", "switchover", "cancelled")]
        await _assert_source_intact(s, src, before)
    await asyncio.to_thread(src.wait_acks, src.serial().max_ack + 3, 60)


# -------------------------------------------------------------------- the destination's own holes


@pytest.mark.e2e
async def test_destination_without_dash_s_stays_paused_until_resumed(vm_factory, tmp_path):
    """A destination QEMU started without -S would run the guest by itself the moment its incoming
    migration completes; prepare_target takes that away, so only resume_target starts it."""
    s0, d0 = make_disk(tmp_path / "s0.raw", 8 * MiB), make_disk(tmp_path / "d0.raw", 8 * MiB)
    src = vm_factory(disks=[Disk(s0, "raw")], cmdline={"hb_ms": 100, "disk_rate": 20}, memory_mib=128,
                     name="src")
    dst = vm_factory(disks=[Disk(d0, "raw")], memory_mib=128, incoming="defer", paused=False, name="dst")
    await asyncio.to_thread(src.wait_acks, 3, 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        plan = await discover_plan(s)
        prepared = await prepare_target(d, plan, nbd, mig)
        await migrate_source(s, plan, lambda disk: nbd, mig)
        assert await await_incoming(d, 60) == "completed"
        await asyncio.sleep(1.0)
        assert (await d.query_status()).status == "paused", "the destination started by itself"
        n = len(dst.heartbeats())
        assert len(dst.heartbeats()) == n
        await resume_target(d, prepared, "completed")
        assert (await d.query_status()).status == "running"
    await asyncio.to_thread(dst.wait_heartbeat, n + 3, 60)


@pytest.mark.e2e
async def test_prepare_target_leaves_a_foreign_nbd_server_alone(vm_factory, tmp_path):
    """An NBD server somebody else started makes prepare_target fail, and its clean-up must not
    stop that server (it removes only what this run created)."""
    d0 = make_disk(tmp_path / "d0.raw", 8 * MiB)
    dst = vm_factory(disks=[Disk(d0, "raw", node_name="jrnl")], memory_mib=128, incoming="defer",
                     paused=True, name="dst")
    plan = MigrationPlan((DiskPlan("jrnl", 8 * MiB, "raw", "jrnl"),), 128 * MiB)
    async with await QemuDriver.connect_socket(dst.qmp_path) as d:
        await d.nbd_server_start(str(tmp_path / "foreign.sock"))
        await d.block_export_add("theirs", "jrnl", name="theirs", writable=False)
        with pytest.raises(CommandError, match="already"):
            await prepare_target(d, plan, str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}")
        assert [e.id for e in await d.query_block_exports()] == ["theirs"]
        await d.nbd_server_stop()  # still running: this does not raise


@pytest.mark.e2e
async def test_prepare_target_refuses_nodes_that_are_not_guest_disks(vm_factory, tmp_path):
    """The source names the nodes the destination exports writable: a protocol node under a guest
    disk, or a disk the destination does not allow, is refused before anything changes."""
    d0 = make_disk(tmp_path / "d0.raw", 8 * MiB)
    dst = vm_factory(disks=[Disk(d0, "raw", node_name="jrnl")], memory_mib=128, incoming="defer",
                     paused=True, name="dst")
    async with await QemuDriver.connect_socket(dst.qmp_path) as d:
        nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
        protocol = MigrationPlan((DiskPlan("jrnl-file", 8 * MiB, "file", "jrnl-file"),), 128 * MiB)
        with pytest.raises(PlanRefused, match="'jrnl-file': the destination node is not the root node"):
            await prepare_target(d, protocol, nbd, mig)
        plan = MigrationPlan((DiskPlan("jrnl", 8 * MiB, "raw", "jrnl"),), 128 * MiB)
        with pytest.raises(PlanRefused, match="'jrnl': not among the disks this destination accepts"):
            await prepare_target(d, plan, nbd, mig, allowed=["vdz"])
        assert await d.query_block_exports() == []
        assert (await d.query_status()).status == "inmigrate"
        prepared = await prepare_target(d, plan, nbd, mig, allowed=["jrnl"])
        assert [e.id for e in await d.query_block_exports()] == ["jrnl"]
        await abort_target(d, prepared)
        assert await d.query_block_exports() == []


@pytest.mark.e2e
async def test_disk_map_onto_new_thin_volumes(vm_factory, tmp_path):
    """``disk_map``: the source's disks land on destination nodes of other names and formats (a raw
    journal into a qcow2 volume, a qcow2 data disk into a raw one), and the source's holes and
    written zeros stay unallocated there although the destination's nodes were opened with QEMU's
    default ``discard=ignore``."""
    s0, s1 = make_disk(tmp_path / "s0.raw", 16 * MiB), make_disk(tmp_path / "s1.qcow2", 256 * MiB, "qcow2")
    fill_random(s1, 8 * MiB, "qcow2", offset=4 * MiB, seed=3)
    write_bytes(s1, bytes(16 * MiB), "qcow2", offset=64 * MiB)  # written zeros: allocated on the source
    fill_random(s1, 1 * MiB, "qcow2", offset=200 * MiB, seed=4)
    want_s1 = disk_sha256(s1, "qcow2")
    d0 = make_disk(tmp_path / "new-jrnl.qcow2", 16 * MiB, "qcow2")
    d1 = make_disk(tmp_path / "new-data.raw", 256 * MiB)
    src = vm_factory(disks=[Disk(s0, "raw", node_name="jrnl"), Disk(s1, "qcow2", node_name="data")],
                     cmdline={"hb_ms": 100, "disk_rate": 20}, memory_mib=128, name="src")
    dst = vm_factory(disks=[Disk(d0, "qcow2", node_name="jrnl-new"), Disk(d1, "raw", node_name="data-new")],
                     memory_mib=128, incoming="defer", paused=True, name="dst")
    await asyncio.to_thread(src.wait_acks, 5, 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        plan = await discover_plan(s, ["jrnl"], disk_map={"jrnl": "jrnl-new", "data": "data-new"})
        assert [(x.node_name, x.dest_node) for x in plan.disks] == [("jrnl", "jrnl-new"),
                                                                     ("data", "data-new")]
        wire = MigrationPlan.from_json(plan.to_json())
        assert wire == plan and json.loads(plan.to_json())["version"] == 2
        with pytest.raises(PlanRefused, match="'data' -> 'nope'"):  # refused before anything changes
            wrong = replace(plan.disks[1], target_node="nope")
            await prepare_target(d, replace(plan, disks=(plan.disks[0], wrong)), nbd, mig)
        prepared = await prepare_target(d, wire, nbd, mig)
        assert prepared.holes == {"jrnl-new": "kept", "data-new": "kept"}
        assert await image_paths(d, plan) == [str(d0), str(d1)]
        report = await migrate_source(s, plan, lambda disk: nbd, mig)
        await finish_target(d, prepared=prepared)
        assert report.outcome == "completed"
        assert (await d.query_status()).status == "running"
    last_src = await asyncio.to_thread(verify_continued, src, dst, timeout=60)
    await asyncio.to_thread(dst.stop)
    src.kill()
    verify_journal(str(d0), "qcow2", acked_upto=max(src.serial().max_ack, dst.serial().max_ack),
                   expect_boot_id=last_src.boot_id)
    assert disk_sha256(d1, "raw") == want_s1
    data = 9 * MiB  # what the source holds besides holes and zeros
    assert allocated_bytes(d1) <= data + 1 * MiB, (allocated_bytes(d1), allocated_bytes(s1))
    got, base = allocated_bytes(d0), allocated_bytes(s0)
    assert got <= base * 1.05 + 1 * MiB, (got, base)


@pytest.mark.e2e
async def test_preallocated_destination_keeps_its_allocation(vm_factory, tmp_path):
    """``sparse=False`` (``receive --preallocated``): the destination's nodes are left as configured,
    a preallocated volume stays allocated, and the report says so."""
    s0 = make_disk(tmp_path / "s0.raw", 32 * MiB)
    d0 = tmp_path / "d0.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=falloc", str(d0), "32M"],
                   check=True)
    src = vm_factory(disks=[Disk(s0, "raw")], cmdline={"hb_ms": 100, "disk_rate": 20}, memory_mib=128,
                     name="src")
    dst = vm_factory(disks=[Disk(d0, "raw")], memory_mib=128, incoming="defer", paused=True, name="dst")
    await asyncio.to_thread(src.wait_acks, 3, 60)
    nbd, mig = str(tmp_path / "nbd.sock"), f"unix:{tmp_path / 'mig.sock'}"
    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        plan = await discover_plan(s)
        prepared = await prepare_target(d, plan, nbd, mig, sparse=False)
        assert list(prepared.holes.values()) == ["as configured: preallocated, not reopened"]
        assert (await migrate_source(s, plan, lambda disk: nbd, mig)).outcome == "completed"
        await finish_target(d, prepared=prepared)
    await asyncio.to_thread(dst.stop)
    src.kill()
    assert allocated_bytes(d0) >= 32 * MiB
