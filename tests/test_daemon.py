"""The node daemon (`dataplane serve`, dataplane.daemon): the job table and the contract without QEMU;
then, over its real unix socket, storage live migrations of a real QEMU whose guest writes its
journal throughout: followed through server-sent events, counted in /metrics, queued beyond the
limit, cancelled (rolled back, the VM on its old disk), and a SIGTERM of the daemon process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import dataplane.daemon as daemon_pkg
from dataplane.daemon.jobs import JobTable
from dataplane.daemon.openapi import DOCUMENT, BadRequest, validate_body
from dataplane.daemon.server import RESOURCES, Daemon, SocketBusy
from dataplane.testing.journal import verify_journal
from dataplane.testing.vm import Disk, disk_sha256, fill_random, make_disk
from qmp_driver import QemuDriver

MiB = 1 << 20
KIND = "storage-migration"


# ------------------------------------------------------------------------ without QEMU


def test_job_table_limits_queue_and_events():
    table = JobTable({KIND: 1})
    a, b, c = (table.create(KIND, {"n": i}) for i in range(3))
    assert table.startable() == [a]
    a.start()
    assert table.startable() == [] and table.position(b) == 0 and table.position(c) == 1
    assert [a.add_event({"event": "phase", "phase": p}) for p in ("copy", "pivot")] == [1, 2]
    assert [n for n, _ in a.events_after(1)] == [2]
    a.finish("completed", {"outcome": "completed"})
    with pytest.raises(ValueError, match="already ended"):
        a.finish("failed")
    with pytest.raises(ValueError, match="unknown outcome"):
        b.finish("great")
    assert table.startable() == [b]
    with pytest.raises(ValueError, match="unknown job kind"):
        table.create("teleport", {})
    small = JobTable({KIND: 5}, keep_ended=2)  # a long-lived daemon forgets its oldest ended jobs
    done = [small.create(KIND, {}) for _ in range(3)]
    for job in done:
        job.start()
        job.finish("completed")
    small.create(KIND, {})
    assert [j.id for j in small.jobs() if not j.active] == [done[1].id, done[2].id]


def test_request_validation_says_every_problem():
    ok = {"qmp": "/run/q.sock", "disks": [{"disk": "vda", "target": "/new/vda.qcow2", "format": "qcow2"}]}
    assert validate_body("StorageMigrationRequest", ok) == ok
    bad: list[tuple[Any, str]] = [
        ({**ok, "speed": 1}, "Additional properties are not allowed ('speed'"),
        ({"disks": ok["disks"]}, "is not valid under any of the given schemas"),  # neither qmp nor libvirt
        ({**ok, "libvirt": {"uri": "qemu:///system", "domain": "vm"}}, "valid under each of"),  # both
        ({**ok, "bandwidth": -1}, "bandwidth: -1 is less than the minimum of 0"),
        ({**ok, "bandwidth": 1 << 50}, "bandwidth: 1125899906842624 is greater than the maximum"),
        ({**ok, "disks": []}, "disks: [] should be non-empty"),
        ({**ok, "disks": [{"disk": "vda"}]}, "disks[0]: 'target' is a required property"),
        ({**ok, "disks": [{"disk": "vda", "target": "/x", "format": "vmdk"}]},
         "disks[0].format: 'vmdk' is not one of"),
        ({**ok, "timeout": "soon"}, "timeout: 'soon' is not of type 'number'"),
        ([1, 2], "body: [1, 2] is not of type 'object'"),
    ]
    for body, want in bad:
        with pytest.raises(BadRequest) as info:
            validate_body("StorageMigrationRequest", body)
        assert any(want in d for d in info.value.details), (want, info.value.details)


def _served_routes(daemon: Daemon) -> set[tuple[str, str]]:
    """(method, path) of every route, a ``{resource:...}`` route once per resource; PATCH only on
    the resources that take a change (the others answer it 405)."""
    out = set()
    for route in daemon.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method == "HEAD":
            continue
        if "{resource}" not in path:
            out.add((route.method.lower(), path))
            continue
        for res in RESOURCES.values():
            if route.method != "PATCH" or res.change is not None:
                out.add((route.method.lower(), path.replace("{resource}", res.name)))
    return out


async def test_the_openapi_document_describes_every_route():
    documented = {(m, p) for p, ops in DOCUMENT["paths"].items() for m in ops if m != "parameters"}
    assert _served_routes(Daemon()) == documented


# ------------------------------------------------------------------------ over the socket


class Api:
    """An aiohttp client on the daemon's unix socket."""

    def __init__(self, path: Path) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                             base_url="http://dataplane")

    async def call(self, method: str, url: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, url, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def events(self, job_id: str, after: int = 0) -> list[tuple[int, dict]]:
        """Every event of the job after ``after``, until the stream ends (after the report)."""
        out = []
        async with self.session.get(f"/v1/storage-migrations/{job_id}/events",
                                    headers={"Last-Event-ID": str(after)}) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            ident = None
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    ident = int(line[4:])
                elif line.startswith("data: "):
                    out.append((ident, json.loads(line[6:])))
        return out

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def served(tmp_path):
    daemons: list[tuple[Daemon, Any]] = []
    apis: list[Api] = []

    async def start(**kw: Any) -> tuple[Daemon, Api]:
        daemon = Daemon(**kw)
        path = tmp_path / f"api{len(daemons)}.sock"
        daemons.append((daemon, await daemon.serve(str(path))))
        apis.append(Api(path))
        return daemon, apis[-1]

    yield start
    for api in apis:
        await api.close()
    for daemon, runner in daemons:
        await daemon.shutdown()
        await runner.cleanup()


async def test_bad_requests_get_a_clear_4xx_never_a_500(served, tmp_path):
    daemon, api = await served()
    assert await api.call("GET", "/healthz") == (200, {"status": "alive"})
    assert await api.call("GET", "/readyz") == (200, {"status": "ready"})
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200 and doc == json.loads(json.dumps(DOCUMENT))
    post = "/v1/storage-migrations"
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", post, {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
         "malformed JSON"),
        ("POST", post, {"data": b"qmp=/x", "headers": {"Content-Type": "text/plain"}}, 415,
         "application/json"),
        ("POST", post, {"json": {"qmp": "/x", "disks": [{"disk": "vda", "target": "/y"}], "turbo": True}},
         400, "Additional properties are not allowed ('turbo'"),
        ("POST", post, {"json": {"qmp": "/x", "disks": [{"disk": "vda", "target": "/y"}], "bandwidth": -5}},
         400, "less than the minimum"),
        ("POST", post, {"data": b"x" * (2 << 20), "headers": {"Content-Type": "application/json"}}, 413, ""),
        ("GET", "/v1/storage-migrations/nope", {}, 404, "no storage migration 'nope'"),
        ("DELETE", "/v1/storage-migrations/nope", {}, 404, "no storage migration 'nope'"),
        ("PUT", post, {}, 405, ""),
        ("GET", "/v2/teleport", {}, 404, ""),
    ]
    for method, url, kw, want, text in cases:
        status, body = await api.call(method, url, **kw)
        assert status == want, (method, url, status, body)
        assert isinstance(body, dict) and text in body["error"] + " ".join(body.get("details", [])), body
    # a request for a VM that is not there is taken, and ends refused with the reason
    absent = {"qmp": str(tmp_path / "none.sock"), "disks": [{"disk": "vda", "target": str(tmp_path / "t")}]}
    status, job = await api.call("POST", post, json=absent)
    assert status == 201, job
    events = await api.events(job["id"])
    assert events[-1][1]["outcome"] == "refused" and "cannot reach the VM" in events[-1][1]["error"]
    status, again = await api.call("GET", f"/v1/storage-migrations/{job['id']}")
    assert again["state"] == "refused" and not (tmp_path / "t").exists()
    status, body = await api.call("GET", f"/v1/storage-migrations/{job['id']}/events",
                                  headers={"Last-Event-ID": "x1"})
    assert status == 400 and "bad event id" in body["error"]
    status, body = await api.call("DELETE", f"/v1/storage-migrations/{job['id']}")
    assert status == 409 and "already ended" in body["error"]


