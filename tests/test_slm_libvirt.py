"""Storage live migration in place where libvirt owns QEMU: `dataplane storage-migrate --libvirt` with a
real libvirtd. libvirt's own block copy API moves the disk, so its domain XML names the new source,
and no QMP command goes through the monitor passthrough (the domain log has no custom-monitor taint)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_cclm_libvirt import _xml
from test_qmp_libvirt import URI, libvirtd, wait_serial  # noqa: F401 - fixture

from dataplane.testing.journal import parse_serial, verify_journal
from dataplane.testing.vm import make_disk

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@pytest.fixture(params=["transient", "persistent"])
def domain(request, libvirtd, guest, tmp_path):  # noqa: F811 - the fixture imported above
    """A running domain whose guest writes its journal to vda: transient (createXML) or persistent
    (defineXML, then create: what KubeVirt's launcher does)."""
    import libvirt

    conn = libvirt.open(libvirtd)
    jrnl = make_disk(tmp_path / "jrnl.raw", 16 * MiB)
    serial = tmp_path / "serial"
    name = f"dp-slm-{uuid.uuid4().hex[:8]}"
    params = {"hb_ms": 100, "disk": "/dev/vda", "disk_rate": 20}
    xml = _xml(name, guest, [jrnl], serial, params, False)
    if request.param == "persistent":
        dom = conn.defineXML(xml)
        dom.create()
    else:
        dom = conn.createXML(xml, 0)
    try:
        wait_serial(serial, lambda p: p.max_ack >= 3)
        yield {"dom": dom, "jrnl": jrnl, "serial": serial, "name": name,
               "persistent": request.param == "persistent"}
    finally:
        for step in (dom.destroy, dom.undefine):
            try:
                step()
            except libvirt.libvirtError:
                pass
        conn.close()


def _storage_migrate(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dataplane", "storage-migrate", "--libvirt", URI, "--domain",
                           name, "--output", "json", *extra], capture_output=True, text=True, timeout=300)


def _source(dom, flags: int = 0) -> str:
    import xml.etree.ElementTree as ET

    disk = ET.fromstring(dom.XMLDesc(flags)).find("./devices/disk/source")
    assert disk is not None
    return disk.get("file") or disk.get("dev") or ""


def _format(dom, flags: int = 0) -> str:
    import xml.etree.ElementTree as ET

    driver = ET.fromstring(dom.XMLDesc(flags)).find("./devices/disk/driver")
    assert driver is not None
    return driver.get("type") or ""


