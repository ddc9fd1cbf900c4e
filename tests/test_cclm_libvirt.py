"""CCLM where libvirt owns both QEMUs (as in KubeVirt's launcher pods): `dataplane migrate --libvirt` and
`dataplane receive --libvirt` across two namespaces, with a real libvirtd.

The destination domain is started paused with ``-incoming defer`` passed through
``<qemu:commandline>`` — what a launcher pod's domain looks like before the migration arrives.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from cclm_support import Clusters
from test_qmp_libvirt import URI, libvirtd, wait_serial  # noqa: F401 - fixture

from dataplane.testing.guest import kernel_cmdline
from dataplane.testing.journal import parse_serial, verify_journal
from dataplane.testing.vm import fill_random, images_identical, make_disk

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def _xml(name: str, guest, disks: list[Path], serial: Path, params: dict[str, object] | None,
         incoming: bool) -> str:
    devs = "".join(f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{d}'/>
      <target dev='vd{chr(ord("a") + i)}' bus='virtio'/>
    </disk>""" for i, d in enumerate(disks))
    extra = ("<qemu:commandline><qemu:arg value='-incoming'/><qemu:arg value='defer'/></qemu:commandline>"
             if incoming else "")
    return f"""
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest.kernel}</kernel>
    <initrd>{guest.initrd}</initrd>
    <cmdline>{escape(kernel_cmdline(params or {}))}</cmdline>
  </os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{devs}
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <console type='file'><source path='{serial}'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  {extra}
</domain>"""


@pytest.fixture
def domains(libvirtd, guest, tmp_path):  # noqa: F811 - the fixture imported above
    import libvirt

    conn = libvirt.open(libvirtd)
    made = []
    tag = uuid.uuid4().hex[:8]
    paths = {k: make_disk(tmp_path / f"{k}.raw", 32 * MiB) for k in ("s0", "s1", "d0", "d1")}
    fill_random(paths["s1"], 8 * MiB, "raw", offset=MiB, seed=5)
    serial = {"src": tmp_path / "src.serial", "dst": tmp_path / "dst.serial"}
    try:
        src = conn.createXML(_xml(f"dp-cclm-src-{tag}", guest, [paths["s0"], paths["s1"]], serial["src"],
                                  {"hb_ms": 100, "disk": "/dev/vda", "disk_rate": 10}, False), 0)
        made.append(src)
        dst = conn.createXML(_xml(f"dp-cclm-dst-{tag}", guest, [paths["d0"], paths["d1"]], serial["dst"],
                                  None, True), libvirt.VIR_DOMAIN_START_PAUSED)
        made.append(dst)
        yield {"src": src, "dst": dst, "paths": paths, "serial": serial}
    finally:
        for dom in made:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
        conn.close()


def test_cclm_between_libvirt_domains(domains, link_factory, tmp_path):
    import libvirt

    src, dst = domains["src"], domains["dst"]
    wait_serial(domains["serial"]["src"], lambda p: p.max_ack >= 3)
    cl = Clusters(link_factory("1gbit"), tmp_path)
    rcv, port = cl.receive_argv(["--libvirt", URI, "--domain", dst.name()])
    mig = cl.migrate_argv(["--libvirt", URI, "--domain", src.name()], port)
    assert mig.wait(120) == 0, mig.stderr()[-3000:]
    assert rcv.wait() == 0, rcv.stderr()[-3000:]
    rep = mig.report()
    assert rep["outcome"] == "completed" and rep["destination"] == "running"
    assert dst.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # libvirt saw the guest resume
    assert src.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    before = parse_serial(domains["serial"]["src"].read_text())
    last = before.heartbeats[-1]
    # heartbeats, and three passes of the guest's RAM checker on the destination (or a problem): one
    # of them ran there from start to end
    after = wait_serial(domains["serial"]["dst"],
                        lambda p: p.problems() or len(p.ram_passes) >= 3
                        and len([h for h in p.heartbeats if h.counter > last.counter]) >= 3)
    assert not before.problems() and not after.problems(), before.problems() + after.problems()
    assert {h.boot_id for h in after.heartbeats} == {last.boot_id}, "the guest rebooted"
    dst.destroy()
    src.destroy()
    acked = max(before.max_ack, after.max_ack)
    verify_journal(str(domains["paths"]["d0"]), "raw", acked_upto=acked, expect_boot_id=last.boot_id)
    assert images_identical(domains["paths"]["s1"], domains["paths"]["d1"], "raw", "raw")
    cl.assert_workdirs_clean()