async def test_a_second_daemon_on_a_live_socket_is_refused(served, tmp_path):
    await served()
    with pytest.raises(SocketBusy):
        await Daemon().serve(str(tmp_path / "api0.sock"))


# ------------------------------------------------------------------------ real migrations


def _guest(vm_factory, tmp_path: Path, name: str = "vm"):
    jrnl = make_disk(tmp_path / f"{name}-jrnl.raw", 16 * MiB)
    data = make_disk(tmp_path / f"{name}-data.qcow2", 64 * MiB, "qcow2")
    fill_random(data, 8 * MiB, "qcow2", offset=4 * MiB, seed=5)
    vm = vm_factory(disks=[Disk(jrnl, "raw", node_name="jrnl"), Disk(data, "qcow2", node_name="data")],
                    cmdline={"hb_ms": 100, "disk": "/dev/vda", "disk_rate": 20}, memory_mib=128, name=name)
    vm.wait_acks(3, 60)
    return vm, jrnl, data


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


async def _old_disks_intact(vm, jrnl: Path, data: Path) -> None:
    async with await QemuDriver.connect_socket(vm.qmp_path) as drv:
        files = {n.node_name: n.filename for n in await drv.query_named_block_nodes()}
        assert files["jrnl"] == str(jrnl) and files["data"] == str(data), files
        assert not [n for n in files if n.startswith("dpslm")] and await drv.query_jobs() == []
        assert (await drv.query_status()).running


