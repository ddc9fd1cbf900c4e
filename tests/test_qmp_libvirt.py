"""qmp_driver through a real libvirtd (the KubeVirt launcher-pod transport).

libvirtd and virtlogd are started by ``.ci/run`` (scripts/services.sh), or by
the ``libvirtd`` fixture when they are not running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from dataplane.testing.guest import kernel_cmdline
from dataplane.testing.journal import parse_serial
from dataplane.testing.vm import make_disk
from qmp_driver import CommandError, ConnectionLost, DomainNotFound, QemuDriver, match

pytestmark = pytest.mark.e2e

URI = "qemu:///system"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def libvirtd():
    """Make sure libvirtd answers on qemu:///system."""
    libvirt = pytest.importorskip("libvirt")
    if not Path("/var/run/libvirt/libvirt-sock").exists():
        if os.geteuid() != 0:
            pytest.skip("libvirtd is not running and we are not root to start it")
        subprocess.run(["bash", str(REPO / "scripts/services.sh")], check=True, timeout=60)
    conn = libvirt.open(URI)
    conn.close()
    return URI


def domain_xml(name: str, guest, disk: Path, serial: Path, params: dict[str, object]) -> str:
    accel = os.environ.get("DATAPLANE_ACCEL", "tcg")
    dtype = "kvm" if accel == "kvm" else "qemu"
    return f"""
<domain type='{dtype}'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel>
    <initrd>{guest.initrd}</initrd>
    <cmdline>{escape(kernel_cmdline(params))}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{serial}'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""


@pytest.fixture
def domain(libvirtd, guest, tmp_path):
    """A transient TCG domain running the test guest with one raw journal disk."""
    import libvirt

    disk = tmp_path / "vda.raw"
    make_disk(disk, 32 << 20, "raw")
    serial = tmp_path / "serial.log"
    name = f"dp-test-{uuid.uuid4().hex[:8]}"
    conn = libvirt.open(libvirtd)
    dom = conn.createXML(domain_xml(name, guest, disk, serial, {"hb_ms": 100, "disk_rate": 10}), 0)
    try:
        yield {"name": name, "uuid": dom.UUIDString(), "serial": serial, "disk": disk, "dom": dom,
               "pid": int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())}
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
        conn.close()


def wait_serial(path: Path, pred, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        parsed = parse_serial(text)
        if pred(parsed):
            return parsed
        time.sleep(0.1)
    raise AssertionError(f"serial condition not met within {timeout}s; tail:\n{text[-2000:]}")


async def test_status_events_and_heartbeat(domain):
    await asyncio.to_thread(wait_serial, domain["serial"], lambda p: len(p.heartbeats) >= 2)
    async with await QemuDriver.connect_libvirt(URI, domain["name"]) as drv:
        assert drv.version.at_least(7, 2)
        assert (await drv.query_status()).status == "running"
        _, ev = await drv.execute_and_wait("stop", None, match("STOP"), timeout=20)
        assert ev.name == "STOP" and not (await drv.query_status()).running
        _, ev = await drv.execute_and_wait("cont", None, match("RESUME"), timeout=20)
        assert (await drv.query_status()).running
    # also by UUID
    async with await QemuDriver.connect_libvirt(URI, domain["uuid"]) as drv:
        assert (await drv.query_status()).status == "running"
    n = len(parse_serial(domain["serial"].read_text()).heartbeats)
    await asyncio.to_thread(wait_serial, domain["serial"], lambda p: len(p.heartbeats) >= n + 3)


async def test_blockdev_add_and_mirror_to_ready(domain, tmp_path):
    target = tmp_path / "mirror.raw"
    make_disk(target, 32 << 20, "raw")
    async with await QemuDriver.connect_libvirt(URI, domain["name"]) as drv:
        devs = await drv.query_block()
        assert len(devs) == 1 and devs[0].node_name, devs
        src_node = devs[0].node_name  # libvirt names its nodes (libvirt-N-format)
        await drv.blockdev_add({"driver": "file", "filename": str(target), "node-name": "dp-t-file"})
        await drv.blockdev_add({"driver": "raw", "file": "dp-t-file", "node-name": "dp-t"})
        assert "dp-t" in {n.node_name for n in await drv.query_named_block_nodes()}
        with drv.expect(match("BLOCK_JOB_READY", device="dp-m0")) as ready:
            await drv.blockdev_mirror("dp-m0", src_node, "dp-t", sync="full")
            ev = await ready.wait(timeout=120)
        assert ev.data["len"] == 32 << 20
        await drv.stop()
        with drv.expect(match("BLOCK_JOB_COMPLETED", device="dp-m0")) as done:
            await drv.block_job_cancel("dp-m0")  # not forced: target is a point-in-time copy
            await done.wait(timeout=30)
        r = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(domain["disk"]),
                            str(target)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        await drv.blockdev_del("dp-t")
        await drv.blockdev_del("dp-t-file")
        with pytest.raises(CommandError) as ei:
            await drv.blockdev_del("dp-t")
        assert ei.value.error_class == "GenericError"
        await drv.cont()


async def test_unknown_domain(libvirtd):
    with pytest.raises(DomainNotFound, match="no domain 'dp-no-such-domain'"):
        await QemuDriver.connect_libvirt(URI, "dp-no-such-domain", timeout=10)


async def test_qemu_killed_wakes_waiters(domain):
    async with await QemuDriver.connect_libvirt(URI, domain["name"]) as drv:
        waiters = [asyncio.create_task(drv.wait_event(match("BLOCK_JOB_READY", device="x"), timeout=60)),
                   asyncio.create_task(drv.wait_migration("completed", timeout=60)),
                   asyncio.create_task(drv.wait_event(match("RESUME"), timeout=60))]
        await asyncio.sleep(0.3)
        os.kill(domain["pid"], signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), timeout=15)
        assert all(isinstance(r, ConnectionLost) for r in results), results
        with pytest.raises(ConnectionLost):
            await drv.query_status()


async def test_taint_is_recorded(domain):
    """Documented behaviour: libvirt taints domains driven by monitor passthrough."""
    async with await QemuDriver.connect_libvirt(URI, domain["name"]) as drv:
        await drv.query_status()
    log = Path(f"/var/log/libvirt/qemu/{domain['name']}.log").read_text(errors="replace")
    assert "custom-monitor" in log
