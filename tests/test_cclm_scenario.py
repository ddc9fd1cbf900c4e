"""The CCLM scenario (dataplane.testing.cclm): disk layouts, QEMU in a namespace, migrations across a veth."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataplane.testing.cclm import (
    Clusters,
    DiskLayout,
    GuestRecipe,
    Scenario,
    cli_has,
    text_bytes,
    write_disk,
)
from dataplane.testing.net_fixtures import require_netns
from dataplane.testing.vm import VMStartError

MiB = 1 << 20
SMALL = GuestRecipe(memory_mib=128, dirty_mib=32, dirty_rate=10, journal_mib=16, journal_rate=10,
                    disk=DiskLayout(size=64 * MiB, text=6 * MiB, random=4 * MiB, zero=2 * MiB, chunk=2 * MiB))


def test_disk_layout_writes_what_it_says(tmp_path: Path) -> None:
    layout = DiskLayout(size=32 * MiB, text=4 * MiB, random=2 * MiB, zero=2 * MiB, chunk=1 * MiB, seed=3)
    regions = layout.regions()
    assert [k for _, _, k in regions].count("text") == 4
    assert sum(n for _, n, k in regions if k == "random") == 2 * MiB
    assert all(b[0] >= a[0] + a[1] for a, b in zip(regions, regions[1:], strict=False)), "regions overlap"
    assert regions[-1][0] + regions[-1][1] <= layout.size
    image = write_disk(tmp_path / "d.raw", layout)
    assert image.stat().st_size == layout.size
    data = image.read_bytes()
    for off, n, kind in regions:
        chunk = data[off:off + n]
        if kind == "zero":
            assert chunk == bytes(n)
        elif kind == "text":
            assert chunk.isascii() and chunk.count(b" ") > n // 12, "not text-like"
        else:
            assert chunk.count(0) < n // 100 and not chunk.isascii()
    assert text_bytes(4096, 3, part=1) != text_bytes(4096, 3, part=2)
    with pytest.raises(ValueError):
        DiskLayout(size=MiB, text=2 * MiB)


@pytest.mark.e2e
def test_qemu_runs_inside_the_namespace(vm_factory, link) -> None:
    vm = vm_factory(memory_mib=128, netns=link.ns_b, cmdline={"hb_ms": 100})
    assert os.stat(f"/proc/{vm.pid}/ns/net").st_ino == os.stat(f"/run/netns/{link.ns_b}").st_ino
    assert os.stat(f"/proc/{vm.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    vm.wait_heartbeat(2, 60)
    assert vm.qmp("query-status")["status"] == "running"
    with pytest.raises(VMStartError, match="cannot be opened"):
        vm_factory(memory_mib=128, netns="dp-no-such-namespace")


@pytest.fixture
def small_scenario(guest, tmp_path):
    require_netns()
    with Clusters("1gbit", workdir=tmp_path / "clusters", subnet="10.200.1.0/30") as clusters, \
            Scenario(clusters, SMALL, kernel=guest.kernel, initrd=guest.initrd) as sc:
        yield sc


@pytest.mark.e2e
def test_direct_migration_across_the_veth(small_scenario) -> None:
    run = small_scenario.run("direct")
    assert run.ok, run.error
    assert any(v.startswith("heartbeat continues") for v in run.verified), run.verified
    assert any(v.startswith("journal verifies") for v in run.verified), run.verified
    assert run.downtime_ms is not None and 0 < run.downtime_ms < 10_000
    assert 0 < run.total_time < 120
    # at least the disks' data and the dirtied memory crossed the veth (zeros of RAM are elided by QEMU)
    assert run.wire_bytes > (SMALL.disk.data_bytes + SMALL.dirty_mib * MiB) * 0.9, run.wire
    assert run.report["outcome"] == "completed"


@pytest.mark.e2e
def test_ours_leaves_a_paused_identical_destination(small_scenario) -> None:
    if not (cli_has("migrate") and cli_has("receive")):
        pytest.skip("`dataplane migrate` / `dataplane receive` are not available")
    run = small_scenario.run("ours", resume=False)
    assert run.ok, run.error
    assert "destination disks identical to the source's" in run.verified
    assert run.downtime_ms is None  # the guest never resumed
    assert run.report.get("outcome") == "completed" and run.wire_bytes > 0
