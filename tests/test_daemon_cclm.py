"""Cross-cluster migrations through the node daemon: one `dataplane serve` in each network-namespace
cluster, the migrations and receivers asked for with `dataplane --daemon unix:PATH migrate|receive`
(the same command lines, output and exit status as the standalone commands), real QEMUs (TCG).

Each test asserts outcomes: the guest's heartbeat going on at the destination with the same boot id,
the data disk identical, the source stopped; for a live change, the change's effect on QEMU; for
the metrics, the series matching the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cclm_support import Clusters, Role, continues_on, make_vms, source_intact
from prometheus_client.parser import text_string_to_metric_families

from dataplane.daemon.client import DaemonClient
from dataplane.testing.cclm import RoleProcess
from dataplane.testing.netns import Link
from dataplane.testing.vm import images_identical

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def daemons(link: Link, tmp: Path, *extra: str) -> Iterator[dict[str, Path]]:
    """`dataplane serve` in each namespace (its API socket under a short private directory); stopped
    with SIGTERM at the end, which must exit 0."""
    short = Path(tempfile.mkdtemp(prefix="dpd-"))
    paths = {side: short / f"api-{side}.sock" for side in "ab"}
    roles = {side: Role(link, side, ["serve", "--api", f"unix:{path}", "--state-dir",
                                     str(short / f"state-{side}"), *extra], tmp / f"serve-{side}.log")
             for side, path in paths.items()}
    try:
        for role in roles.values():
            role.wait_stderr(r"serve listening on", 30)
        yield paths
        for side, role in roles.items():
            assert role.stop(signal.SIGTERM, 30) == 0, role.stderr()[-3000:]
            assert not paths[side].exists(), "the daemon left its API socket behind"
    finally:
        for role in roles.values():
            role.stop(signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)


def api(path: Path, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    """One call of a daemon's API (the client the CLI uses)."""
    async def call() -> Any:
        async with DaemonClient(str(path)) as client:
            return await client._call(method, url, body)
    return asyncio.run(call())


def metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The daemon's /metrics, parsed by prometheus_client's own parser: {(sample, labels): value}."""
    async def get() -> str:
        async with DaemonClient(str(path)) as client, client.session.get("/metrics") as resp:
            assert resp.status == 200
            return await resp.text()
    out = {}
    for family in text_string_to_metric_families(asyncio.run(get())):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_migrate_and_receive_through_daemons_with_a_live_downtime_change(vm_factory, link_factory, tmp_path):
    """A precopy that cannot converge within a 1 ms downtime limit (no auto-converge, no postcopy)
    completes only because the limit is raised live with PATCH on the source daemon's job."""
    link = link_factory("100mbit")
    with daemons(link, tmp_path) as api_socks:
        cl = Clusters(link, tmp_path, daemons=api_socks)
        src, dst, paths = make_vms(vm_factory, tmp_path, data_fill=4 << 20,
                                   cmdline={"dirty_mib": 16, "dirty_rate": 8, "pattern": "random"})
        rcv, port = cl.receive(dst)
        mig = cl.migrate(src, port, "--downtime-ms", "1", "--postcopy", "never", "--auto-converge", "off",
                         "--timeout-base", "120")
        mig.wait_event(lambda e: e.get("event") == "progress" and e.get("phase") == "precopy", 120)
        [job] = api(api_socks["a"], "GET", "/v1/migrations")["items"]
        assert job["state"] == "running" and job["params"]["downtime_ms"] == 1
        assert src.qmp("query-migrate-parameters")["downtime-limit"] == 1
        changed = api(api_socks["a"], "PATCH", f"/v1/migrations/{job['id']}", {"downtime_ms": 20000})
        assert changed["params"]["downtime_ms"] == 20000
        assert mig.wait(180) == 0, mig.stderr()[-3000:]
        assert rcv.wait() == 0, rcv.stderr()[-3000:]
        rep = mig.report()
        assert rep["outcome"] == "completed" and rep["switched_over"] and rep["destination"] == "running"
        assert any("downtime limit set to 20000 ms (asked live)" in d["reason"] for d in rep["decisions"])
        assert "migrate connected to" in mig.stderr() and "receive listening on" in rcv.stderr()
        assert src.qmp("query-status")["status"] == "postmigrate"
        assert src.qmp("query-migrate-parameters")["downtime-limit"] != 20000, "not restored afterwards"
        continues_on(dst, src)
        src.kill()
        dst.kill()
        assert images_identical(paths["s1"], paths["d1"], "qcow2", "qcow2")
        # the source daemon's series match the report
        m = metrics(api_socks["a"])
        assert m[("dataplane_migrations_total", (("kind", "migration"), ("outcome", "completed")))] == 1
        assert m[("dataplane_stream_bytes_total", (("form", "wire"), ("stream", "ram")))] == rep["ram_wire"]
        assert m[("dataplane_stream_bytes_total", (("form", "raw"), ("stream", "disk")))] == rep["disk_raw"]
        control = m[("dataplane_stream_bytes_total", (("form", "wire"), ("stream", "control")))]
        assert control == rep["control_wire"] > 0
        assert m[("dataplane_downtime_seconds_count", ())] == 1
        assert m[("dataplane_downtime_seconds_sum", ())] == pytest.approx(rep["downtime_ms"] / 1000)
        assert m[("dataplane_migrations_active", (("kind", "migration"), ("state", "running")))] == 0
        done = metrics(api_socks["b"])
        assert done[("dataplane_migrations_total", (("kind", "receiver"), ("outcome", "completed")))] == 1


