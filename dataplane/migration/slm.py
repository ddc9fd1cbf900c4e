"""Storage live migration in place: move a running VM's disks to other storage, one QEMU, one node.

::

    report = await storage_migrate(drv, [DiskMove("vda", parse_target("/new/vda.qcow2", "qcow2"))])

Per disk: the target is opened (``blockdev-add`` of a protocol and a format node, with discards
passed down and written zeros unmapped, so holes stay holes), ``blockdev-mirror sync=full`` copies
the disk while the guest writes to it, and once every mirror is READY each one is completed
(``job-complete``: the pivot, the device now uses the target). The old nodes are then deleted, so
QEMU no longer holds the old file open; with ``remove_source`` the old file is deleted too.

Convergence: the copy starts in the ``background`` copy mode. When the guest dirties faster than
the copy converges (the remaining bytes do not shrink by ``stall_min_shrink`` over
``stall_window`` seconds, or the copy wrote the disk :data:`REWRITES_BEFORE_STEP` times over
without catching up), the copy is made to converge in the ``write-blocking`` copy mode (guest
writes go to both disks before they complete): ``block-job-change`` where the QEMU has it (8.2+);
on an older QEMU the copy is cancelled and started over in that mode (it copies again what it had
copied: measured on 7.2, this ends sooner and slows the guest less than throttling its writes, see
docs/slm.md). If that is not enough, the guest's writes to that disk are throttled to a quarter
of the copy rate (``block_set_io_throttle``), halved at every further stall, until the pivot. Each
step is a :class:`~dataplane.migration.policy.Decision` with its reason.

Rollback: any failure or cancellation before a disk's pivot cancels its mirror and deletes the
target nodes; the guest keeps running on its old disk, untouched (the mirror only reads it). The
target file is kept for inspection and the report names it. A failure during the pivots reports
which disk each device uses now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dataplane.aio import run_shielded
from dataplane.storage.sparse import hole_support
from dataplane.storage.targets import Target, TargetError, blockdev_nodes, prepare_target_file
from qmp_driver import BlockDevice, DriverError, DriverTimeout, QemuDriver, match

from .cclm_common import emit
from .errors import MigrationError, PlanRefused
from .plan import find_device
from .policy import NOTE, Decision

log = logging.getLogger(__name__)

__all__ = ["DiskMove", "SlmControl", "SlmDisk", "SlmFailed", "SlmOptions", "SlmReport", "storage_migrate"]

SLM_NODE_PREFIX = "dpslm"
SLM_JOB_PREFIX = "dpslm-mirror"
WRITE_BLOCKING = "write-blocking"
#: A copy that wrote this many times the disk's size without catching up does not converge.
REWRITES_BEFORE_STEP = 3
#: The lowest write rate (B/s) the policy throttles a guest's disk to.
MIN_THROTTLE = 64 << 10
THROTTLE = "throttle-guest-writes"


@dataclass(frozen=True)
class DiskMove:
    """Move guest disk ``disk`` (root node name or device id) to ``target``."""

    disk: str
    target: Target


@dataclass(frozen=True)
class SlmOptions:
    """``bandwidth``: copy speed per disk in bytes/s (0: unlimited); ``reuse``: write over an
    existing target file of the right size; ``remove_source``: delete the old file after a
    successful pivot; ``stall_window`` (s) / ``stall_min_shrink``: convergence; ``timeout``: the
    whole copy (s); ``progress_interval`` (s); ``restart_max_s``: on a QEMU that cannot switch a
    running copy to write-blocking, a copy that does not converge starts over in that mode when
    copying the whole disk again takes at most this long at the rate it copied (0: never; the
    guest's writes are throttled instead)."""

    bandwidth: int = 0
    reuse: bool = False
    remove_source: bool = False
    stall_window: float = 10.0
    stall_min_shrink: float = 0.05
    timeout: float = 3600.0
    progress_interval: float = 0.5
    restart_max_s: float = 60.0


@dataclass
class SlmDisk:
    """One disk's move, as it went: ``node`` the old format node, ``now`` the node (and ``file``
    the file) the device uses at the end; ``copied`` bytes the mirror wrote; ``mode`` the copy
    mode or convergence step at the end."""

    disk: str
    device: str
    node: str
    old_file: str
    target: str
    size: int
    target_node: str = ""
    job: str = ""
    copied: int = 0
    length: int = 0
    created: bool = False
    pivoted: bool = False
    now: str = ""
    file: str = ""
    mode: str = "background"
    old_released: bool = False
    source_removed: bool = False
    copied_at_step: int = 0  # bytes copied when the last convergence step was taken
    copied_again: int = 0  # bytes a restarted copy had copied before it started over
    holes: str = "kept"  # or "allocated: <why>": zeros written to the target cannot stay holes


@dataclass(frozen=True)
class SlmReport:
    """How a storage migration ended: ``outcome`` ``completed`` (every disk pivoted) or
    ``rolled-back`` (no disk pivoted: the VM runs on its old disks) or ``partial`` (some disks
    pivoted before a failure: ``disks`` says which device uses what)."""

    outcome: str
    total_time: float
    disks: tuple[SlmDisk, ...]
    decisions: tuple[Decision, ...] = ()
    error: str | None = None

    @property
    def copied(self) -> int:
        return sum(d.copied + d.copied_again for d in self.disks)

    def as_dict(self) -> dict[str, Any]:
        return {"event": "report", "outcome": self.outcome, "total_time": round(self.total_time, 3),
                "bytes_copied": self.copied,
                "throughput": round(self.copied / self.total_time) if self.total_time > 0 else 0,
                "error": self.error, "decisions": [d.as_dict() for d in self.decisions],
                "disks": [{"disk": d.disk, "device": d.device, "target": d.target, "size": d.size,
                           "copied": d.copied + d.copied_again, "copied_again": d.copied_again,
                           "holes": d.holes,
                           "pivoted": d.pivoted, "now": d.now, "file": d.file,
                           "mode": d.mode, "old_released": d.old_released,
                           "source_removed": d.source_removed, "target_created": d.created}
                          for d in self.disks]}


class SlmFailed(MigrationError):
    """The storage migration failed; ``report`` says what each device uses now."""

    def __init__(self, report: SlmReport) -> None:
        self.report = report
        super().__init__(f"storage migration {report.outcome}: {report.error}")


class CopyMonitor:
    """Sans-IO stall detection of a mirror, fed (time, remaining bytes).

    The remaining count of a copy the guest keeps dirtying is a sawtooth, so single samples say
    little. Time is cut into windows of ``window`` seconds; a copy converges while each window's
    lowest remaining count is ``min_shrink`` below the best of the earlier windows. A window that
    is not is a stall (reported once per window).
    """

    def __init__(self, window: float, min_shrink: float, now: float) -> None:
        self.window = window
        self.min_shrink = min_shrink
        self.start = now
        self.window_min: int | None = None
        self.best: int | None = None

    def stalled(self, now: float, remaining: int) -> bool:
        """True when the window that ``now`` closes made too little progress."""
        self.window_min = remaining if self.window_min is None else min(self.window_min, remaining)
        if now - self.start < self.window:
            return False
        low, self.window_min, self.start = self.window_min, None, now
        if self.best is None or low <= self.best * (1 - self.min_shrink):
            self.best = low if self.best is None else min(self.best, low)
            return False
        return True


ProgressCallback = Callable[[dict[str, Any]], object]


class SlmControl:
    """A handle on a running storage migration (give it to :func:`storage_migrate`): what it is
    asked to change live. :meth:`set_bandwidth` takes effect within a progress interval, on every
    copy that runs and on those that start later; it is an ``bandwidth`` event when applied."""

    def __init__(self) -> None:
        self.bandwidth: int | None = None

    def set_bandwidth(self, rate: int) -> None:
        """Copy at most ``rate`` bytes/s per disk from now on (0: unlimited).

        :raises ValueError: a negative rate.
        """
        if rate < 0:
            raise ValueError("the bandwidth must be >= 0")
        self.bandwidth = rate


class SlmRun:
    """What both ways of moving disks share (QMP here, libvirt in :mod:`.slm_libvirt`): events,
    decisions, the report, the write-limiting step of the convergence policy, removing old files,
    and the run with its shielded rollback. A subclass provides :meth:`plan`, :meth:`transfer`,
    :meth:`finish`, :meth:`rollback` and :meth:`set_write_limit`."""

    def __init__(self, moves: Sequence[DiskMove], options: SlmOptions, on_event: ProgressCallback | None,
                 interrupt: asyncio.Event | None) -> None:
        self.moves = list(moves)
        self.opts = options
        self.on_event = on_event
        self.interrupt = interrupt
        self.t0 = time.monotonic()
        self.disks: list[SlmDisk] = []
        self.decisions: list[Decision] = []
        self.throttled: dict[str, int] = {}  # device → the write rate it is throttled to (B/s)
        self.bandwidth = options.bandwidth  # the copy's speed cap now (B/s per disk, 0: none)
        self.control: SlmControl | None = None
        self.copying: list[SlmDisk] = []  # the disks whose copy job runs (their speed can be changed)

    def decide(self, action: str, reason: str) -> None:
        d = Decision(action, reason, time.monotonic() - self.t0)
        self.decisions.append(d)
        log.info("policy: %s: %s", action, reason)
        emit(self.on_event, {"event": "decision", **d.as_dict()})

    def report(self, outcome: str, error: str | None = None) -> SlmReport:
        return SlmReport(outcome, time.monotonic() - self.t0, tuple(self.disks), tuple(self.decisions), error)

    def check_interrupt(self) -> None:
        if self.interrupt is not None and self.interrupt.is_set():
            raise MigrationError("interrupted by the operator")

    async def plan(self) -> None:
        raise NotImplementedError

    async def transfer(self) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        raise NotImplementedError

    async def rollback(self, exc: BaseException) -> SlmReport:
        raise NotImplementedError

    async def set_write_limit(self, device: str, rate: int) -> None:
        """Limit the guest's writes to ``device`` to ``rate`` B/s (0: no limit)."""
        raise NotImplementedError

    async def set_copy_speed(self, disk: SlmDisk, rate: int) -> None:
        """Cap the running copy of ``disk`` at ``rate`` B/s (0: none)."""
        raise NotImplementedError

    async def apply_control(self) -> None:
        """Apply what :attr:`control` asks for since the last call (a new bandwidth)."""
        wanted = None if self.control is None else self.control.bandwidth
        if wanted is None or wanted == self.bandwidth:
            return
        self.bandwidth = wanted
        for disk in self.copying:
            try:
                await self.set_copy_speed(disk, wanted)
            except DriverError as exc:  # e.g. the job just ended: the migration goes on
                self.decide(NOTE, f"disk {disk.disk!r}: the copy's bandwidth could not be changed: {exc}")
        log.info("copy bandwidth now %s", f"{wanted} B/s per disk" if wanted else "unlimited")
        emit(self.on_event, {"event": "bandwidth", "bandwidth": wanted,
                             "elapsed": round(time.monotonic() - self.t0, 3)})

    async def throttle(self, disk: SlmDisk, copy_rate: float, first_why: str) -> None:
        """Slow the guest's writes to ``disk`` down: to a quarter of what the copy moves, then half
        of that at every further stall (``first_why`` says why write-blocking is not the answer)."""
        current = self.throttled.get(disk.device)
        rate = max(MIN_THROTTLE, int(copy_rate / 4) if current is None else current // 2)
        if current is not None and rate >= current:
            self.decide(NOTE, f"disk {disk.disk!r}: the copy still does not converge with guest writes at "
                              f"{current} B/s")
            return
        await self.set_write_limit(disk.device, rate)
        self.throttled[disk.device] = rate
        why = ("it does not even in write-blocking mode" if disk.mode == WRITE_BLOCKING else
               first_why if current is None else f"it does not with guest writes at {current} B/s")
        disk.mode = THROTTLE
        self.decide("throttle", f"disk {disk.disk!r}: the copy does not converge and {why}: guest writes "
                                f"throttled to {rate} B/s until the pivot")

    async def lift_throttles(self) -> None:
        for dev in list(self.throttled):
            with contextlib.suppress(DriverError):
                await self.set_write_limit(dev, 0)
            del self.throttled[dev]

    def check_holes(self, disk: SlmDisk, target: Target) -> None:
        """Note in ``disk.holes`` (and the log) if zeros written to ``target`` cannot stay holes."""
        why = hole_support(target)
        if why is not None:
            disk.holes = f"allocated: {why}"
            log.warning("disk %s: the target cannot keep holes (%s): written zeros will be allocated",
                        disk.disk, why)

    def remove_old_file(self, disk: SlmDisk) -> None:
        """With ``remove_source``: delete the old file of a disk that pivoted and let go of it."""
        if self.opts.remove_source and disk.old_file.startswith("/") and os.path.isfile(disk.old_file):
            try:
                os.unlink(disk.old_file)
                disk.source_removed = True
            except OSError as exc:
                log.warning("cannot remove the old file %s: %s", disk.old_file, exc)

    def failed_report(self, exc: BaseException, errors: list[str]) -> SlmReport:
        """A rollback's report: ``partial`` if a disk pivoted; kept targets and failed steps named."""
        why = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
        kept = [d.target for d in self.disks if not d.pivoted and d.created]
        if kept:
            why += f"; target kept for inspection: {', '.join(kept)}"
        why += "".join(f"; rollback: {e}" for e in errors)
        return self.report("partial" if any(d.pivoted for d in self.disks) else "rolled-back", why)

    async def run(self) -> SlmReport:
        await self.plan()
        try:
            await self.transfer()
        except BaseException as exc:
            report = await run_shielded(self.rollback(exc))
            if isinstance(exc, PlanRefused) and report.outcome == "rolled-back":
                raise
            if isinstance(exc, Exception):
                raise SlmFailed(report) from exc
            raise
        await self.finish()
        return self.report("completed")


class _StorageMigration(SlmRun):
    def __init__(self, drv: QemuDriver, moves: Sequence[DiskMove], options: SlmOptions,
                 on_event: ProgressCallback | None, interrupt: asyncio.Event | None) -> None:
        super().__init__(moves, options, on_event, interrupt)
        self.drv = drv
        self.added: list[str] = []  # target nodes added, in order (deleted in reverse on rollback)

    # -- steps

    async def plan(self) -> None:
        devices = await self.drv.query_block()
        nodes = {n.node_name: n for n in await self.drv.query_named_block_nodes()}
        jobs = {j.id for j in await self.drv.query_jobs()}
        if any(j.startswith(SLM_JOB_PREFIX) for j in jobs):
            raise PlanRefused("another storage migration of this VM is running (a dpslm-mirror job exists)")
        run = secrets.token_hex(3)  # node names of this run: a pivoted disk keeps its node for good
        seen: set[str] = set()
        for i, move in enumerate(self.moves):
            dev: BlockDevice = find_device(devices, move.disk)
            assert dev.node_name is not None
            if dev.node_name in seen:
                raise PlanRefused(f"disk {move.disk!r} is named twice")
            seen.add(dev.node_name)
            if dev.read_only:
                raise PlanRefused(f"disk {move.disk!r} is read-only")
            node = nodes[dev.node_name]
            self.moves[i] = move = DiskMove(move.disk, move.target.with_format(node.driver))
            self.disks.append(SlmDisk(move.disk, _device_id(dev), dev.node_name, node.filename,
                                      move.target.describe(), node.virtual_size,
                                      target_node=f"{SLM_NODE_PREFIX}-{run}-{i}",
                                      job=f"{SLM_JOB_PREFIX}-{run}-{i}",
                                      now=dev.node_name, file=node.filename))

    async def open_targets(self) -> None:
        for move, disk in zip(self.moves, self.disks, strict=True):
            try:
                disk.created = await asyncio.to_thread(prepare_target_file, move.target, disk.size,
                                                       reuse=self.opts.reuse)
            except TargetError as exc:
                raise PlanRefused(f"disk {disk.disk!r}: {exc}") from None
            await asyncio.to_thread(self.check_holes, disk, move.target)
            for args in blockdev_nodes(move.target, disk.target_node, disk.size):
                self.added.append(args["node-name"])
                try:
                    await self.drv.blockdev_add(args)
                except DriverError:
                    self.added.pop()
                    raise
            target = await self.drv.node(disk.target_node)
            if target.virtual_size != disk.size:
                raise PlanRefused(f"disk {disk.disk!r}: the target is {target.virtual_size} bytes, the disk "
                                  f"{disk.size}")

    async def start_mirrors(self) -> None:
        for disk in self.disks:
            await self.apply_control()
            await self.drv.blockdev_mirror(disk.job, disk.node, disk.target_node, sync="full",
                                           copy_mode="background", speed=self.bandwidth or None,
                                           auto_finalize=True, auto_dismiss=True)
            self.copying.append(disk)
            log.info("copying disk %s (%s) to %s", disk.disk, disk.node, disk.target)
        emit(self.on_event, {"event": "phase", "phase": "copy", "disks": [d.disk for d in self.disks]})

    async def wait_ready(self) -> None:
        jobs = {d.job: d for d in self.disks}
        monitors = {job: CopyMonitor(self.opts.stall_window, self.opts.stall_min_shrink, time.monotonic())
                    for job in jobs}
        ready: set[str] = set()
        deadline = time.monotonic() + self.opts.timeout
        pred = match(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"),
                     device=frozenset(jobs))
        last = (time.monotonic(), 0)
        # per job: (time, offset) when it started or the last convergence step was taken; the copy's
        # rate is averaged from there (a 7.2 mirror moves in steps of up to 16 MiB: one poll says little)
        since = {job: (time.monotonic(), 0) for job in jobs}
        stale: dict[str, int] = {}  # per job: ends of cancelled jobs it started over from, not yet seen
        with self.drv.expect(pred) as sub:
            while True:
                now = time.monotonic()
                if now > deadline:
                    raise MigrationError(f"the copy did not converge within {self.opts.timeout:g} s")
                self.check_interrupt()
                await self.apply_control()
                listed = await self.drv.query_block_jobs()
                missing = set(jobs) - ready - {j.device for j in listed}
                if missing:  # an auto-dismissed job that ended without our seeing its event
                    raise MigrationError(f"the copy of disk {jobs[min(missing)].disk!r} ended before it "
                                         f"was ready (see QEMU's log)")
                for j in listed:
                    if j.device not in jobs:
                        continue
                    log.debug("copy %s: %d of %d, ready %s", j.device, j.offset, j.length, j.ready)
                    jobs[j.device].copied, jobs[j.device].length = j.offset, j.length
                    disk = jobs[j.device]
                    if j.ready:
                        ready.add(j.device)
                    elif (monitors[j.device].stalled(now, j.length - j.offset)
                          or j.offset - disk.copied_at_step > REWRITES_BEFORE_STEP * disk.size):
                        # the remaining count does not shrink, or the copy wrote the whole disk
                        # over and over without ever catching up: make it converge
                        t, off = since[j.device]
                        rate = (j.offset - off) / (now - t) if now > t else 0.0
                        disk.copied_at_step = j.offset
                        restarted = await self.converge(disk, rate)
                        # judged afresh from here: the windows before the step say nothing of after it
                        monitors[j.device] = CopyMonitor(self.opts.stall_window, self.opts.stall_min_shrink,
                                                         time.monotonic())
                        since[j.device] = (time.monotonic(), 0 if restarted else j.offset)
                        if restarted:  # the old job's BLOCK_JOB_CANCELLED is not the new one's end
                            disk.copied_at_step = 0
                            stale[j.device] = stale.get(j.device, 0) + 1
                done = sum(d.copied for d in self.disks)
                rate = max(0.0, (done - last[1]) / (now - last[0])) if now > last[0] else 0.0
                last = (now, done)
                emit(self.on_event, {"event": "progress", "phase": "copy", "elapsed": round(now - self.t0, 3),
                           "disk_done": done, "disk_total": sum(d.length for d in self.disks),
                           "disk_rate": rate})
                if ready >= set(jobs):
                    return
                with contextlib.suppress(DriverTimeout):
                    ev = await sub.wait(self.opts.progress_interval)
                    job = str(ev.data.get("device"))
                    if ev.name == "BLOCK_JOB_READY":
                        ready.add(job)
                    elif ev.name == "BLOCK_JOB_CANCELLED" and stale.get(job):
                        stale[job] -= 1
                    else:
                        why = ev.data.get("error") or ev.data.get("msg") or ev.name
                        raise MigrationError(f"the copy of disk {jobs[job].disk!r} failed: {why}")

    async def converge(self, disk: SlmDisk, copy_rate: float) -> bool:
        """The guest dirties this disk faster than the copy converges: make it converge. Returns
        True when the copy was started over (a new job of the same id, after the old one's
        ``BLOCK_JOB_CANCELLED``)."""
        features = await self.drv.features()
        left = disk.length - disk.copied
        stalled = f"the copy does not converge ({left} bytes left after {self.opts.stall_window:g} s)"
        if disk.mode == "background" and features.block_job_change:
            await self.drv.execute("block-job-change", {"id": disk.job, "type": "mirror",
                                                        "copy-mode": WRITE_BLOCKING})
            disk.mode = WRITE_BLOCKING
            self.decide("write-blocking", f"disk {disk.disk!r}: {stalled}; guest writes now go to both "
                                          f"disks before they complete")
            return False
        again_s = disk.size / copy_rate if copy_rate > 0 else float("inf")
        if disk.mode == "background" and again_s <= self.opts.restart_max_s:
            again = await self.restart_write_blocking(disk)
            self.decide("write-blocking", f"disk {disk.disk!r}: {stalled}, and this QEMU cannot switch a "
                                          f"running copy: started over in write-blocking mode (guest "
                                          f"writes go to both disks before they complete; the {again} "
                                          f"bytes copied so far are copied again)")
            return True
        if not disk.device:
            self.decide(NOTE, f"disk {disk.disk!r}: the copy does not converge, and the disk has no "
                              f"device whose writes could be throttled")
            return False
        why = ("this QEMU cannot switch a running copy to write-blocking, and starting it over would copy "
               f"the whole disk again (~{again_s:.0f} s at {copy_rate:.0f} B/s, more than "
               f"{self.opts.restart_max_s:g} s)")
        await self.throttle(disk, copy_rate, why)
        return False

    async def restart_write_blocking(self, disk: SlmDisk) -> int:
        """Cancel the background copy of ``disk`` and start it over in write-blocking mode (same job
        id, same target node); returns the bytes the cancelled copy had copied."""
        ended = match(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"), device=disk.job)
        gone = match("JOB_STATUS_CHANGE", id=disk.job, status="null")
        with self.drv.expect(ended) as sub, self.drv.expect(gone) as dismissed:
            await self.drv.block_job_cancel(disk.job, force=True)
            ev = await sub.wait(60)
            if ev.name != "BLOCK_JOB_CANCELLED":
                raise MigrationError(f"the copy of disk {disk.disk!r} ended ({ev.name}) while it was "
                                     f"being restarted in write-blocking mode")
            await dismissed.wait(60)
        again = disk.copied
        disk.copied_again += again
        disk.copied = 0
        await self.drv.blockdev_mirror(disk.job, disk.node, disk.target_node, sync="full",
                                       copy_mode=WRITE_BLOCKING, speed=self.bandwidth or None,
                                       auto_finalize=True, auto_dismiss=True)
        disk.mode = WRITE_BLOCKING
        return again

    async def set_copy_speed(self, disk: SlmDisk, rate: int) -> None:
        await self.drv.block_job_set_speed(disk.job, rate)

    async def set_write_limit(self, device: str, rate: int) -> None:
        await self.drv.execute("block_set_io_throttle", {
            "id": device, "bps": 0, "bps_rd": 0, "bps_wr": rate, "iops": 0, "iops_rd": 0, "iops_wr": 0})

    async def pivot(self) -> None:
        self.check_interrupt()
        emit(self.on_event, {"event": "phase", "phase": "pivot"})
        for disk in self.disks:
            ended = match(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), device=disk.job)
            with self.drv.expect(ended) as sub:
                await self.drv.job_complete(disk.job)
                ev = await sub.wait(60)
            if ev.name != "BLOCK_JOB_COMPLETED" or ev.data.get("error"):
                why = ev.data.get("error") or ev.name
                raise MigrationError(f"the pivot of disk {disk.disk!r} failed: {why}")
            disk.pivoted = True
            disk.now = disk.target_node
            files = {n.node_name: n.filename for n in await self.drv.query_named_block_nodes()}
            disk.file = files.get(f"{disk.target_node}-file") or files.get(disk.target_node, "")
            self.added.remove(disk.target_node)
            self.added = [n for n in self.added if n != f"{disk.target_node}-file"]
            log.info("disk %s now runs on %s", disk.disk, disk.file or disk.target)
        await self.lift_throttles()

    async def release_old(self) -> None:
        for disk in self.disks:
            children = await _children(self.drv, disk.node)
            try:
                await self.drv.blockdev_del(disk.node)
                for child in children:
                    with contextlib.suppress(DriverError):  # a child shared with another node stays
                        await self.drv.blockdev_del(child)
                disk.old_released = True
            except DriverError as exc:
                log.warning("the old node %s of disk %s stays open: %s", disk.node, disk.disk, exc)
                continue
            self.remove_old_file(disk)

    async def rollback(self, exc: BaseException) -> SlmReport:
        log.warning("storage migration failed (%s); rolling back the disks not yet pivoted",
                    "cancelled" if isinstance(exc, asyncio.CancelledError) else exc)
        errors: list[str] = []
        for disk in self.disks:
            if disk.pivoted or not disk.job:
                continue
            try:
                if any(j.id == disk.job for j in await self.drv.query_jobs()):
                    await self.drv.block_job_cancel(disk.job, force=True)
                    await self.drv.wait_job_status(disk.job, "null", timeout=30)
            except DriverError as e:
                errors.append(f"cancel {disk.job}: {e}")
        for node in reversed(self.added):
            try:
                await self.drv.blockdev_del(node)
            except DriverError as e:
                errors.append(f"blockdev-del {node}: {e}")
        self.added.clear()
        await self.lift_throttles()
        return self.failed_report(exc, errors)

    async def transfer(self) -> None:
        await self.open_targets()
        await self.start_mirrors()
        await self.wait_ready()
        await self.pivot()

    async def finish(self) -> None:
        await self.release_old()


async def _children(drv: QemuDriver, name: str) -> list[str]:
    """The nodes directly under node ``name`` (its protocol node): from ``children`` where QEMU reports
    it (8.0+), else the protocol node that opens the same file."""
    nodes = await drv.query_named_block_nodes()
    me = next((n for n in nodes if n.node_name == name), None)
    if me is None:
        return []
    listed = me.raw.get("children")
    if isinstance(listed, list):
        return [str(c.get("node-name")) for c in listed if isinstance(c, dict) and c.get("node-name")]
    return [n.node_name for n in nodes if n.node_name != name and n.filename == me.filename
            and n.driver in ("file", "host_device") and n.node_name]


def _device_id(dev: BlockDevice) -> str:
    """What ``block_set_io_throttle`` takes as ``id``: the qdev id or path."""
    return dev.qdev or dev.device


async def storage_migrate(drv: QemuDriver, moves: Sequence[DiskMove], options: SlmOptions | None = None,
                          *, on_event: ProgressCallback | None = None,
                          interrupt: asyncio.Event | None = None,
                          control: SlmControl | None = None) -> SlmReport:
    """Move the disks of the running VM behind ``drv`` to their targets (see the module).

    ``on_event`` receives ``phase``, ``progress`` and ``decision`` events (dicts). ``interrupt``
    (e.g. set on SIGINT) stops the copy before the pivot and rolls back. ``control`` changes the
    copy's bandwidth live (:class:`SlmControl`).

    :returns: the report, outcome ``completed``; the device of each disk now uses its target.
    :raises PlanRefused: before anything changed: a disk missing, read-only or named twice, a
        target that exists (without ``reuse``), has another size or cannot be created, another
        storage migration running.
    :raises SlmFailed: a failure or a cancellation after the copy started; ``exc.report`` says
        which disks were rolled back (the guest on its old, untouched disk; the target file kept)
        and which, if any, already pivoted.
    :raises asyncio.CancelledError: re-raised after the rollback.
    """
    mig = _StorageMigration(drv, moves, options or SlmOptions(), on_event, interrupt)
    mig.control = control
    report = await mig.run()
    log.info("storage migration completed in %.1f s: %d bytes copied", report.total_time, report.copied)
    return report
