"""The node daemon (#15): many migrations through one daemon per side, and its memory when idle.

* ``daemon_3x_vs_serial``: three cross-cluster migrations run at once through one `dataplane serve`
  per side (`dataplane --daemon ... receive|migrate`, ``--max-migrations 3``), total time from the
  first `migrate` to the last one's end, against the same three run one after another with the
  standalone commands (the sum of their times) (goal <= 0.8). Two network-namespace clusters joined
  by a 1 Gbit/s veth; each pair of QEMUs (TCG) is the small test guest of the e2e tests (128 MiB of
  RAM, a 16 MiB journal disk and a 32 MiB qcow2 data disk holding 8 MiB); every migration is
  verified (its guest's heartbeat goes on at the destination with the same boot id).
* ``daemon_idle_rss_mib``: the resident memory (``VmRSS``) of a daemon, idle, after 20 storage
  migrations in a row through it (a 32 MiB data disk moved to a new file each time) (goal <= 80);
  its RSS after the first one is printed beside it (memory returns to its idle level).

Every figure is measured in this run; nothing is compared with a number from elsewhere.
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

from benches.terminal import say
from dataplane.testing.fixtures import guest, vm_factory  # noqa: F401  (fixtures)
from dataplane.testing.net_fixtures import link_factory  # noqa: F401  (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cclm_support import Clusters, MiB, Role, continues_on, make_vms  # noqa: E402

#: Migrations run one after another, and at once.
N = 3
#: Storage migrations in a row before the daemon's RSS is read.
IN_A_ROW = 20


@pytest.fixture(scope="module", autouse=True)
def _e2e_possible() -> None:
    from dataplane.testing.netns import netns_unavailable_reason
    from dataplane.testing.vm import qemu_binary

    reason = netns_unavailable_reason() or (None if qemu_binary() else "qemu-system-x86_64 is not installed")
    if reason is not None:
        pytest.skip(reason)


def _pairs(factory: Any, tmp: Path, tag: str) -> list[tuple[Any, Any, dict[str, Path]]]:
    out = []
    for i in range(N):
        where = tmp / f"{tag}{i}"
        where.mkdir()
        out.append(make_vms(factory, where, names=(f"{tag}-src{i}", f"{tag}-dst{i}")))
    return out


def _cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (/proc/stat), to tell how busy both cores were."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _busy(a: tuple[float, float], b: tuple[float, float]) -> float:
    return (b[0] - a[0]) / max(1.0, b[1] - a[1])


def _verify(pairs: list[tuple[Any, Any, dict[str, Path]]], migs: list[Role], rcvs: list[Role]) -> None:
    for (src, dst, _paths), mig, rcv in zip(pairs, migs, rcvs, strict=True):
        assert mig.wait(300) == 0, mig.stderr()[-3000:]
        assert rcv.wait(60) == 0, rcv.stderr()[-3000:]
        assert mig.report()["outcome"] == "completed"
        continues_on(dst, src)
        src.kill()
        dst.kill()


def test_daemon_3x_vs_serial(ratio: Any, vm_factory: Any, link_factory: Any,  # noqa: F811
                            tmp_path: Path, capsys: Any) -> None:
    link = link_factory("1gbit")
    serial_cl = Clusters(link, tmp_path / "serial")
    serial = 0.0
    busy: list[float] = []
    for i, (src, dst, paths) in enumerate(_pairs(vm_factory, tmp_path, "serial")):
        rcv, port = serial_cl.receive(dst, log=f"receive-serial{i}.log")
        t0, c0 = time.monotonic(), _cpu()
        mig = serial_cl.migrate(src, port, log=f"migrate-serial{i}.log")
        assert mig.wait(300) == 0, mig.stderr()[-3000:]
        serial += time.monotonic() - t0
        busy.append(_busy(c0, _cpu()))
        _verify([(src, dst, paths)], [mig], [rcv])
    short = Path(tempfile.mkdtemp(prefix="dpb-"))
    socks = {side: short / f"api-{side}.sock" for side in "ab"}
    daemons = {side: Role(link, side, ["serve", "--api", f"unix:{socks[side]}", "--state-dir",
                                       str(short / f"state-{side}"), "--max-migrations", str(N)],
                          tmp_path / f"serve-{side}.log") for side in "ab"}
    try:
        for d in daemons.values():
            d.wait_stderr("serve listening on", 30)
        cl = Clusters(link, tmp_path / "daemon", daemons=socks)
        pairs = _pairs(vm_factory, tmp_path, "daemon")
        rcvs = [cl.receive(dst, log=f"receive{i}.log") for i, (_s, dst, _p) in enumerate(pairs)]
        t0, c0 = time.monotonic(), _cpu()
        migs = [cl.migrate(src, port, log=f"migrate{i}.log")
                for i, ((src, _d, _p), (_r, port)) in enumerate(zip(pairs, rcvs, strict=True))]
        for mig in migs:
            assert mig.wait(300) == 0, mig.stderr()[-3000:]
        together = time.monotonic() - t0
        busy_together = _busy(c0, _cpu())
        _verify(pairs, migs, [r for r, _port in rcvs])
        for d in daemons.values():
            assert d.stop(signal.SIGTERM, 30) == 0
    finally:
        for d in daemons.values():
            d.stop(signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)
    say(capsys, f"{N} migrations one after another with the CLI: {serial:.1f} s in all, both cores "
                f"{', '.join(f'{b:.0%}' for b in busy)} busy; at once through one daemon per side: "
                f"{together:.1f} s, {busy_together:.0%} busy")
    ratio("daemon_3x_vs_serial", together / serial, "<=0.8",
          f"{N} at once through the daemons {together:.1f} s vs one after another with the CLI "
          f"{serial:.1f} s")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_daemon_idle_rss_mib(ratio: Any, vm_factory: Any, tmp_path: Path, capsys: Any) -> None:  # noqa: F811
    from dataplane.daemon.client import DaemonClient
    from dataplane.testing.vm import Disk, fill_random, make_disk

    jrnl = make_disk(tmp_path / "jrnl.raw", 16 * MiB)
    data = make_disk(tmp_path / "data.qcow2", 32 * MiB, "qcow2")
    fill_random(data, 8 * MiB, "qcow2", offset=MiB, seed=3)
    vm = vm_factory(disks=[Disk(jrnl, "raw", node_name="jrnl"), Disk(data, "qcow2", node_name="data")],
                    cmdline={"hb_ms": 100, "disk": "/dev/vda", "disk_rate": 20}, memory_mib=128, name="rss")
    vm.wait_acks(3, 60)
    short = Path(tempfile.mkdtemp(prefix="dpr-"))
    sock = short / "api.sock"
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--api", f"unix:{sock}",
                             "--state-dir", str(short / "state")], stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None and b"serve listening on" in proc.stderr.readline()
        idle0 = _rss_mib(proc.pid)

        async def one(i: int) -> None:
            async with DaemonClient(str(sock)) as api:
                target = str(tmp_path / f"t{i}.qcow2")
                job = await api.create("storage-migrations", {
                    "qmp": str(vm.qmp_path),
                    "disks": [{"disk": "data-dev", "target": target, "format": "qcow2"}]})
                async for event in api.events("storage-migrations", job["id"]):
                    if event.get("event") == "report":
                        assert event["outcome"] == "completed", event

        rss = []
        for i in range(IN_A_ROW):
            asyncio.run(one(i))
            (tmp_path / f"t{i - 1}.qcow2").unlink(missing_ok=True)  # the previous one, no longer used
            rss.append(_rss_mib(proc.pid))
        time.sleep(2.0)
        idle = _rss_mib(proc.pid)
        say(capsys, f"daemon RSS: {idle0:.1f} MiB at start, {rss[0]:.1f} after the first storage migration, "
            f"{rss[-1]:.1f} after the {IN_A_ROW}th, {idle:.1f} idle 2 s later")
        ratio("daemon_idle_rss_mib", idle, "<=80",
              f"after {IN_A_ROW} storage migrations in a row ({rss[0]:.1f} MiB after the first, "
              f"{idle0:.1f} at start)")
        n = vm.serial().max_ack
        vm.wait_acks(n + 3, 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(short, ignore_errors=True)