def test_three_concurrent_migrations_through_one_daemon_per_side(vm_factory, link_factory, tmp_path):
    link = link_factory("1gbit")
    with daemons(link, tmp_path, "--max-migrations", "3") as api_socks:
        cl = Clusters(link, tmp_path, daemons=api_socks)
        pairs = []
        for i in range(3):
            where = tmp_path / f"pair{i}"
            where.mkdir()
            pairs.append(make_vms(vm_factory, where, data_fill=4 << 20, names=(f"src{i}", f"dst{i}")))
        roles = [cl.receive(dst, log=f"receive{i}.log") for i, (_src, dst, _paths) in enumerate(pairs)]
        migs = [cl.migrate(src, port, log=f"migrate{i}.log")
                for i, ((src, _dst, _paths), (_rcv, port)) in enumerate(zip(pairs, roles, strict=True))]
        for i, mig in enumerate(migs):
            assert mig.wait(240) == 0, mig.stderr()[-3000:]
            assert roles[i][0].wait() == 0, roles[i][0].stderr()[-3000:]
            assert mig.report()["outcome"] == "completed"
        for src, dst, _paths in pairs:
            assert src.qmp("query-status")["status"] == "postmigrate"
            continues_on(dst, src)
        for src, dst, paths in pairs:
            src.kill()
            dst.kill()
            assert images_identical(paths["s1"], paths["d1"], "qcow2", "qcow2")
        ended = api(api_socks["a"], "GET", "/v1/migrations")["items"]
        assert [j["state"] for j in ended] == ["completed"] * 3
        # the three ran at once in the source daemon: each started before any ended
        assert max(j["started"] for j in ended) < min(j["ended"] for j in ended), ended