@pytest.mark.e2e
async def test_storage_migration_through_the_daemon(served, vm_factory, tmp_path):
    vm, jrnl, data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    want = disk_sha256(data, "qcow2")
    _daemon, api = await served()
    new_jrnl, new_data = tmp_path / "new-jrnl.qcow2", tmp_path / "new-data.raw"
    status, job = await api.call("POST", "/v1/storage-migrations", json={
        "qmp": str(vm.qmp_path), "disks": [{"disk": "jrnl", "target": str(new_jrnl), "format": "qcow2"},
                                      {"disk": "data", "target": str(new_data), "format": "raw"}]})
    assert status == 201 and job["state"] in ("queued", "running"), job
    events = await api.events(job["id"])
    ids = [n for n, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = [e["event"] for _, e in events]
    assert "progress" in kinds and kinds[-1] == "report"
    assert [e["phase"] for _, e in events if e["event"] == "phase"][-1] == "pivot"
    report = events[-1][1]
    assert report["outcome"] == "completed", report
    assert [d["file"] for d in report["disks"]] == [str(new_jrnl), str(new_data)]
    # a client that saw part of the stream resumes after the last event it saw
    assert await api.events(job["id"], after=ids[-2]) == events[-1:]
    status, got = await api.call("GET", f"/v1/storage-migrations/{job['id']}")
    assert got["state"] == "completed" and got["report"] == report and got["last_event"] == ids[-1]
    status, listed = await api.call("GET", "/v1/storage-migrations")
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    status, text = await api.call("GET", "/metrics")
    assert _metric(text, "dataplane_migrations_total", kind=KIND, outcome="completed") == 1
    assert _metric(text, "dataplane_disk_copied_bytes_total", kind=KIND) == report["bytes_copied"]
    assert _metric(text, "dataplane_migration_phases_total", kind=KIND, phase="pivot") == 1
    assert _metric(text, "dataplane_migration_duration_seconds_count", kind=KIND) == 1
    assert _metric(text, "dataplane_migrations_active", kind=KIND, state="running") == 0
    # every series the shipped Grafana dashboard queries exists
    dashboard = json.loads((Path(daemon_pkg.__file__).parent / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bdataplane_[a-z_]+", target["expr"])}
    served = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert len(queried) >= 6 and queried <= served, queried - served
    n = vm.serial().max_ack
    await asyncio.to_thread(vm.wait_acks, n + 5, 60)  # the journal goes on, on the new disk
    await asyncio.to_thread(vm.stop)
    verify_journal(str(new_jrnl), "qcow2", acked_upto=vm.serial().max_ack)
    assert disk_sha256(new_data, "raw") == want


@pytest.mark.e2e
async def test_queue_beyond_the_limit_and_cancel(served, vm_factory, tmp_path):
    """One storage migration at a time: the second waits (queued, position 0) and is cancelled
    before it starts; the first, capped so it cannot finish, is cancelled and rolls back: the VM on
    its old disks, running, nothing of the migration left; cancelling it again is a 409."""
    vm, jrnl, data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    want = disk_sha256(data, "qcow2")
    _daemon, api = await served(max_storage=1)
    slow = {"qmp": str(vm.qmp_path), "bandwidth": 256 * 1024,
            "disks": [{"disk": "data", "target": str(tmp_path / "slow.raw"), "format": "raw"}]}
    status, first = await api.call("POST", "/v1/storage-migrations", json=slow)
    status, second = await api.call("POST", "/v1/storage-migrations", json={
        **slow, "disks": [{"disk": "jrnl", "target": str(tmp_path / "later.raw")}]})
    assert second["state"] == "queued" and second["queue_position"] == 0, second
    status, text = await api.call("GET", "/metrics")
    assert _metric(text, "dataplane_migrations_active", kind=KIND, state="queued") == 1
    status, cancelled = await api.call("DELETE", f"/v1/storage-migrations/{second['id']}")
    assert status == 202 and cancelled["state"] == "cancelled"
    deadline = time.monotonic() + 30
    while not any(e["event"] == "progress" for _, e in await _events_so_far(api, first["id"])):
        assert time.monotonic() < deadline, "the first migration never made progress"
        await asyncio.sleep(0.2)
    status, stopping = await api.call("DELETE", f"/v1/storage-migrations/{first['id']}")
    assert status == 202 and stopping["cancel_requested"]
    events = await api.events(first["id"])
    assert events[-1][1]["outcome"] == "rolled-back", events[-1]
    status, again = await api.call("DELETE", f"/v1/storage-migrations/{first['id']}")
    assert status == 409
    await _old_disks_intact(vm, jrnl, data)
    assert not (tmp_path / "later.raw").exists()  # the cancelled job never ran
    n = vm.serial().max_ack
    await asyncio.to_thread(vm.wait_acks, n + 3, 60)
    await asyncio.to_thread(vm.stop)
    verify_journal(str(jrnl), "raw", acked_upto=vm.serial().max_ack)
    assert disk_sha256(data, "qcow2") == want


async def _events_so_far(api: Api, job_id: str) -> list[tuple[int, dict]]:
    status, job = await api.call("GET", f"/v1/storage-migrations/{job_id}")
    if job["last_event"] == 0:
        return []
    out = []
    async with api.session.get(f"/v1/storage-migrations/{job_id}/events") as resp:
        while len(out) < job["last_event"]:
            line = (await resp.content.readline()).decode()
            if line.startswith("data: "):
                out.append((len(out) + 1, json.loads(line[6:])))
    return out


@pytest.mark.e2e
def test_sigterm_rolls_the_daemons_migrations_back_and_exits_0(vm_factory, tmp_path):
    vm, jrnl, data = _guest(vm_factory, tmp_path)
    sock = tmp_path / "api.sock"
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--api", f"unix:{sock}",
                             "--state-dir", str(tmp_path / "state")],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert "serve listening on" in proc.stderr.readline()

        async def start() -> dict:
            api = Api(sock)
            try:
                status, job = await api.call("POST", "/v1/storage-migrations", json={
                    "qmp": str(vm.qmp_path), "bandwidth": 256 * 1024,
                    "disks": [{"disk": "data", "target": str(tmp_path / "slow.raw"), "format": "raw"}]})
                assert status == 201, job
                deadline = time.monotonic() + 30
                while not (await _events_so_far(api, job["id"])):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
                return job
            finally:
                await api.close()

        asyncio.run(start())
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "stopping: rolling back" in err and "rolled-back" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
    asyncio.run(_old_disks_intact(vm, jrnl, data))
    assert not sock.exists()


@pytest.mark.e2e
async def test_bandwidth_changed_live(served, vm_factory, tmp_path):
    """PATCH of a running copy capped far below what it needs: the cap is lifted live (a bandwidth
    event), the copy completes, the guest's journal goes on on the new disk."""
    vm, _jrnl, data = await asyncio.to_thread(_guest, vm_factory, tmp_path)
    want = disk_sha256(data, "qcow2")
    _daemon, api = await served()
    new = tmp_path / "new-data.raw"
    status, job = await api.call("POST", "/v1/storage-migrations", json={
        "qmp": str(vm.qmp_path), "bandwidth": 64 * 1024, "timeout": 600,
        "disks": [{"disk": "data", "target": str(new), "format": "raw"}]})
    url = f"/v1/storage-migrations/{job['id']}"
    deadline = time.monotonic() + 30
    while not any(e["event"] == "progress" for _, e in await _events_so_far(api, job["id"])):
        assert time.monotonic() < deadline, "the copy never made progress"
        await asyncio.sleep(0.2)
    status, body = await api.call("PATCH", url, json={"bandwidth": -1})
    assert status == 400 and "less than the minimum" in " ".join(body["details"])
    status, body = await api.call("PATCH", url, data=b"{", headers={"Content-Type": "application/json"})
    assert status == 400 and "malformed JSON" in body["error"]
    status, changed = await api.call("PATCH", url, json={"bandwidth": 0})
    assert status == 200 and changed["params"]["bandwidth"] == 0, changed
    events = await asyncio.wait_for(api.events(job["id"]), 120)
    assert [e["bandwidth"] for _, e in events if e["event"] == "bandwidth"] == [0]
    assert events[-1][1]["outcome"] == "completed", events[-1]
    status, body = await api.call("PATCH", url, json={"bandwidth": 1})
    assert status == 409 and "already ended" in body["error"]
    await asyncio.to_thread(vm.stop)
    assert disk_sha256(new, "raw") == want


@pytest.mark.e2e
def test_cli_through_the_daemon_says_what_the_command_says(vm_factory, tmp_path):
    """`dataplane --daemon unix:PATH storage-migrate ...`: the same refusal line and exit status as
    the command run alone, the same JSON events and report, and a clear usage error for a command
    the daemon does not run yet."""
    vm, jrnl, data = _guest(vm_factory, tmp_path)
    want = disk_sha256(data, "qcow2")
    sock = tmp_path / "api.sock"
    serve = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--api", f"unix:{sock}",
                              "--state-dir", str(tmp_path / "state")], stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stderr is not None and "serve listening on" in serve.stderr.readline()

        def cli(*argv: str, daemon: bool = True) -> subprocess.CompletedProcess[str]:
            pre = ["--daemon", f"unix:{sock}"] if daemon else []
            return subprocess.run([sys.executable, "-m", "dataplane", *pre, *argv], capture_output=True,
                                  text=True, timeout=180)

        taken = tmp_path / "taken.raw"
        taken.write_bytes(b"")
        alone = cli("storage-migrate", "--qmp", str(vm.qmp_path), "--disk", f"data={taken}", daemon=False)
        through = cli("storage-migrate", "--qmp", str(vm.qmp_path), "--disk", f"data={taken}")
        assert alone.returncode == through.returncode == 1
        assert alone.stderr.splitlines()[-1] == through.stderr.splitlines()[-1], (alone, through)
        assert "exists; give --reuse" in through.stderr

        new = tmp_path / "new-data.raw"
        out = cli("storage-migrate", "--qmp", str(vm.qmp_path), "--disk", f"data={new}", "--format", "raw",
                  "--output", "json")
        assert out.returncode == 0, out.stderr
        events = [json.loads(line) for line in out.stdout.splitlines()]
        assert events[-1]["event"] == "report" and events[-1]["outcome"] == "completed"
        assert {"phase", "progress"} <= {e["event"] for e in events}
        assert events[-1]["disks"][0]["file"] == str(new)

        wrong = cli("certs", "init", str(tmp_path / "pki"))
        assert wrong.returncode == 2 and "certs does not run through the daemon" in wrong.stderr
        off = subprocess.run([sys.executable, "-m", "dataplane", "--daemon", f"unix:{tmp_path / 'none.sock'}",
                              "storage-migrate", "--qmp", str(vm.qmp_path), "--disk",
                              f"jrnl={tmp_path / 'j'}"], capture_output=True, text=True, timeout=60)
        assert off.returncode == 1 and "cannot reach the daemon" in off.stderr, off.stderr
    finally:
        serve.terminate()
        serve.wait(30)
    vm.stop()
    assert disk_sha256(new, "raw") == want


def test_the_api_over_tcp_takes_only_clients_with_a_trusted_certificate(tmp_path):
    """`serve --api-tcp` with `--api-certs`: a client with the certificate set's client identity gets
    answers; one without a certificate, or with one another CA issued, fails the TLS handshake."""
    import ssl

    from dataplane.channel.tls import TLSConfig, client_context

    pki, other = tmp_path / "pki", tmp_path / "other"
    for d in (pki, other):
        subprocess.run([sys.executable, "-m", "dataplane", "certs", "init", str(d)], check=True,
                       capture_output=True)
    sock = tmp_path / "api.sock"
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--api", f"unix:{sock}",
                             "--state-dir", str(tmp_path / "state"), "--api-tcp", "127.0.0.1:0",
                             "--api-certs", str(pki)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert "serve listening on" in proc.stderr.readline()
        line = proc.stderr.readline()
        assert "(mutual TLS)" in line, line
        port = int(line.split("https://127.0.0.1:", 1)[1].split()[0])

        def get(ctx: ssl.SSLContext | None) -> int:
            async def go() -> int:
                async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}/healthz",
                                                                ssl=ctx) as resp:
                    return resp.status
            return asyncio.run(go())

        from dataplane import certs

        def ctx_of(d: Path) -> ssl.SSLContext:
            """The client identity of set ``d``, trusting the daemon's server certificate."""
            mine, theirs = certs.load_cert_set(d), certs.load_cert_set(pki)
            return client_context(TLSConfig.from_paths(mine.client.cert, mine.client.key,
                                                       theirs.client.trust, theirs.server.names[0]))

        assert get(ctx_of(pki)) == 200
        bare = ssl.create_default_context(cafile=str(certs.load_cert_set(pki).client.trust))
        bare.check_hostname = False
        for ctx in (bare, ctx_of(other)):
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, OSError)):
                get(ctx)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(10)


