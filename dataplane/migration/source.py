"""The source side: mirror the disks into the destination's NBD exports, migrate
RAM and device state, switch over, and roll back on any failure before the
switchover completed.

::

    report = await migrate_source(src, plan, lambda disk: "/run/dst/nbd.sock", "unix:/run/dst/mig.sock",
                                  progress=print)

Where the NBD connections and the migration stream go is the caller's business:
``nbd_uri_for(disk)`` names the socket that reaches ``disk.export_name`` and
``migrate_uri`` the migration stream (today the destination's own sockets on
one host, later local relays into the cross-cluster channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qmp_driver import CommandError, DriverError, DriverTimeout, Event, QemuDriver, match

from .errors import MigrationError, PlanRefused, RolledBack
from .hooks import reached as hook_reached
from .plan import DiskPlan, MigrationOptions, MigrationPlan
from .policy import (
    FAIL,
    NOTE,
    RAISE_THROTTLE,
    SWITCH_POSTCOPY,
    ConvergenceMonitor,
    Decision,
    PolicySettings,
    completion_timeout,
)
from .report import MigrationProgress, MigrationReport
from .target import postcopy_enabled

log = logging.getLogger(__name__)

NBD_NODE_PREFIX = "dpmig-nbd"
MIRROR_JOB_PREFIX = "dpmig-mirror"

_MIGRATION_ACTIVE = frozenset({"setup", "active", "pre-switchover", "device", "postcopy-active",
                               "postcopy-paused", "postcopy-recover", "wait-unplug", "cancelling"})
_MIGRATION_END = frozenset({"completed", "failed", "cancelled"})

NbdAddress = str | Mapping[str, Any]


ProgressCallback = Callable[[MigrationProgress], object]
DecisionCallback = Callable[[Decision], object]
#: Awaited when a postcopy handed the guest over (with the QEMU status, ``postcopy-active``).
HandoverCallback = Callable[[str], Awaitable[None]]


def _nbd_server(addr: NbdAddress) -> dict[str, Any]:
    if isinstance(addr, Mapping):
        return dict(addr)
    path = str(addr)
    if path.startswith("unix:"):
        path = path[len("unix:"):]
    return {"type": "unix", "path": path}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}"


#: QEMU's largest ``downtime-limit`` (ms).
MAX_DOWNTIME_MS = 2_000_000


class MigrationControl:
    """A handle on a running migration (give it to :func:`migrate_source` / ``run_source``): what
    it is asked to change live. :meth:`set_downtime` takes effect within a progress interval while
    RAM is being copied (``migrate-set-parameters downtime-limit``; a ``decision`` event, action
    ``note``) and is restored with the other parameters afterwards. :meth:`set_bandwidth` calls
    ``on_bandwidth`` (the channel's cap, set by whoever owns the channel)."""

    def __init__(self) -> None:
        self.downtime_ms: int | None = None
        self.bandwidth: int | None = None
        self.on_bandwidth: Callable[[int], None] | None = None

    def set_downtime(self, ms: int) -> None:
        """Let the switchover pause the guest for at most ``ms`` milliseconds from now on.

        :raises ValueError: not within 1..MAX_DOWNTIME_MS.
        """
        if not 1 <= ms <= MAX_DOWNTIME_MS:
            raise ValueError(f"the downtime limit must be 1..{MAX_DOWNTIME_MS} ms, not {ms}")
        self.downtime_ms = ms

    def set_bandwidth(self, rate: int) -> None:
        """Send at most ``rate`` bytes/s from now on (0: unlimited). :raises ValueError: negative."""
        if rate < 0:
            raise ValueError("the bandwidth must be >= 0")
        self.bandwidth = rate
        if self.on_bandwidth is not None:
            self.on_bandwidth(rate)


class _SourceMigration:
    def __init__(self, src: QemuDriver, plan: MigrationPlan, nbd_uri_for: Callable[[DiskPlan], NbdAddress],
                 migrate_uri: str, options: MigrationOptions, progress: ProgressCallback | None,
                 on_decision: DecisionCallback | None = None,
                 control: MigrationControl | None = None) -> None:
        self.src = src
        self.control = control
        self.plan = plan
        self.nbd_uri_for = nbd_uri_for
        self.migrate_uri = migrate_uri
        self.opts = options
        self.progress = progress
        self.t0 = time.monotonic()
        self.phase = "preparing"
        self.jobs = {f"{MIRROR_JOB_PREFIX}{i}": d for i, d in enumerate(plan.disks)}
        self.targets = {job: f"{NBD_NODE_PREFIX}{i}" for i, job in enumerate(self.jobs)}
        self.added_nodes: list[str] = []
        self.started_jobs: list[str] = []
        self.ready: set[str] = set()
        self.ended: dict[str, Event] = {}
        self.cancelling = False
        self.saved_caps: dict[str, bool] | None = None
        self.set_caps: dict[str, bool] = {}
        self.saved_params: dict[str, Any] | None = None
        self.set_params: dict[str, Any] = {}
        self.migrate_started = False
        self.was_running = True
        self.disk_offsets: dict[str, tuple[int, int]] = {}
        self.disk_sample: tuple[float, int] | None = None
        self.disk_rate = 0.0
        self.ram = MigrationProgress("", 0.0)
        self.downtime_ms: int | None = None
        self.final: MigrationReport | None = None
        self.on_decision = on_decision
        self.decisions: list[Decision] = []
        total = plan.memory_size + sum(d.size for d in plan.disks)
        o = options
        self.timeout = completion_timeout(o.timeout_base, o.timeout_per_gib, total)
        self.precopy_timeout = o.precopy_timeout if o.precopy_timeout is not None else self.timeout
        self.mirror_timeout = o.mirror_timeout if o.mirror_timeout is not None else self.timeout
        self.postcopy = postcopy_enabled(o)
        self.postcopy_requested = False
        self.postcopy_running = False  # migrate-continue went through in postcopy: no way back
        self.continue_issued = False  # migrate-continue was sent (it may not have returned)
        self.on_handover: HandoverCallback | None = None
        self.monitor: ConvergenceMonitor | None = None

    # ------------------------------------------------------------- reporting

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def disk_done(self) -> int:
        return sum(off for off, _ in self.disk_offsets.values())

    def emit(self) -> None:
        if self.progress is None:
            return
        done = self.disk_done()
        r = self.ram
        sample = MigrationProgress(
            self.phase, self.elapsed(), done, sum(n for _, n in self.disk_offsets.values()), self.disk_rate,
            r.ram_done, r.ram_total, r.ram_remaining, r.ram_rate, r.dirty_rate, r.cpu_throttle)
        try:
            self.progress(sample)
        except Exception:  # a broken observer must not break the migration
            log.exception("progress callback failed")

    async def sample_disks(self) -> None:
        for job in await self.src.query_block_jobs():
            if job.device in self.jobs:
                self.disk_offsets[job.device] = (job.offset, job.length)
                if job.ready:  # the event is the fast path; polling covers a lost one
                    self.ready.add(job.device)
        now, done = time.monotonic(), self.disk_done()
        if self.disk_sample is not None and now > self.disk_sample[0]:
            self.disk_rate = max(0.0, (done - self.disk_sample[1]) / (now - self.disk_sample[0]))
        self.disk_sample = (now, done)

    async def sample_ram(self) -> Any:
        info = await self.src.query_migrate()
        r = info.ram
        self.ram = MigrationProgress("", 0.0, ram_done=r.transferred, ram_total=r.total,
                                     ram_remaining=r.remaining, ram_rate=r.mbps * 1e6 / 8,
                                     dirty_rate=r.dirty_pages_rate * 4096.0,
                                     cpu_throttle=info.cpu_throttle_percentage)
        if info.downtime_ms is not None:
            self.downtime_ms = info.downtime_ms
        return info

    def report(self, outcome: str, phase: str, error: str | None = None,
               rollback_errors: tuple[str, ...] = ()) -> MigrationReport:
        return MigrationReport(outcome, phase, self.elapsed(), self.downtime_ms, self.ram.ram_done,
                               self.disk_done(), error, self.postcopy_requested, tuple(self.decisions),
                               rollback_errors)

    def decide(self, decision: Decision) -> None:
        self.decisions.append(decision)
        log.info("policy: %s: %s", decision.action, decision.reason)
        if self.on_decision is not None:
            try:
                self.on_decision(decision)
            except Exception:
                log.exception("decision callback failed")

    # -------------------------------------------------------------- job events

    def handle_job_event(self, ev: Event) -> None:
        job = str(ev.data.get("device", ""))
        if ev.name == "BLOCK_JOB_READY":
            self.ready.add(job)
            return
        self.ended[job] = ev
        if not self.cancelling:
            why = ev.data.get("error") or ("cancelled" if ev.name == "BLOCK_JOB_CANCELLED" else "ended")
            raise MigrationError(f"mirror of disk {self.jobs[job].node_name!r} stopped early: {why}")

    async def drain_job_events(self, sub: Any) -> None:
        while sub.pending():
            self.handle_job_event(await sub.wait(0))

    async def wait_jobs_gone(self, jobs: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.src.expect(match("JOB_STATUS_CHANGE", id=frozenset(jobs), status="null")) as gone:
            while True:
                left = [j.id for j in await self.src.query_jobs() if j.id in jobs]
                if not left:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MigrationError(f"block jobs {left} still present after {timeout:g} s")
                with contextlib.suppress(DriverTimeout):
                    await gone.wait(min(remaining, 1.0))

    # ------------------------------------------------------------------ steps

    async def preflight(self) -> None:
        status = await self.src.query_status()
        if status.status not in ("running", "paused"):
            raise PlanRefused(f"the source VM is {status.status!r}, not running or paused")
        self.was_running = status.running
        info = await self.src.query_migrate()
        if info.status in _MIGRATION_ACTIVE:
            raise PlanRefused(f"a migration is already in progress ({info.status})")
        nodes = {n.node_name: n for n in await self.src.query_named_block_nodes()}
        for disk in self.plan.disks:
            node = nodes.get(disk.node_name)
            if node is None:
                raise PlanRefused(f"disk {disk.node_name!r}: no such block node on the source")
            if node.virtual_size != disk.size:
                raise PlanRefused(f"disk {disk.node_name!r}: the source is {node.virtual_size} bytes, "
                                  f"the plan says {disk.size}")
        clash = set(self.targets.values()) & set(nodes)
        clash |= {j.id for j in await self.src.query_jobs()} & set(self.jobs)
        if clash:
            raise PlanRefused(f"nodes or jobs {sorted(clash)} exist already: another migration is running")

    async def start_mirrors(self) -> None:
        self.phase = "mirror"
        for job, disk in self.jobs.items():
            node = self.targets[job]
            self.added_nodes.append(node)  # before the command: a half-done add is still cleaned up
            try:
                target: dict[str, Any] = {"driver": "nbd", "node-name": node, "export": disk.export_name,
                                          "server": _nbd_server(self.nbd_uri_for(disk)),
                                          "detect-zeroes": "off"}
                if self.opts.mirror_detect_zeroes:
                    # the mirror's zero writes for the source's holes, and the guest's written zeros,
                    # go out as WRITE_ZEROES that may unmap: a destination node opened with
                    # discard=unmap keeps them as holes (libvirt's sequence has neither)
                    target.update({"detect-zeroes": "unmap", "discard": "unmap"})
                await self.src.blockdev_add(target)
            except CommandError:
                self.added_nodes.remove(node)
                raise
            self.started_jobs.append(job)
            o = self.opts
            await self.src.blockdev_mirror(job, disk.node_name, node, sync="full", speed=o.mirror_speed,
                                           granularity=o.mirror_granularity, buf_size=o.mirror_buf_size,
                                           copy_mode=o.mirror_copy_mode, auto_finalize=True,
                                           auto_dismiss=True)
            log.info("mirroring %s to export %r", disk.node_name, disk.export_name)

    async def wait_mirrors_ready(self, sub: Any) -> None:
        deadline = time.monotonic() + self.mirror_timeout
        while True:
            await self.drain_job_events(sub)
            await self.sample_disks()
            self.emit()
            if self.ready >= set(self.jobs):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationError(f"mirrors not READY within {self.mirror_timeout:g} s")
            with contextlib.suppress(DriverTimeout):
                self.handle_job_event(await sub.wait(min(remaining, self.opts.progress_interval)))
        self.phase = "mirror-ready"
        self.emit()

    async def set_migration_parameters(self) -> None:
        self.saved_caps = await self.src.query_migrate_capabilities()
        self.saved_params = await self.src.query_migrate_parameters()
        o = self.opts
        caps = {"events": True, "pause-before-switchover": True, "auto-converge": o.auto_converge,
                "multifd": bool(o.multifd_channels), "postcopy-ram": self.postcopy}
        if o.postcopy == "auto" and not self.postcopy:
            self.decide(Decision(NOTE, f"postcopy disabled: QEMU cannot combine it with multifd "
                                       f"({o.multifd_channels} channels)", self.elapsed()))
        self.set_caps = caps
        await self.src.migrate_set_capabilities(caps)
        downtime = o.downtime_limit_ms
        if self.control is not None and self.control.downtime_ms is not None:
            downtime = self.control.downtime_ms
        params: dict[str, Any] = {"max-bandwidth": o.max_bandwidth, "downtime-limit": downtime}
        if o.multifd_channels:
            params["multifd-channels"] = o.multifd_channels
        self.set_params = params
        await self.src.migrate_set_parameters(params)
        self.monitor = ConvergenceMonitor(PolicySettings(
            auto_converge=o.auto_converge, postcopy=self.postcopy, stall_window=o.stall_window,
            stall_min_shrink=o.stall_min_shrink, completion_timeout=self.precopy_timeout), time.monotonic())

    async def precopy(self, jobs_sub: Any) -> None:
        self.phase = "precopy"
        stops = frozenset({"pre-switchover", *_MIGRATION_END})
        # The policy fails an active precopy at its completion timeout; this bounds a stuck setup too.
        deadline = time.monotonic() + self.precopy_timeout + 5 * self.opts.progress_interval
        with self.src.expect(match("MIGRATION", status=stops)) as mig:
            self.migrate_started = True  # before the command: an interrupted `migrate` is still cancelled
            await self.src.migrate(self.migrate_uri)
            while True:
                if time.monotonic() > deadline:
                    raise MigrationError(f"RAM precopy did not reach switchover within "
                                         f"{self.precopy_timeout:g} s")
                await self.drain_job_events(jobs_sub)
                info = await self.sample_ram()
                await self.sample_disks()
                self.emit()
                if info.status == "active":
                    await self.apply_control()
                    await self.apply_policy(info)
                elif info.status == "pre-switchover":  # the event is the fast path; polling covers a lost one
                    return
                elif info.status in _MIGRATION_END:
                    raise MigrationError(f"migration {info.status} during precopy: "
                                         f"{info.error_desc or 'no reason'}")
                try:
                    ev = await mig.wait(self.opts.progress_interval)
                except DriverTimeout:
                    continue
                status = str(ev.data.get("status"))
                if status == "pre-switchover":
                    return
                info = await self.src.query_migrate()
                raise MigrationError(f"migration {status} during precopy: {info.error_desc or 'no reason'}")

    async def apply_control(self) -> None:
        """Apply a downtime limit asked for live (:class:`MigrationControl`)."""
        want = self.control.downtime_ms if self.control is not None else None
        if want is None or want == self.set_params.get("downtime-limit"):
            return
        await self.src.migrate_set_parameters({"downtime-limit": want})
        self.set_params["downtime-limit"] = want  # restored afterwards like the others
        self.decide(Decision(NOTE, f"downtime limit set to {want} ms (asked live)", self.elapsed()))

    async def apply_policy(self, info: Any) -> None:
        assert self.monitor is not None
        r = self.ram
        for d in self.monitor.observe(time.monotonic(), info.ram.remaining, info.ram.dirty_sync_count,
                                      info.cpu_throttle_percentage, r.dirty_rate, r.ram_rate):
            self.decide(d)
            if d.action == FAIL:
                raise MigrationError(d.reason)
            if d.action == RAISE_THROTTLE:
                self.set_params.update(d.params)  # restored afterwards like the others
                await self.src.migrate_set_parameters(d.params)
            if d.action == SWITCH_POSTCOPY:
                self.postcopy_requested = True
                await self.src.migrate_start_postcopy()

    async def switchover(self, jobs_sub: Any) -> None:
        self.phase = "switchover"
        await self.drain_job_events(jobs_sub)
        await self.sample_ram()
        await self.sample_disks()
        self.emit()
        deadline = time.monotonic() + self.opts.switchover_timeout
        # The guest is stopped now: a non-forced cancel leaves each target a complete copy.
        self.cancelling = True
        for job in self.jobs:
            await self.src.block_job_cancel(job, force=False)
        while not set(self.jobs) <= set(self.ended):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationError("mirrors did not end after block-job-cancel")
            self.handle_job_event(await jobs_sub.wait(remaining))
        for job, ev in self.ended.items():
            if ev.name != "BLOCK_JOB_COMPLETED" or ev.data.get("error"):
                raise MigrationError(f"mirror of disk {self.jobs[job].node_name!r} did not complete cleanly: "
                                     f"{ev.name} {ev.data.get('error') or ''}".strip())
        await self.wait_jobs_gone(list(self.jobs), max(1.0, deadline - time.monotonic()))
        self.started_jobs.clear()
        for node in list(self.added_nodes):
            await self.src.blockdev_del(node)
            self.added_nodes.remove(node)
        await hook_reached("before-continue")
        with self.src.expect(match("MIGRATION", status=_MIGRATION_END)) as mig:
            # From here a postcopy may have handed the guest over even if the call does not return.
            self.continue_issued = True
            await self.src.migrate_continue("pre-switchover")
            await hook_reached("after-continue")
            if self.postcopy_requested:
                # The guest's state now moves to the destination; what is left of RAM follows on demand.
                self.postcopy_running = True
                self.phase = "postcopy"
                self.emit()
                if self.on_handover is not None:
                    await self.on_handover("postcopy-active")
                deadline = max(deadline, time.monotonic() + self.timeout)
                ev = await self._wait_postcopy(mig, deadline)
            else:
                ev = await mig.wait(max(1.0, deadline - time.monotonic()))
        status = str(ev.data.get("status"))
        if status != "completed":
            info = await self.src.query_migrate()
            raise MigrationError(f"migration {status} at switchover: {info.error_desc or 'no reason'}")
        await self.sample_ram()
        self.phase = "completed"
        self.emit()

    async def _wait_postcopy(self, mig: Any, deadline: float) -> Event:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationError("postcopy did not complete within the completion timeout")
            try:
                return await mig.wait(min(remaining, self.opts.progress_interval))
            except DriverTimeout:
                await self.sample_ram()
                self.emit()

    async def restore_settings(self, errors: list[str]) -> None:
        if self.saved_caps is not None and self.set_caps:
            caps = {k: self.saved_caps.get(k, False) for k in self.set_caps}
            await self._step(errors, "restore capabilities", self.src.migrate_set_capabilities(caps))
        if self.saved_params is not None and self.set_params:
            params = {k: self.saved_params[k] for k in self.set_params if k in self.saved_params}
            await self._step(errors, "restore parameters", self.src.migrate_set_parameters(params))

    @staticmethod
    async def _step(errors: list[str], what: str, aw: Awaitable[Any]) -> None:
        try:
            await aw
        except (DriverError, MigrationError) as exc:
            log.warning("rollback: %s failed: %s", what, exc)
            errors.append(f"{what}: {exc}")

    async def rollback(self, exc: BaseException) -> MigrationReport:
        reached = self.phase
        log.warning("migration failed in phase %s (%s); rolling back", reached, _describe(exc))
        errors: list[str] = []
        src = self.src
        status = "unknown"
        if self.migrate_started:
            with contextlib.suppress(DriverError):
                status = (await src.query_migrate()).status
        if self.postcopy_running or status.startswith("postcopy-") or (
                self.postcopy_requested and self.continue_issued and status == "unknown"):
            # Any postcopy status means the guest's state moved on: the source must never be resumed.
            if status == "completed":
                return await self._completed_anyway(exc)
            # QEMU restarts a source whose postcopy failed early (in postcopy_start) by itself; the
            # guest's state may already run on the destination: stop this copy again at once
            note = ""
            with contextlib.suppress(DriverError):
                if (await src.query_status()).running:
                    await src.stop()
                    note = "; QEMU had restarted the source by itself: stopped it again"
            log.error("postcopy failed (%s, status %s): the destination is authoritative; the source "
                      "stays paused%s", _describe(exc), status, note)
            return self.report("failed-after-switchover", reached,
                               f"{_describe(exc)} (migration {status}){note}")
        if self.migrate_started:
            try:
                if status == "completed":  # the switchover happened: nothing to roll back
                    return await self._completed_anyway(exc)
                if status in _MIGRATION_ACTIVE:
                    await src.migrate_cancel()
                    status = await src.wait_migration(_MIGRATION_END, timeout=30)
                    if status == "completed":  # it completed before the cancel took effect
                        return await self._completed_anyway(exc)
            except (DriverError, MigrationError) as e:
                errors.append(f"migrate_cancel: {e}")
        self.phase = "rolling-back"
        self.emit()
        self.cancelling = True
        if self.started_jobs:
            try:
                present = [j.id for j in await src.query_jobs() if j.id in self.started_jobs]
                for job in present:
                    await self._step(errors, f"cancel {job}", src.block_job_cancel(job, force=True))
                await self.wait_jobs_gone(self.started_jobs, 30)
            except (DriverError, MigrationError) as e:
                errors.append(f"cancel mirrors: {e}")
        for node in list(self.added_nodes):
            await self._step(errors, f"blockdev-del {node}", src.blockdev_del(node))
        await self.restore_settings(errors)
        if self.was_running:
            await self._step(errors, "resume the source", self._ensure_running())
        error = _describe(exc) + "".join(f"; rollback: {e}" for e in errors)
        return self.report("rolled-back", reached, error, tuple(errors))

    async def _completed_anyway(self, exc: BaseException) -> MigrationReport:
        """The source QEMU completed although this run failed: the report says so (the caller
        decides whether the guest is handed over or taken back)."""
        self.phase = "completed"
        with contextlib.suppress(DriverError):
            await self.sample_ram()
        return self.report("completed", "completed", f"completed despite: {_describe(exc)}")

    async def _ensure_running(self) -> None:
        # QEMU resumes a source it stopped for the switchover by itself once the
        # migration is cancelled; give that a moment, then resume explicitly.
        deadline = time.monotonic() + 5
        while True:
            status = await self.src.query_status()
            if status.running:
                return
            if time.monotonic() > deadline:
                if status.status == "paused":
                    await self.src.cont()
                    return
                raise MigrationError(f"the source is {status.status!r} after rollback")
            await asyncio.sleep(0.1)

    async def run(self) -> MigrationReport:
        await self.preflight()
        pred = match(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
                     device=frozenset(self.jobs))
        with self.src.expect(pred) as jobs_sub:
            try:
                await self.start_mirrors()
                await self.wait_mirrors_ready(jobs_sub)
                await self.set_migration_parameters()
                await self.precopy(jobs_sub)
                await self.switchover(jobs_sub)
            except BaseException as exc:
                report = await self._shielded_rollback(exc)
                self.final = report
                if report.outcome == "completed" and not isinstance(exc, asyncio.CancelledError):
                    return report
                if report.outcome == "failed-after-switchover" and isinstance(exc, Exception):
                    raise MigrationError(f"migration failed after the switchover to the destination: "
                                         f"{report.error}") from exc
                if isinstance(exc, Exception):
                    raise RolledBack(report) from exc
                raise
        # The source QEMU completed: say so before anything else can be interrupted, so that the
        # caller always learns it (and can hand the guest over, or take it back).
        self.final = self.report("completed", "completed")
        errors: list[str] = []
        restore = asyncio.ensure_future(self.restore_settings(errors))  # it may be a migration target later
        try:
            await asyncio.shield(restore)
        finally:
            if not restore.done():  # cancelled meanwhile: finish the restore, then let it propagate
                await asyncio.gather(restore, return_exceptions=True)
            if errors:
                self.final = self.report("completed", "completed", "; ".join(errors))
        return self.final

    async def _shielded_rollback(self, exc: BaseException) -> MigrationReport:
        task = asyncio.ensure_future(self.rollback(exc))
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():
                    log.warning("rollback in progress; the cancellation is delivered once it is done")
        return task.result()


async def migrate_source(src: QemuDriver, plan: MigrationPlan, nbd_uri_for: Callable[[DiskPlan], NbdAddress],
                         migrate_uri: str, options: MigrationOptions | None = None, *,
                         progress: ProgressCallback | None = None,
                         on_decision: DecisionCallback | None = None,
                         on_report: Callable[[MigrationReport], object] | None = None,
                         on_handover: HandoverCallback | None = None,
                         control: MigrationControl | None = None) -> MigrationReport:
    """Live-migrate the VM behind ``src`` with the disks of ``plan``.

    Sequence: an NBD client node per disk (``nbd_uri_for(disk)``: a unix
    socket path, ``unix:PATH`` or a QMP SocketAddress that reaches export
    ``disk.export_name``), ``blockdev-mirror sync=full`` into it, READY on all;
    the ``events`` / ``pause-before-switchover`` (/ ``auto-converge``)
    capabilities and ``max-bandwidth`` / ``downtime-limit`` (previous values
    saved); ``migrate`` to ``migrate_uri``; at ``pre-switchover`` a non-forced
    cancel of every mirror, ``blockdev-del`` of the NBD nodes,
    ``migrate-continue``, and ``completed``. The destination must have been
    prepared with :func:`~dataplane.migration.target.prepare_target`.

    With ``multifd_channels`` the ``multifd`` capability and channel count
    are set (the destination needs the same, see
    :func:`~dataplane.migration.target.prepare_target`); with
    ``postcopy="auto"`` (and no multifd) ``postcopy-ram`` is enabled and the
    convergence policy (:mod:`dataplane.migration.policy`) may switch a
    stalled precopy to postcopy; with ``auto_converge`` QEMU throttles the
    guest when dirtying outruns the link. Precopy fails at the completion
    timeout (``precopy_timeout``, default ``timeout_base + timeout_per_gib``
    per GiB of RAM and disks).

    ``options`` defaults to ``plan.options``. ``progress`` is called with a
    :class:`MigrationProgress` about every ``options.progress_interval``
    seconds and at each phase change; ``on_decision`` with every
    :class:`~dataplane.migration.policy.Decision` of the policy;
    ``on_report`` with the final :class:`MigrationReport` (also when the
    task is cancelled); ``on_handover(status)`` is awaited right after
    ``migrate-continue`` of a postcopy (status ``postcopy-active``): from
    then on the guest's state lives on the destination, which may resume.
    After a precopy the source QEMU is ``completed`` (stopped, postmigrate)
    when this returns; handing over or taking back the guest is the caller's
    decision (``cont`` resumes a completed source whose destination never
    ran). ``control`` changes the downtime limit live (:class:`MigrationControl`).

    On any failure or cancellation before the switchover completed the
    migration is rolled back: ``migrate_cancel``, forced cancel of the
    mirrors, ``blockdev-del`` of the NBD nodes, capabilities and parameters
    restored; the source keeps running on its own disks. A rollback is not
    itself interrupted by a second cancellation.

    :returns: the report, outcome ``completed``.
    :raises PlanRefused: before anything changed (source not running or
        paused, a disk missing or resized, a migration already in progress).
    :raises RolledBack: the migration failed and was rolled back
        (``exc.report``, outcome ``rolled-back``; ``__cause__`` the failure).
    :raises MigrationError: postcopy had started and then failed: the
        destination is authoritative and the source stays paused.
    :raises asyncio.CancelledError: re-raised after the rollback.
    """
    mig = _SourceMigration(src, plan, nbd_uri_for, migrate_uri, options or plan.options, progress,
                           on_decision, control)
    mig.on_handover = on_handover
    try:
        return await mig.run()
    finally:
        final = mig.final
        if final is not None:
            log.info("%s", final.summary())
            if on_report is not None:
                try:
                    on_report(final)
                except Exception:
                    log.exception("report callback failed")