def test_sigterm_of_the_source_daemon_during_precopy_rolls_back(vm_factory, link_factory, tmp_path):
    """SIGTERM to the source's daemon while RAM is being copied: it rolls the migration back (the
    source keeps running, nothing of the migration left on it), the destination never runs the
    guest, and the daemon exits 0."""
    link = link_factory("100mbit")
    short = Path(tempfile.mkdtemp(prefix="dpd-"))
    socks = {side: short / f"api-{side}.sock" for side in "ab"}
    roles = {side: Role(link, side, ["serve", "--api", f"unix:{socks[side]}", "--state-dir",
                                     str(short / f"state-{side}")], tmp_path / f"serve-{side}.log")
             for side in "ab"}
    try:
        for role in roles.values():
            role.wait_stderr(r"serve listening on", 30)
        cl = Clusters(link, tmp_path, daemons=socks)
        src, dst, _paths = make_vms(vm_factory, tmp_path, data_fill=4 << 20,
                                    cmdline={"dirty_mib": 16, "dirty_rate": 8, "pattern": "random"})
        rcv, port = cl.receive(dst, "--grace", "5")
        mig = cl.migrate(src, port, "--downtime-ms", "1", "--postcopy", "never", "--auto-converge", "off",
                         "--grace", "5")
        mig.wait_event(lambda e: e.get("event") == "progress" and e.get("phase") == "precopy", 120)
        assert roles["a"].stop(signal.SIGTERM, 60) == 0, roles["a"].stderr()[-3000:]
        assert not socks["a"].exists()
        assert not list((short / "state-a").glob("*.journal")), "a rolled-back job left its journal"
        assert mig.wait(60) != 0
        source_intact(src)
        assert rcv.wait(120) != 0
        [received] = api(socks["b"], "GET", "/v1/receivers")["items"]
        assert received["state"] == "rolled-back", received
        assert not dst.is_running() or dst.qmp("query-status")["status"] != "running"
    finally:
        for role in roles.values():
            role.stop(signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)


def test_a_misbehaving_peer_does_not_slow_a_migration(vm_factory, link_factory, tmp_path):
    """A migration through the daemons takes no longer than 1.3 times a quiet run while a bad peer
    (:mod:`dataplane.testing.bad_peer`: 48 stalled handshakes, a slow talker and 100 connections of
    garbage a second) hammers the very listener that receives it. Quiet and noisy runs alternate, the
    best of each is compared."""
    link = link_factory("100mbit")
    times: dict[bool, list[float]] = {False: [], True: []}
    attacks: list[dict[str, Any]] = []
    with daemons(link, tmp_path) as socks:
        cl = Clusters(link, tmp_path, daemons=socks)
        for n, noisy in enumerate((False, True, False, True)):
            where = tmp_path / f"run{n}"
            where.mkdir()
            src, dst, paths = make_vms(vm_factory, where, names=(f"src{n}", f"dst{n}"),
                                       cmdline={"dirty_mib": 16, "dirty_rate": 8})
            rcv, port = cl.receive(dst, log=f"receive{n}.log")
            bad = None
            if noisy:
                bad = RoleProcess(link, "a", "bad-peer", [sys.executable, "-m", "dataplane.testing.bad_peer",
                                                          link.addr_b, str(port)], tmp_path / f"bad{n}.log")
                until = time.monotonic() + 30
                while not [e for e in bad.json_lines if e.get("garbage", 0) >= 100]:
                    assert time.monotonic() < until and bad.popen.poll() is None, bad.stderr_tail()
                    time.sleep(0.1)
            t0 = time.monotonic()
            mig = cl.migrate(src, port, log=f"migrate{n}.log")
            assert mig.wait(240) == 0, mig.stderr()[-3000:]
            times[noisy].append(time.monotonic() - t0)
            assert rcv.wait(60) == 0, rcv.stderr()[-3000:]
            if bad is not None:
                attacks.append(bad.json_lines[-1])
                bad.stop(signal.SIGKILL)
            continues_on(dst, src)
            src.kill()
            dst.kill()
            assert images_identical(paths["s1"], paths["d1"], "qcow2", "qcow2")
    quiet, noisy_best = min(times[False]), min(times[True])
    print(f"migration time: quiet {times[False]}, with the bad peer {times[True]}; the bad peer: {attacks}")
    assert all(a["garbage"] >= 100 and a["stalled"] > 0 for a in attacks), attacks
    assert noisy_best <= 1.3 * quiet, f"quiet {times[False]}, with the bad peer {times[True]}; {attacks}"