def test_storage_migrate_through_libvirt(domain, tmp_path):
    dom, new = domain["dom"], tmp_path / "new.qcow2"
    out = _storage_migrate(domain["name"], "--disk", f"vda={new}", "--format", "qcow2")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["outcome"] == "completed" and report["disks"][0]["file"] == str(new), report
    assert _source(dom) == str(new)  # libvirt knows the new disk
    log = Path(f"/var/log/libvirt/qemu/{domain['name']}.log").read_text(errors="replace")
    assert "custom-monitor" not in log, log[-2000:]
    n = parse_serial(domain["serial"].read_text()).max_ack
    after = wait_serial(domain["serial"], lambda p: p.max_ack >= n + 10)  # the journal goes on
    dom.destroy()
    verify_journal(str(new), "qcow2", acked_upto=after.max_ack)
    # a persistent domain's copy is a transient job; libvirt still rewrites the definition's disk at
    # the pivot, so the next boot runs on the new disk, not on the one the guest left
    if domain["persistent"]:
        import libvirt

        assert _source(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == str(new)
        assert _format(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == "qcow2"
        dom.create()
        assert _source(dom) == str(new) and _format(dom) == "qcow2"
        assert dom.isActive()


def test_storage_migrate_through_libvirt_rolls_back(domain, tmp_path):
    """A copy capped far below what it needs within --timeout: rolled back, the domain on its old disk,
    no block job left, the target named."""
    dom, new = domain["dom"], tmp_path / "slow.raw"
    out = _storage_migrate(domain["name"], "--disk", f"vda={new}", "--bandwidth", "64KiB/s", "--timeout", "2")
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["outcome"] == "rolled-back"
    assert "did not converge within 2 s" in out.stderr and str(new) in out.stderr
    assert _source(dom) == str(domain["jrnl"])
    assert dom.blockJobInfo("vda", 0) == {}
    n = parse_serial(domain["serial"].read_text()).max_ack
    wait_serial(domain["serial"], lambda p: p.max_ack >= n + 5)
    refused = _storage_migrate(domain["name"], "--disk", f"vda={new}")  # the kept target exists
    assert refused.returncode == 1 and "exists; give --reuse" in refused.stderr


async def test_bandwidth_changed_live_through_libvirt(domain, tmp_path):
    """A copy capped at 64 KiB/s, uncapped live (virDomainBlockJobSetSpeed): it completes."""
    from dataplane.migration.slm import DiskMove, SlmControl, SlmOptions
    from dataplane.migration.slm_libvirt import storage_migrate_libvirt
    from dataplane.storage.targets import parse_target
    from qmp_driver.libvirt_blockcopy import LibvirtDomainDisks

    new = tmp_path / "fast.raw"
    control = SlmControl()
    events: list[dict] = []

    def on_event(event: dict) -> None:
        events.append(event)
        if event["event"] == "progress" and control.bandwidth is None:
            control.set_bandwidth(0)

    lv = await LibvirtDomainDisks.open(URI, domain["name"])
    try:
        report = await storage_migrate_libvirt(lv, [DiskMove("vda", parse_target(str(new)))],
                                               SlmOptions(bandwidth=64 * 1024, timeout=120),
                                               on_event=on_event, control=control)
    finally:
        await lv.close()
    assert report.outcome == "completed"
    assert [e["bandwidth"] for e in events if e["event"] == "bandwidth"] == [0]
    assert _source(domain["dom"]) == str(new)


def test_kill_9_of_the_daemon_during_a_block_copy_through_libvirt(domain, tmp_path):
    """The daemon killed while libvirt's block copy runs (libvirt goes on copying: its job, not the
    daemon's); restarted on the same state directory, it cancels the copy: the domain's disk stays on
    its source (libvirt's XML says so), no block job left, the guest goes on writing."""
    import signal
    import time

    from test_daemon_crash import call, ready, serve, until

    state, log = tmp_path / "state", tmp_path / "serve.log"
    sock = Path(f"/tmp/dpl-{uuid.uuid4().hex[:8]}.sock")
    daemon = serve(sock, state, log)
    try:
        job = call(sock, "POST", "/v1/storage-migrations", {
            "libvirt": {"uri": URI, "domain": domain["name"]}, "bandwidth": 64 * 1024,
            "disks": [{"disk": "vda", "target": str(tmp_path / "new.raw")}]})
        until("libvirt's block copy running", lambda: domain["dom"].blockJobInfo("vda", 0))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        time.sleep(0.5)
        assert domain["dom"].blockJobInfo("vda", 0), "the copy should go on without the daemon"
        daemon = serve(sock, state, log)
        until("the daemon ready", lambda: ready(sock))
        got = call(sock, "GET", f"/v1/storage-migrations/{job['id']}")
        assert got["state"] == "rolled-back", got
        assert any("block copy of disk vda cancelled" in a for a in got["report"]["actions"]), got
        until("no block job", lambda: not domain["dom"].blockJobInfo("vda", 0), 30)
        assert _source(domain["dom"]) == str(domain["jrnl"])
        n = parse_serial(domain["serial"].read_text(errors="replace")).max_ack
        wait_serial(domain["serial"], lambda p: p.max_ack >= n + 3)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log.read_text()
    finally:
        daemon.kill()
        daemon.wait(10)
        sock.unlink(missing_ok=True)