async def test_the_node_bandwidth_budget_is_shared_equally_within_each_cap():
    """--bandwidth-budget: each running migration gets an equal share, or its own cap if lower,
    recomputed as migrations start, change and end. (The runner here is a stand-in that waits for
    its interrupt: what is tested is the daemon's sharing, on the real MigrationControl objects
    the runner would apply to its channel.)"""
    from dataplane.daemon.jobs import JobEnd
    from dataplane.daemon.server import MIGRATION

    applied: dict[str, list[int]] = {}

    async def waiting(params: dict, on_event: Any, interrupt: asyncio.Event, control: Any) -> JobEnd:
        control.on_bandwidth = lambda rate: applied.setdefault(params["to"], []).append(rate)
        await interrupt.wait()
        return JobEnd("rolled-back", None, "cancelled")

    daemon = Daemon(max_migrations=3, bandwidth_budget=300, runners={MIGRATION: waiting})
    body = {"qmp": "/x", "tls": {"plaintext": True}}
    a = daemon.submit(MIGRATION, {**body, "to": "a:1"})
    b = daemon.submit(MIGRATION, {**body, "to": "b:1", "bandwidth": 50})
    c = daemon.submit(MIGRATION, {**body, "to": "c:1"})
    await asyncio.sleep(0.05)

    def rates() -> list[int | None]:
        return [daemon.controls[j.id].bandwidth if j.id in daemon.controls else None for j in (a, b, c)]

    assert rates() == [100, 50, 100]
    daemon.change(a, {"bandwidth": 20})  # its own cap, lower than its share
    assert rates() == [20, 50, 100]
    daemon.cancel(c)
    await asyncio.sleep(0.05)
    assert rates() == [20, 50, None]  # two left: 150 each, within their own caps
    daemon.change(b, {"bandwidth": 0})  # no cap of its own: the share
    assert rates() == [20, 150, None]
    assert applied["b:1"][-1] == 150
    await daemon.shutdown()
    assert [j.state for j in (a, b, c)] == ["rolled-back"] * 3
