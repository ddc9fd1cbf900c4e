"""qmp_driver over a QMP unix socket, against real QEMU processes (TCG)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dataplane.testing.vm import Disk, make_disk, verify_continued
from qmp_driver import (
    Action,
    CommandError,
    ConnectFailed,
    ConnectionLost,
    DriverTimeout,
    QemuDriver,
    Unsupported,
    match,
)

pytestmark = pytest.mark.e2e


async def hmp(drv: QemuDriver, line: str) -> str:
    return await drv.execute("human-monitor-command", {"command-line": line})


async def qemu_io(drv: QemuDriver, node: str, cmd: str) -> None:
    out = await hmp(drv, f'qemu-io {node} "{cmd}"')
    assert out == "", out  # HMP qemu-io returns only errors


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def paused_vm(vm_factory, tmp_path):
    """A QEMU started with -S, one 16 MiB raw guest disk (node ``disk0``) and a
    16 MiB raw node ``scratch`` attached to no device, which HMP ``qemu-io``
    may write (the guest device holds disk0's write permission exclusively)."""
    disk = tmp_path / "d0.raw"
    make_disk(disk, 16 << 20, "raw")
    scratch = tmp_path / "scratch.raw"
    make_disk(scratch, 16 << 20, "raw")
    vm = vm_factory(disks=[Disk(str(disk), "raw")], paused=True, memory_mib=128)
    drv = await QemuDriver.connect_socket(vm.qmp_path)
    await drv.blockdev_add({"driver": "file", "filename": str(scratch), "node-name": "scratch-file"})
    await drv.blockdev_add({"driver": "raw", "file": "scratch-file", "node-name": "scratch"})
    vm.scratch_path = scratch
    yield vm, drv
    await drv.close()


# --------------------------------------------------------------- discovery


async def test_discovery(paused_vm):
    _vm, drv = paused_vm
    assert drv.version.at_least(7, 2), drv.version
    for cmd in ("blockdev-mirror", "drive-mirror", "block-export-add", "migrate", "transaction", "getfd"):
        assert drv.supports(cmd), cmd
    assert {"events", "pause-before-switchover", "late-block-activate"} <= drv.migration_capabilities
    with pytest.raises(Unsupported, match=rf"unsupported by this QEMU \({drv.version}\)"):
        await drv.execute("x-no-such-command")


async def test_unsupported_capability_is_clear(paused_vm):
    _vm, drv = paused_vm
    with pytest.raises(Unsupported, match="no-such-cap"):
        await drv.migrate_set_capabilities({"no-such-cap": True})


# --------------------------------------------------------------- run state


async def test_stop_cont_with_events_and_heartbeat(vm_factory):
    vm = vm_factory(cmdline={"hb_ms": 100})
    vm.wait_heartbeat(count=2, timeout=60)
    async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
        assert (await drv.query_status()).status == "running"
        _, ev = await drv.execute_and_wait("stop", None, match("STOP"), timeout=10)
        assert ev.name == "STOP"
        st = await drv.query_status()
        assert (st.status, st.running) == ("paused", False)
        n = len(vm.heartbeats())
        await asyncio.sleep(1.0)
        assert len(vm.heartbeats()) <= n + 1, "guest kept running while stopped"
        _, ev = await drv.execute_and_wait("cont", None, match("RESUME"), timeout=10)
        assert (await drv.query_status()).running
        await asyncio.to_thread(vm.wait_heartbeat, n + 3, 60)
        await drv.quit()
    assert vm.wait_exit(10) is not None


# ------------------------------------------------------------- block graph


async def test_blockdev_add_query_del(paused_vm, tmp_path):
    _vm, drv = paused_vm
    target = tmp_path / "t.qcow2"
    make_disk(target, 16 << 20, "qcow2")
    await drv.blockdev_add({"driver": "file", "filename": str(target), "node-name": "t-file"})
    await drv.blockdev_add({"driver": "qcow2", "file": "t-file", "node-name": "t"})
    nodes = {n.node_name: n for n in await drv.query_named_block_nodes()}
    assert nodes["t"].driver == "qcow2" and nodes["t"].virtual_size == 16 << 20
    assert nodes["disk0"].driver == "raw"
    devs = await drv.query_block()
    assert [d.node_name for d in devs] == ["disk0"]
    with pytest.raises(CommandError) as ei:
        await drv.blockdev_add({"driver": "raw", "file": "missing-node", "node-name": "bad"})
    assert ei.value.error_class == "GenericError" and "missing-node" in ei.value.description
    await drv.blockdev_del("t")
    await drv.blockdev_del("t-file")
    assert "t" not in {n.node_name for n in await drv.query_named_block_nodes()}
    with pytest.raises(KeyError):
        await drv.node("t")


# --------------------------------------------------------------- mirroring


async def test_blockdev_mirror_ready_then_pivot(vm_factory, tmp_path):
    """Mirror a live guest's journal disk, pivot, and prove the target holds every acked write."""
    src = tmp_path / "src.raw"
    dst = tmp_path / "dst.qcow2"
    make_disk(src, 32 << 20, "raw")
    make_disk(dst, 32 << 20, "qcow2")
    vm = vm_factory(disks=[Disk(str(src), "raw")], cmdline={"hb_ms": 200, "disk_rate": 20})
    vm.wait_for_serial(r"ACK 5\b", timeout=60)
    async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
        await drv.blockdev_add({"driver": "file", "filename": str(dst), "node-name": "dst-file"})
        await drv.blockdev_add({"driver": "qcow2", "file": "dst-file", "node-name": "dst"})
        with drv.expect(match("BLOCK_JOB_READY", device="m0")) as ready:
            await drv.blockdev_mirror("m0", "disk0", "dst", sync="full", granularity=65536,
                                      buf_size=1 << 20, copy_mode="write-blocking", speed=0)
            await ready.wait(timeout=120)
        jobs = await drv.query_block_jobs()
        assert [(j.device, j.type, j.ready) for j in jobs] == [("m0", "mirror", True)]
        await drv.block_job_set_speed("m0", 0)
        assert any(j.id == "m0" and j.status == "ready" for j in await drv.query_jobs())
        with drv.expect(match("BLOCK_JOB_COMPLETED", device="m0")) as done:
            await drv.job_complete("m0")
            ev = await done.wait(timeout=60)
        assert "error" not in ev.data
        assert [d.node_name for d in await drv.query_block()] == ["dst"]
        # The guest keeps writing to the new disk after the pivot.
        await asyncio.to_thread(vm.wait_acks, vm.serial().max_ack + 5, 60)
        await drv.stop()
        last = vm.serial().max_ack
    vm.kill()
    from dataplane.testing.journal import verify_journal

    report = verify_journal(str(dst), fmt="qcow2", acked_upto=last)
    assert report.last_seq >= last


async def test_drive_mirror_cancel_leaves_point_in_time_copy(paused_vm, tmp_path):
    _vm, drv = paused_vm
    await qemu_io(drv, "scratch", "write -P 0x5a 0 1M")
    await qemu_io(drv, "scratch", "write -P 0xa5 8M 512k")
    target = tmp_path / "copy.raw"
    make_disk(target, 16 << 20, "raw")
    await drv.drive_mirror("dm", "scratch", str(target), sync="full", format="raw", mode="existing",
                           auto_dismiss=False, auto_finalize=True)
    await drv.wait_job_ready("dm", timeout=60)
    with drv.expect(match("JOB_STATUS_CHANGE", id="dm", status="concluded")) as concluded:
        await drv.block_job_cancel("dm", force=False)
        await concluded.wait(timeout=30)
    await drv.job_dismiss("dm")
    assert await drv.query_jobs() == []
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(_vm.scratch_path),
                        str(target)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_manual_finalize_and_force_cancel(paused_vm, tmp_path):
    _vm, drv = paused_vm
    target = tmp_path / "t.raw"
    make_disk(target, 16 << 20, "raw")
    await drv.blockdev_add({"driver": "file", "filename": str(target), "node-name": "t-file"})
    await drv.blockdev_add({"driver": "raw", "file": "t-file", "node-name": "t"})
    await drv.blockdev_mirror("m1", "disk0", "t", auto_finalize=False, auto_dismiss=False)
    await drv.wait_job_ready("m1", timeout=60)
    await drv.job_complete("m1")
    await drv.wait_job_status("m1", "pending", timeout=30)
    await drv.job_finalize("m1")
    await drv.wait_job_status("m1", "concluded", timeout=30)
    await drv.job_dismiss("m1")
    assert [d.node_name for d in await drv.query_block()] == ["t"]
    # Now mirror back and abandon it with a forced cancel (job-cancel).
    await drv.blockdev_mirror("m2", "t", "disk0")
    await drv.wait_job_ready("m2", timeout=60)
    with drv.expect(match("BLOCK_JOB_CANCELLED", device="m2")) as cancelled:
        await drv.job_cancel("m2")
        await cancelled.wait(timeout=30)


# ----------------------------------------------------------- dirty bitmaps


async def test_bitmaps_in_one_transaction(paused_vm):
    _vm, drv = paused_vm
    await drv.transaction([Action.bitmap_add("scratch", "b1", granularity=65536),
                           Action.bitmap_add("scratch", "b2", granularity=65536)])
    await qemu_io(drv, "scratch", "write 0 128k")  # 2 clusters in both
    await drv.bitmap_disable("scratch", "b1")
    await qemu_io(drv, "scratch", "write 1M 64k")  # 1 cluster, b2 only
    counts = {b["name"]: b["count"] for b in await drv.query_bitmaps("scratch")}
    assert counts == {"b1": 128 << 10, "b2": 192 << 10}
    # merge + clear + add together, atomically
    await drv.transaction([Action.bitmap_merge("scratch", "b1", ["b2"]), Action.bitmap_clear("scratch", "b2"),
                           Action.bitmap_add("scratch", "b3")])
    bm = {b["name"]: b for b in await drv.query_bitmaps("scratch")}
    assert bm["b1"]["count"] == 192 << 10 and bm["b2"]["count"] == 0 and bm["b3"]["count"] == 0
    assert bm["b1"]["recording"] is False
    # a failing action rolls the whole transaction back
    with pytest.raises(CommandError):
        await drv.transaction([Action.bitmap_clear("scratch", "b1"),
                               Action.bitmap_merge("scratch", "b1", ["nope"])])
    assert {b["name"]: b["count"] for b in await drv.query_bitmaps("scratch")}["b1"] == 192 << 10
    await drv.bitmap_enable("scratch", "b1")
    await drv.bitmap_clear("scratch", "b1")
    await drv.bitmap_merge("scratch", "b3", ["b1"])
    for name in ("b1", "b2", "b3"):
        await drv.bitmap_remove("scratch", name)
    assert await drv.query_bitmaps("scratch") == []


# --------------------------------------------------------------------- NBD


async def test_nbd_export_read_back(paused_vm, tmp_path):
    vm, drv = paused_vm
    await qemu_io(drv, "scratch", "write -P 0x33 0 2M")
    await qemu_io(drv, "scratch", "write -P 0x44 12M 1M")
    sock = tmp_path / "nbd.sock"
    await drv.nbd_server_start(str(sock))
    await drv.block_export_add("exp0", "scratch", writable=False)
    assert [(e.id, e.node_name) for e in await drv.query_block_exports()] == [("exp0", "scratch")]
    out = tmp_path / "read.raw"
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        f"nbd+unix:///exp0?socket={sock}", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sha256(out) == sha256(vm.scratch_path)
    await drv.block_export_del("exp0")
    await drv.nbd_server_stop()


async def test_nbd_export_falls_back_to_nbd_server_add(paused_vm, tmp_path):
    """Simulates an older QEMU by hiding block-export-add from discovery (the
    command set is real; only its absence is pretended)."""
    vm, drv = paused_vm
    drv.commands = drv.commands - {"block-export-add", "block-export-del"}
    sock = tmp_path / "nbd.sock"
    await drv.nbd_server_start({"type": "unix", "path": str(sock)})
    await drv.block_export_add("legacy", "scratch", writable=False)
    r = subprocess.run(["qemu-img", "info", "--output=json", f"nbd+unix:///legacy?socket={sock}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and '"virtual-size": 16777216' in r.stdout, r.stdout + r.stderr
    await drv.block_export_del("legacy")
    await drv.nbd_server_stop()


# --------------------------------------------------------------- migration


async def _migrate_pair(vm_factory, tmp_path, use_fd: bool) -> None:
    src = vm_factory(cmdline={"hb_ms": 100}, memory_mib=128)
    dst = vm_factory(memory_mib=128, incoming="defer", paused=True)
    src.wait_heartbeat(count=2, timeout=60)
    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        for drv in (s, d):
            await drv.migrate_set_capabilities({"events": True})
        await d.migrate_set_capabilities({"late-block-activate": True})
        await s.migrate_set_capabilities({"pause-before-switchover": True})
        await s.migrate_set_parameters({"max-bandwidth": 1 << 30, "downtime-limit": 300})
        params = await s.query_migrate_parameters()
        assert params["max-bandwidth"] == 1 << 30 and params["downtime-limit"] == 300
        caps = await s.query_migrate_capabilities()
        assert caps["pause-before-switchover"] and caps["events"]
        mig = tmp_path / "mig.sock"
        await d.migrate_incoming(f"unix:{mig}")
        with s.expect(match("MIGRATION", status="pre-switchover")) as pre:
            if use_fd:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(str(mig))
                await s.getfd("migfd", conn.fileno())
                conn.close()  # QEMU holds its own copy now
                await s.migrate("fd:migfd")
            else:
                await s.migrate(f"unix:{mig}")
            await pre.wait(timeout=120)
        info = await s.query_migrate()
        assert info.status == "pre-switchover" and info.ram.transferred > 0
        await s.migrate_continue("pre-switchover")
        assert await s.wait_migration("completed", timeout=60) == "completed"
        assert await d.wait_migration({"completed"}, timeout=60) == "completed"
        assert (await s.query_status()).status == "postmigrate"
        _, ev = await d.execute_and_wait("cont", None, match("RESUME"), timeout=10)
    # the same guest runs on: heartbeat continues, same boot id, every RAM page verified, no kernel fault
    await asyncio.to_thread(verify_continued, src, dst, timeout=60)


async def test_local_migration_unix_socket(vm_factory, tmp_path):
    await _migrate_pair(vm_factory, tmp_path, use_fd=False)


async def test_local_migration_over_passed_fd(vm_factory, tmp_path):
    await _migrate_pair(vm_factory, tmp_path, use_fd=True)


async def test_migrate_cancel_keeps_source_running(vm_factory, tmp_path):
    src = vm_factory(cmdline={"hb_ms": 100, "dirty_mib": 64, "dirty_rate": 50, "pattern": "random"})
    dst = vm_factory(incoming="defer", paused=True)
    src.wait_heartbeat(count=2, timeout=60)
    async with await QemuDriver.connect_socket(src.qmp_path) as s, \
            await QemuDriver.connect_socket(dst.qmp_path) as d:
        await s.migrate_set_capabilities({"events": True})
        await s.migrate_set_parameters({"max-bandwidth": 4 << 20})  # too slow to finish
        await d.migrate_incoming(f"unix:{tmp_path / 'm.sock'}")
        await s.migrate(f"unix:{tmp_path / 'm.sock'}")
        await s.wait_migration("active", timeout=30)
        await s.migrate_cancel()
        assert await s.wait_migration("cancelled", timeout=30) == "cancelled"
        assert (await s.query_status()).status == "running"
    n = len(src.heartbeats())
    await asyncio.to_thread(src.wait_heartbeat, n + 3, 60)


# ----------------------------------------------------- events: races, death


async def test_event_right_after_reply_is_never_lost(paused_vm, tmp_path):
    """A mirror of a tiny disk is READY a moment after blockdev-mirror returns."""
    _vm, drv = paused_vm
    tiny = tmp_path / "tiny.raw"
    make_disk(tiny, 64 << 10, "raw")
    await drv.blockdev_add({"driver": "file", "filename": str(tiny), "node-name": "tiny-f"})
    await drv.blockdev_add({"driver": "raw", "file": "tiny-f", "node-name": "tiny"})
    for i in range(20):
        target = tmp_path / f"t{i}.raw"
        make_disk(target, 64 << 10, "raw")
        await drv.blockdev_add({"driver": "file", "filename": str(target), "node-name": f"t{i}"})
        _, ev = await drv.execute_and_wait(
            "blockdev-mirror", {"job-id": f"j{i}", "device": "tiny", "target": f"t{i}", "sync": "full"},
            match("BLOCK_JOB_READY", device=f"j{i}"), timeout=10)
        assert ev.data["len"] == 64 << 10
        with drv.expect(match("BLOCK_JOB_COMPLETED", device=f"j{i}")) as done:
            await drv.block_job_cancel(f"j{i}")
            await done.wait(timeout=10)
        await drv.blockdev_del(f"t{i}")


async def test_sigkill_wakes_every_waiter_at_once(paused_vm):
    vm, drv = paused_vm
    waiters = [
        asyncio.create_task(drv.wait_event(match("BLOCK_JOB_READY", device="never"), timeout=60)),
        asyncio.create_task(drv.wait_migration("completed", timeout=60)),
        asyncio.create_task(drv.wait_event(match("RESUME"), timeout=60)),
    ]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in waiters)
    t0 = time.monotonic()
    os.kill(vm.pid, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), timeout=5)
    elapsed = time.monotonic() - t0
    assert all(isinstance(r, ConnectionLost) for r in results), results
    assert elapsed < 3, elapsed
    with pytest.raises(ConnectionLost):
        await drv.query_status()
    with pytest.raises(ConnectionLost):
        await drv.wait_event(match("STOP"), timeout=5)


async def test_wait_timeout_is_distinct(paused_vm):
    _vm, drv = paused_vm
    with pytest.raises(DriverTimeout):
        await drv.wait_event(match("NEVER_HAPPENS"), timeout=0.2)
    assert (await drv.query_status()).status == "prelaunch"  # still usable


# --------------------------------------------------------------- bad input


async def test_qmp_error_carries_class_and_redacts_secrets(paused_vm):
    _vm, drv = paused_vm
    with pytest.raises(CommandError) as ei:
        await drv.execute("set_password", {"protocol": "vnc", "password": "hunter2"})
    err = ei.value
    assert err.command == "set_password" and err.error_class == "GenericError" and err.description
    assert err.arguments["password"] == "<redacted>"
    assert "hunter2" not in str(err) and "hunter2" not in repr(err.arguments)
    with pytest.raises(CommandError) as ei:
        await drv.execute("query-cpus-fast", {"bogus": 1})
    assert ei.value.error_class == "GenericError"


async def test_socket_path_missing(tmp_path):
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await QemuDriver.connect_socket(str(tmp_path / "nothing.sock"), timeout=2)


async def read_json(r: asyncio.StreamReader) -> dict | None:
    """Read one JSON object (QMP clients need not end messages with a newline)."""
    buf = b""
    while chunk := await r.read(65536):
        buf += chunk
        try:
            return json.loads(buf)
        except ValueError:
            continue
    return None


class FakeQmpServer:
    """A fake QMP server: only to produce protocol faults QEMU itself never emits
    (garbage, silence, oversized replies). Named as a fake on purpose."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path, self.mode = path, mode
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeQmpServer:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            if self.mode == "garbage":
                w.write(os.urandom(4096) + b"\n")
            elif self.mode == "silent":
                await asyncio.sleep(30)
            else:
                w.write(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, '
                        b'"package": ""}, "capabilities": []}}\r\n')
                await w.drain()
                req = await read_json(r)  # qmp_capabilities
                reply = {"return": {}} | ({"id": req["id"]} if "id" in req else {})
                w.write(json.dumps(reply).encode() + b"\r\n")
                await w.drain()
                while await read_json(r) is not None:
                    if self.mode == "garbage-reply":
                        w.write(b"\x00\xff{{{ not json ]]]\r\n")
                    elif self.mode == "huge-reply":
                        w.write(b'{"return": "' + b"A" * (24 << 20) + b'"}\r\n')
                    await w.drain()
            await w.drain()
            await asyncio.sleep(5)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()


@pytest.mark.parametrize("mode,exc", [("garbage", ConnectFailed), ("silent", DriverTimeout)])
async def test_not_a_qmp_server(tmp_path, mode, exc):
    async with FakeQmpServer(tmp_path / "f.sock", mode):
        t0 = time.monotonic()
        with pytest.raises(exc):
            await QemuDriver.connect_socket(str(tmp_path / "f.sock"), timeout=2)
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("mode", ["garbage-reply", "huge-reply"])
async def test_bad_reply_mid_session_is_connection_lost(tmp_path, mode):
    async with FakeQmpServer(tmp_path / "f.sock", mode):
        from qmp_driver import SocketTransport

        tr = await SocketTransport.connect(str(tmp_path / "f.sock"), timeout=5)
        waiter = asyncio.create_task(tr.hub.subscribe(match("STOP")).wait(30))
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            await tr.execute("query-version", timeout=20)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - t0 < 10
        await tr.close()


def test_qemu_closing_its_socket_is_logged_at_info_not_error(caplog):
    """QEMU exits (a destination whose incoming migration was cancelled): qemu.qmp's reader error is
    an expected event, logged at INFO; other reader errors stay errors."""
    import logging

    from qmp_driver.socket_transport import SocketTransport

    logger = SocketTransport("/nonexistent/qmp.sock")._client.logger
    with caplog.at_level(logging.INFO):
        logger.error("%s: %s", "Task.Reader", "ConnectionResetError: [Errno 104] Connection reset by peer")
        logger.error("Task.Reader: ValueError: garbage")
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert levels == [("INFO", "QEMU closed its QMP socket ([Errno 104] Connection reset by peer)"),
                      ("ERROR", "Task.Reader: ValueError: garbage")]