def test_one_channel_listener_routes_each_session_to_its_receiver(vm_factory, link_factory, tmp_path):
    """`serve --listen`: receivers without a listener of their own share the daemon's. A session
    goes to the receiver it names and only if its certificate carries that receiver's peer name; a
    session no waiting receiver expects is refused, and its source keeps running."""
    link = link_factory("1gbit")
    short = Path(tempfile.mkdtemp(prefix="dpd-"))
    socks = {side: short / f"api-{side}.sock" for side in "ab"}
    cl = Clusters(link, tmp_path)
    extra = {"a": [], "b": ["--listen", f"{link.addr_b}:0", "--certs", str(cl.pki)]}
    roles = {side: Role(link, side, ["serve", "--api", f"unix:{socks[side]}", "--state-dir",
                                     str(short / f"state-{side}"), *extra[side]],
                        tmp_path / f"serve-{side}.log")
             for side in "ab"}
    try:
        for role in roles.values():
            role.wait_stderr(r"serve listening on", 30)
        shared = roles["b"].wait_stderr(r"serve channel listening on", 30)
        cl.daemons = socks
        pairs = []
        for i in range(2):
            where = tmp_path / f"pair{i}"
            where.mkdir()
            pairs.append(make_vms(vm_factory, where, names=(f"src{i}", f"dst{i}")))

        def receive(dst: Any, peer: str, n: int) -> tuple[Role, int, str]:
            argv = ["--daemon", f"unix:{socks['b']}", "receive", "--qmp", str(dst.qmp_path),
                    "--peer-name", peer, "--output", "json", "--workdir", str(cl.workdirs["b"])]
            role = Role(link, "b", argv, tmp_path / f"receive{n}.log")
            line = role.wait_stderr(r"receive listening on \S+:\d+ as receiver \S+", 30)
            where, receiver = line.split("receive listening on", 1)[1].split(" as receiver ")
            return role, int(where.strip().rsplit(":", 1)[1]), receiver.strip()

        (src1, dst1, paths1), (src2, dst2, _paths2) = pairs
        rcv1, port1, id1 = receive(dst1, "dataplane-client", 1)
        rcv2, port2, id2 = receive(dst2, "someone-else", 2)
        assert port1 == port2 == int(shared.rsplit(":", 1)[1]), (port1, port2, shared)
        # a source that names a receiver whose peer its certificate is not
        mig = cl.migrate(src1, port1, "--receiver", id2, log="migrate-wrong.log")
        assert mig.wait(60) != 0
        assert "may not migrate" in mig.stderr(), mig.stderr()[-2000:]
        assert src1.qmp("query-status")["status"] == "running"
        # named, and authorised: it goes to that receiver, and only there
        mig1 = cl.migrate(src1, port1, "--receiver", id1, log="migrate1.log")
        assert mig1.wait(180) == 0, mig1.stderr()[-3000:]
        assert rcv1.wait(60) == 0, rcv1.stderr()[-3000:]
        continues_on(dst1, src1)
        assert dst2.qmp("query-status")["status"] != "running"
        # a receiver that already took its session takes no other
        again = cl.migrate(src2, port1, "--receiver", id1, log="migrate-again.log")
        assert again.wait(60) != 0
        assert "is waiting" in again.stderr(), again.stderr()[-2000:]
        assert src2.qmp("query-status")["status"] == "running"
        rcv2.stop(signal.SIGTERM, 30)
        [job2] = [j for j in api(socks["b"], "GET", "/v1/receivers")["items"] if j["id"] == id2]
        assert job2["state"] in ("aborted", "cancelled", "refused"), job2
        src1.kill()
        dst1.kill()
        assert images_identical(paths1["s1"], paths1["d1"], "qcow2", "qcow2")
        for role in roles.values():
            assert role.stop(signal.SIGTERM, 30) == 0, role.stderr()[-3000:]
    finally:
        for role in roles.values():
            role.stop(signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)
