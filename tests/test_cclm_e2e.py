"""Cross-cluster live migration end to end: `dataplane receive` in namespace B, `dataplane migrate` in
namespace A, joined by a tbf-limited veth; real QEMUs (TCG) with the test guest; two CAs.

Every test asserts an outcome: the guest's heartbeat continuing on the destination with the same
boot id, its journal verifying, disks identical, or, for a failure, the source still running on
untouched disks with nothing of the migration left on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from cclm_support import Clusters, MiB, Role, continues_on, make_vms, source_intact

from dataplane.testing.journal import verify_journal
from dataplane.testing.vm import (
    Disk,
    QemuVM,
    allocated_bytes,
    disk_sha256,
    fill_random,
    images_identical,
    make_disk,
)

pytestmark = pytest.mark.e2e


# ------------------------------------------------------------------------------------ happy paths


def test_two_disks_raw_qcow2_multifd(qemu_platform, vm_factory, link_factory, tmp_path):
    link = link_factory("1gbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path)
    qemu_platform.check(src)
    qemu_platform.check(dst)
    rcv, port = cl.receive(dst)
    mig = cl.migrate(src, port, "--multifd", "2")
    assert mig.wait() == 0, mig.stderr()[-3000:]
    assert rcv.wait() == 0, rcv.stderr()[-3000:]
    rep = mig.report()
    assert rep["outcome"] == "completed" and rep["switched_over"] and rep["destination"] == "running"
    assert rep["disk_bytes"] >= 8 * MiB and rep["ram_raw"] > 0 and rep["wire_bytes"] > 0  # data, not holes
    assert rcv.report()["outcome"] == "completed"
    assert src.qmp("query-status")["status"] == "postmigrate"
    assert src.qmp("query-migrate")["ram"]["multifd-bytes"] > 0, "multifd was not used"
    boot = continues_on(dst, src)
    dst.wait_acks(src.serial().max_ack + 3, 60)  # the journal goes on at the destination
    dst.stop()
    acked = max(src.serial().max_ack, dst.serial().max_ack)
    verify_journal(str(paths["d0"]), "raw", acked_upto=acked, expect_boot_id=boot)
    src.kill()
    assert images_identical(paths["s1"], paths["d1"], "qcow2", "qcow2")  # the guest never writes it
    cl.assert_workdirs_clean()


def test_paused_destination_is_byte_identical(vm_factory, link_factory, tmp_path):
    link = link_factory("1gbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, qcow2=False, cmdline={"dirty_mib": 16, "dirty_rate": 8})
    rcv, port = cl.receive(dst, "--paused")
    mig = cl.migrate(src, port)
    assert mig.wait() == 0, mig.stderr()[-3000:]
    assert rcv.wait() == 0, rcv.stderr()[-3000:]
    assert mig.report()["destination"] == "paused"
    assert dst.qmp("query-status")["status"] == "paused"
    assert src.qmp("query-status")["status"] == "postmigrate"
    # both are frozen at the switchover: the journal disk, which the guest was writing, is identical
    src.kill()
    dst.kill()
    assert images_identical(paths["s0"], paths["d0"], "raw", "raw")
    assert images_identical(paths["s1"], paths["d1"], "raw", "raw")
    cl.assert_workdirs_clean()


# ------------------------------------------------------------------------------------ refusals


def test_smaller_destination_disk_is_refused_before_any_mirror(vm_factory, link, tmp_path):
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, dst_sizes=(16 * MiB, 16 * MiB))
    before = disk_sha256(paths["s1"], "qcow2")
    rcv, port = cl.receive(dst)
    mig = cl.migrate(src, port)
    assert mig.wait() == 1
    assert rcv.wait() == 1
    assert "destination is smaller than the source" in mig.stderr()
    errors = [ln for ln in mig.stderr().splitlines() if ln.startswith("dataplane migrate: error: ")]
    assert len(errors) == 1 and errors[0].count("refused") == 1, errors  # said once, the reason after it
    assert errors[0].startswith("dataplane migrate: error: migration plan refused: the destination says: "
                                "disk 'data': destination is smaller"), errors
    assert rcv.report()["outcome"] == "refused"
    assert mig.report()["outcome"] == "refused"
    assert "dpmig" not in mig.stderr() and "mirroring" not in mig.stderr()
    source_intact(src)
    assert dst.qmp("query-status")["status"] == "inmigrate"
    src.kill()
    assert disk_sha256(paths["s1"], "qcow2") == before


def test_wrong_client_certificate_is_refused_before_any_qemu_command(vm_factory, link, tmp_path):
    cl = Clusters(link, tmp_path)
    src, dst, _ = make_vms(vm_factory, tmp_path, data_fill=0)
    other = tmp_path / "other-pki"
    subprocess.run([sys.executable, "-m", "dataplane", "certs", "init", str(other), "--two-cas",
                    "--server-name", link.addr_b], check=True, capture_output=True)
    nodes = sorted(n["node-name"] for n in src.qmp("query-named-block-nodes"))
    rcv, port = cl.receive(dst)
    # a client identity from another CA; the trust and the peer name are right
    tls = ["--cert", str(other / "client.crt"), "--key", str(other / "client.key"),
           "--ca", str(cl.pki / "client-trust.pem"), "--peer-name", link.addr_b]
    mig = cl.migrate(src, port, certs=tls)
    assert mig.wait(60) == 1
    err = mig.stderr()
    assert "error:" in err and "certificate" in err.lower(), err
    assert sorted(n["node-name"] for n in src.qmp("query-named-block-nodes")) == nodes
    assert src.qmp("query-status")["status"] == "running"
    assert "refused a TLS connection" in rcv.stderr()
    assert rcv.popen.poll() is None, "the listener must survive a bad client"
    rcv.popen.send_signal(signal.SIGTERM)
    assert rcv.wait(30) == 1
    assert rcv.report()["outcome"] == "aborted"
    assert dst.qmp("query-status")["status"] == "inmigrate"


# ------------------------------------------------------------------------------------ faults


def _rolled_back(mig: Role, rcv: Role, src: QemuVM) -> dict[str, Any]:
    assert mig.wait() == 1, mig.stderr()[-3000:]
    rep = mig.report()
    assert rep["outcome"] == "rolled-back" and not rep["switched_over"], rep
    assert rcv.wait(60) == 1, rcv.stderr()[-3000:]
    source_intact(src)
    return rep


def test_destination_killed_during_mirror(vm_factory, link_factory, tmp_path):
    link = link_factory("100mbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, src_sizes=(16 * MiB, 64 * MiB), data_fill=48 * MiB)
    before = disk_sha256(paths["s1"], "qcow2")
    rcv, port = cl.receive(dst)
    mig = cl.migrate(src, port)
    mig.wait_event(lambda e: e.get("phase") == "mirror" and e.get("disk_done", 0) > 0)
    dst.kill()
    rep = _rolled_back(mig, rcv, src)
    assert rep["phase"] in ("mirror", "mirror-ready"), rep
    src.kill()
    assert disk_sha256(paths["s1"], "qcow2") == before
    cl.assert_workdirs_clean()


def test_destination_killed_during_precopy(vm_factory, link_factory, tmp_path):
    link = link_factory("100mbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, data_fill=0,
                           cmdline={"dirty_mib": 48, "dirty_rate": 4, "pattern": "random"})
    before = disk_sha256(paths["s1"], "qcow2")
    rcv, port = cl.receive(dst)
    mig = cl.migrate(src, port)
    mig.wait_event(lambda e: e.get("phase") == "precopy" and e.get("ram_done", 0) > 2 * MiB)
    dst.kill()
    rep = _rolled_back(mig, rcv, src)
    assert rep["phase"] == "precopy", rep
    src.kill()
    assert disk_sha256(paths["s1"], "qcow2") == before


def test_ctrl_c_on_source_during_precopy(qemu_platform, vm_factory, link_factory, tmp_path):
    link = link_factory("100mbit")
    cl = Clusters(link, tmp_path)
    src, dst, _ = make_vms(vm_factory, tmp_path, data_fill=0,
                       cmdline={"dirty_mib": 48, "dirty_rate": 4, "pattern": "random"})
    qemu_platform.check(src)
    rcv, port = cl.receive(dst)
    mig = cl.migrate(src, port)
    mig.wait_event(lambda e: e.get("phase") == "precopy" and e.get("ram_done", 0) > 2 * MiB)
    mig.popen.send_signal(signal.SIGINT)
    rep = _rolled_back(mig, rcv, src)
    assert "interrupt" in rep["error"], rep
    # one error line on stderr, the cause first
    errors = [ln for ln in mig.stderr().splitlines() if ln.startswith("dataplane migrate: error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "dataplane migrate: error: rolled back in phase precopy: interrupted"), errors
    assert rcv.report()["outcome"] == "rolled-back"
    assert "the source" in rcv.report()["error"]
    cl.assert_workdirs_clean()


def test_link_cut_within_grace_completes(vm_factory, link_factory, tmp_path):
    link = link_factory("100mbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, src_sizes=(16 * MiB, 64 * MiB), data_fill=32 * MiB)
    rcv, port = cl.receive(dst, "--grace", "30")
    mig = cl.migrate(src, port, "--grace", "30")
    mig.wait_event(lambda e: e.get("phase") == "mirror" and e.get("disk_done", 0) > 4 * MiB)
    link.cut()
    time.sleep(5)
    link.restore()
    assert mig.wait() == 0, mig.stderr()[-3000:]
    assert rcv.wait() == 0, rcv.stderr()[-3000:]
    assert mig.report()["outcome"] == "completed"
    boot = continues_on(dst, src)
    dst.stop()
    src.kill()
    verify_journal(str(paths["d0"]), "raw", acked_upto=src.serial().max_ack, expect_boot_id=boot)
    assert images_identical(paths["s1"], paths["d1"], "qcow2", "qcow2")


def test_link_cut_beyond_grace_rolls_back(vm_factory, link_factory, tmp_path):
    link = link_factory("100mbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, src_sizes=(16 * MiB, 64 * MiB), data_fill=32 * MiB)
    before = disk_sha256(paths["s1"], "qcow2")
    rcv, port = cl.receive(dst, "--grace", "2")
    mig = cl.migrate(src, port, "--grace", "2")
    mig.wait_event(lambda e: e.get("phase") == "mirror" and e.get("disk_done", 0) > 4 * MiB)
    link.cut()
    try:
        _rolled_back(mig, rcv, src)
    finally:
        link.restore()
    src.kill()
    assert disk_sha256(paths["s1"], "qcow2") == before


# ------------------------------------------------------------------------------------ convergence


def test_non_convergence_auto_policy_completes(vm_factory, link_factory, tmp_path):
    link = link_factory("100mbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, data_fill=0, memory=256,
                           cmdline={"dirty_mib": 64, "dirty_rate": 40, "pattern": "random"})
    rcv, port = cl.receive(dst)
    mig = cl.migrate(src, port, "--stall-window", "3")
    assert mig.wait(300) == 0, mig.stderr()[-3000:]
    assert rcv.wait() == 0, rcv.stderr()[-3000:]
    rep = mig.report()
    actions = [d["action"] for d in rep["decisions"]]
    reasons = " | ".join(d["reason"] for d in rep["decisions"])
    assert rep["postcopy"] or "auto-converge" in reasons, rep["decisions"]
    assert "switch-postcopy" in actions or "raise-throttle" in actions or "auto-converge" in reasons
    continues_on(dst, src)


def test_non_convergence_without_help_fails_cleanly(vm_factory, link_factory, tmp_path):
    link = link_factory("100mbit")
    cl = Clusters(link, tmp_path)
    src, dst, paths = make_vms(vm_factory, tmp_path, data_fill=0, memory=256,
                           cmdline={"dirty_mib": 64, "dirty_rate": 40, "pattern": "random"})
    before = disk_sha256(paths["s1"], "qcow2")
    rcv, port = cl.receive(dst)
    mig = cl.migrate(src, port, "--postcopy", "never", "--auto-converge", "off", "--timeout-base", "15",
                     "--timeout-per-gib", "1", "--stall-window", "3")
    rep = _rolled_back(mig, rcv, src)
    assert "completion timeout" in rep["error"], rep
    assert any(d["action"] == "fail" for d in rep["decisions"])
    src.kill()
    assert disk_sha256(paths["s1"], "qcow2") == before
    assert os.path.exists(paths["d1"])


def test_receive_on_a_busy_port_fails_cleanly(vm_factory, tmp_path):
    """A listen port already taken: one error line, exit 1, nothing left in the work directory, and
    the destination untouched."""
    import socket

    d0 = make_disk(tmp_path / "d0.raw", 8 * MiB)
    dst = vm_factory(disks=[Disk(d0, "raw", node_name="jrnl")], memory_mib=128, incoming="defer",
                     paused=True, name="dst")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    work = tmp_path / "work"
    work.mkdir()
    try:
        out = subprocess.run([sys.executable, "-m", "dataplane", "receive", "--qmp", str(dst.qmp_path),
                              "--listen", f"127.0.0.1:{busy.getsockname()[1]}", "--plaintext",
                              "--workdir", str(work)], capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 1 and len(errors) == 1 and "cannot listen on 127.0.0.1" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and "Task was destroyed" not in out.stderr, out.stderr
    assert list(work.iterdir()) == []
    assert dst.qmp("query-status")["status"] == "inmigrate"


def test_receive_disk_restricts_what_the_source_may_write(vm_factory, link, tmp_path):
    """`receive --disk` names the disks the source may write; a plan with any other is refused before
    anything starts, and the destination exports nothing."""
    cl = Clusters(link, tmp_path)
    src, dst, _ = make_vms(vm_factory, tmp_path, src_sizes=(4 * MiB, 8 * MiB), data_fill=0)
    rcv, port = cl.receive(dst, "--disk", "jrnl")
    mig = cl.migrate(src, port)
    assert mig.wait() == 1 and rcv.wait() == 1
    assert rcv.report()["outcome"] == "refused"
    assert "disk 'data': not among the disks this destination accepts (jrnl)" in rcv.report()["error"]
    assert dst.qmp("query-block-exports") == []
    assert dst.qmp("query-status")["status"] == "inmigrate"
    source_intact(src)


# ------------------------------------------------------------------------------------ new volumes


def test_disk_map_raw_source_onto_new_qcow2_and_thin_raw_volumes(qemu_platform, vm_factory, link_factory,
                                                                  tmp_path):
    """``migrate --disk-map``: the destination's disks are new volumes of other names and formats (the
    raw journal into a qcow2 volume, a raw data disk of 256 MiB holding 8 MiB into a new raw volume
    that stays thin although its node has QEMU's default discard=ignore); ``receive`` refuses a map
    onto a node it does not have before anything starts."""
    link = link_factory("1gbit")
    cl = Clusters(link, tmp_path)
    s0, s1 = make_disk(tmp_path / "s0.raw", 16 * MiB), make_disk(tmp_path / "s1.raw", 256 * MiB)
    fill_random(s1, 8 * MiB, "raw", offset=MiB, seed=11)
    d0 = make_disk(tmp_path / "pvc-jrnl.qcow2", 16 * MiB, "qcow2")
    d1 = make_disk(tmp_path / "pvc-data.raw", 256 * MiB)
    src = vm_factory(disks=[Disk(s0, "raw", node_name="jrnl"), Disk(s1, "raw", node_name="data")],
                     cmdline={"hb_ms": 100, "disk": "/dev/vda", "disk_rate": 20}, memory_mib=128,
                     name="src")
    dst = vm_factory(disks=[Disk(d0, "qcow2", node_name="pvc-jrnl", device_id="ua-jrnl"),
                            Disk(d1, "raw", node_name="pvc-data")],
                     memory_mib=128, incoming="defer", paused=True, name="dst")
    qemu_platform.check(src)
    qemu_platform.check(dst)
    src.wait_acks(3, 60)
    want = disk_sha256(s1, "raw")

    rcv, port = cl.receive(dst)  # a wrong map: refused, nothing changed
    mig = cl.migrate(src, port, "--disk-map", "jrnl=ua-jrnl", "--disk-map", "data=pvc-nope")
    assert mig.wait() == 1 and rcv.wait() == 1
    assert "disk 'data' -> 'pvc-nope': no block node of that name on the destination" in mig.stderr()
    assert rcv.report()["outcome"] == "refused"
    source_intact(src)
    assert dst.qmp("query-status")["status"] == "inmigrate"

    rcv, port = cl.receive(dst)
    mig = cl.migrate(src, port, "--disk-map", "jrnl=ua-jrnl", "--disk-map", "data=pvc-data")
    assert mig.wait() == 0, mig.stderr()[-3000:]
    assert rcv.wait() == 0, rcv.stderr()[-3000:]
    assert mig.report()["outcome"] == "completed"
    assert rcv.report()["holes"] == {"pvc-jrnl": "kept", "pvc-data": "kept"}
    boot = continues_on(dst, src)
    dst.wait_acks(src.serial().max_ack + 3, 60)
    dst.stop()
    src.kill()
    verify_journal(str(d0), "qcow2", acked_upto=max(src.serial().max_ack, dst.serial().max_ack),
                   expect_boot_id=boot)
    assert disk_sha256(d1, "raw") == want
    assert allocated_bytes(d1) <= allocated_bytes(s1) * 1.05, (allocated_bytes(d1), allocated_bytes(s1))
    cl.assert_workdirs_clean()
