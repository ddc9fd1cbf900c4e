"""Storage live migration in place where libvirt owns QEMU (KubeVirt's launcher pods).

The same promise as :mod:`dataplane.migration.slm`, through libvirt's own block copy API only
(:class:`qmp_driver.libvirt_blockcopy.LibvirtDomainDisks`): ``virDomainBlockCopy`` to a
destination ``<disk>``, the job polled until it is ready, then ``virDomainBlockJobAbort`` with
``PIVOT``. libvirt's view of the domain stays true (its XML names the new source afterwards) and
no QMP command is sent through the monitor passthrough, so the domain is not tainted.

Differences from the QMP path: libvirt creates a missing file target itself; a blockdev JSON
target is not possible (a ``<disk>`` XML is); libvirt cannot switch a running job to
write-blocking, so a copy the guest outruns is made to converge by limiting the guest's writes to
that disk (``virDomainSetBlockIoTune``), lifted after the pivot; the old nodes are released by
libvirt at the pivot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import quoteattr

from dataplane.storage.targets import Target, TargetError, device_size
from qmp_driver import CommandError, DriverError
from qmp_driver.libvirt_blockcopy import LibvirtDisk, LibvirtDomainDisks

from .errors import MigrationError, PlanRefused
from .policy import NOTE, Decision
from .slm import (
    MIN_THROTTLE,
    CopyMonitor,
    DiskMove,
    ProgressCallback,
    SlmDisk,
    SlmFailed,
    SlmOptions,
    SlmReport,
)

log = logging.getLogger(__name__)

__all__ = ["storage_migrate_libvirt"]


def destination_xml(target: Target) -> str:
    """The ``<disk>`` libvirt's block copy takes for ``target``.

    :raises TargetError: a blockdev JSON target (libvirt takes a ``<disk>``).
    """
    if target.kind == "file":
        return (f"<disk type='file'><source file={quoteattr(str(target.path))}/>"
                f"<driver type={quoteattr(target.format)}/></disk>")
    if target.kind == "device":
        return f"<disk type='block'><source dev={quoteattr(str(target.path))}/><driver type='raw'/></disk>"
    raise TargetError("through libvirt a target is a file or a block device (a <disk>), not blockdev JSON")


class _LibvirtStorageMigration:
    def __init__(self, lv: LibvirtDomainDisks, moves: Sequence[DiskMove], options: SlmOptions,
                 on_event: ProgressCallback | None, interrupt: asyncio.Event | None) -> None:
        self.lv = lv
        self.moves = list(moves)
        self.opts = options
        self.on_event = on_event
        self.interrupt = interrupt
        self.t0 = time.monotonic()
        self.disks: list[SlmDisk] = []
        self.started: list[SlmDisk] = []
        self.decisions: list[Decision] = []
        self.throttled: dict[str, int] = {}

    def emit(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("event callback failed")

    def decide(self, action: str, reason: str) -> None:
        d = Decision(action, reason, time.monotonic() - self.t0)
        self.decisions.append(d)
        log.info("policy: %s: %s", action, reason)
        self.emit({"event": "decision", **d.as_dict()})

    def report(self, outcome: str, error: str | None = None) -> SlmReport:
        return SlmReport(outcome, time.monotonic() - self.t0, tuple(self.disks), tuple(self.decisions), error)

    async def plan(self) -> None:
        disks = await self.lv.disks()
        seen: set[str] = set()
        for i, move in enumerate(self.moves):
            disk: LibvirtDisk | None = next((d for d in disks if move.disk in (d.target, d.alias, d.source)),
                                            None)
            if disk is None:
                raise PlanRefused(f"disk {move.disk!r}: the domain has no such disk (give its target, "
                                  f"e.g. vda)")
            if disk.target in seen:
                raise PlanRefused(f"disk {move.disk!r} is named twice")
            seen.add(disk.target)
            if disk.read_only:
                raise PlanRefused(f"disk {move.disk!r} is read-only")
            if await self.lv.job(disk.target) is not None:
                raise PlanRefused(f"disk {move.disk!r}: a block job runs on it already")
            target = move.target.with_format(disk.format)
            self.moves[i] = DiskMove(move.disk, target)
            try:
                xml = destination_xml(target)
            except TargetError as exc:
                raise PlanRefused(f"disk {move.disk!r}: {exc}") from None
            size = await self.lv.capacity(disk.target)
            slm = SlmDisk(move.disk, disk.target, disk.target, disk.source, target.describe(), size,
                          target_node=xml, job=disk.target, now=disk.target, file=disk.source)
            await asyncio.to_thread(self._check_target, target, slm)
            self.disks.append(slm)

    def _check_target(self, target: Target, disk: SlmDisk) -> None:
        assert target.path is not None
        if target.kind == "device":
            if device_size(target.path) != disk.size:
                raise PlanRefused(f"disk {disk.disk!r}: {target.path} has {device_size(target.path)} bytes, "
                                  f"the disk {disk.size} (through libvirt a device must be the same size)")
            return
        if os.path.exists(target.path):
            if not self.opts.reuse:
                raise PlanRefused(f"disk {disk.disk!r}: {target.path} exists; give --reuse to write over it")
        elif not os.path.isdir(os.path.dirname(target.path)):
            raise PlanRefused(f"disk {disk.disk!r}: directory {os.path.dirname(target.path)} does not exist")
        else:
            disk.created = True  # libvirt creates it

    async def start(self) -> None:
        for move, disk in zip(self.moves, self.disks, strict=True):
            reuse = move.target.kind == "device" or not disk.created
            await self.lv.block_copy(disk.device, disk.target_node, bandwidth=self.opts.bandwidth,
                                     reuse=reuse)
            self.started.append(disk)
            log.info("copying disk %s through libvirt to %s", disk.disk, disk.target)
        self.emit({"event": "phase", "phase": "copy", "disks": [d.disk for d in self.disks]})

    async def wait_ready(self) -> None:
        o = self.opts
        monitors = {d.device: CopyMonitor(o.stall_window, o.stall_min_shrink, time.monotonic())
                    for d in self.disks}
        deadline = time.monotonic() + self.opts.timeout
        prev: dict[str, tuple[float, int]] = {}
        while True:
            now = time.monotonic()
            if now > deadline:
                raise MigrationError(f"the copy did not converge within {self.opts.timeout:g} s")
            if self.interrupt is not None and self.interrupt.is_set():
                raise MigrationError("interrupted by the operator")
            ready = 0
            rate_total = 0.0
            for disk in self.disks:
                info = await self.lv.job(disk.device)
                if info is None:
                    raise MigrationError(f"the copy of disk {disk.disk!r} ended early (see libvirt's log)")
                disk.copied, disk.length = int(info.get("cur", 0)), int(info.get("end", 0))
                rate = 0.0
                if disk.device in prev and now > prev[disk.device][0]:
                    rate = (disk.copied - prev[disk.device][1]) / (now - prev[disk.device][0])
                prev[disk.device] = (now, disk.copied)
                rate_total += max(0.0, rate)
                if disk.length and disk.copied >= disk.length:
                    ready += 1
                elif monitors[disk.device].stalled(now, disk.length - disk.copied):
                    await self.converge(disk, rate)
            self.emit({"event": "progress", "phase": "copy", "elapsed": round(now - self.t0, 3),
                       "disk_done": sum(d.copied for d in self.disks),
                       "disk_total": sum(d.length for d in self.disks), "disk_rate": rate_total})
            if ready == len(self.disks):
                return
            await asyncio.sleep(self.opts.progress_interval)

    async def converge(self, disk: SlmDisk, copy_rate: float) -> None:
        current = self.throttled.get(disk.device)
        rate = max(MIN_THROTTLE, int(copy_rate / 4) if current is None else current // 2)
        if current is not None and rate >= current:
            self.decide(NOTE, f"disk {disk.disk!r}: the copy still does not converge with guest writes at "
                              f"{current} B/s")
            return
        await self.lv.throttle_writes(disk.device, rate)
        self.throttled[disk.device] = rate
        disk.mode = "throttle-guest-writes"
        self.decide("throttle", f"disk {disk.disk!r}: the copy does not converge and libvirt cannot switch a "
                                f"running copy to write-blocking: guest writes throttled to {rate} B/s until "
                                f"the pivot")

    async def lift_throttles(self) -> None:
        for dev in list(self.throttled):
            with contextlib.suppress(DriverError):
                await self.lv.throttle_writes(dev, 0)
            del self.throttled[dev]

    async def pivot(self) -> None:
        self.emit({"event": "phase", "phase": "pivot"})
        for disk in self.disks:
            deadline = time.monotonic() + 60
            while not await self.lv.pivot(disk.device):
                if time.monotonic() > deadline:
                    raise MigrationError(f"the copy of disk {disk.disk!r} never became ready to pivot")
                await asyncio.sleep(0.1)
            disk.pivoted = True
            self.started.remove(disk)
            now = next((d for d in await self.lv.disks() if d.target == disk.device), None)
            disk.file = now.source if now else ""
            disk.old_released = True  # libvirt released the old nodes at the pivot
            log.info("disk %s now runs on %s", disk.disk, disk.file)
        await self.lift_throttles()

    def remove_sources(self) -> None:
        if not self.opts.remove_source:
            return
        for disk in self.disks:
            if disk.pivoted and disk.old_file.startswith("/") and os.path.isfile(disk.old_file):
                try:
                    os.unlink(disk.old_file)
                    disk.source_removed = True
                except OSError as exc:
                    log.warning("cannot remove the old file %s: %s", disk.old_file, exc)

    async def rollback(self, exc: BaseException) -> SlmReport:
        errors: list[str] = []
        for disk in list(self.started):
            try:
                if await self.lv.job(disk.device) is not None:
                    await self.lv.cancel(disk.device)
            except CommandError as e:
                errors.append(f"cancel the copy of {disk.disk}: {e.description}")
        await self.lift_throttles()
        why = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
        kept = [d.target for d in self.disks if not d.pivoted and d.created]
        if kept:
            why += f"; target kept for inspection: {', '.join(kept)}"
        why += "".join(f"; rollback: {e}" for e in errors)
        return self.report("partial" if any(d.pivoted for d in self.disks) else "rolled-back", why)

    async def run(self) -> SlmReport:
        await self.plan()
        try:
            await self.start()
            await self.wait_ready()
            if self.interrupt is not None and self.interrupt.is_set():
                raise MigrationError("interrupted by the operator")
            await self.pivot()
        except BaseException as exc:
            task = asyncio.ensure_future(self.rollback(exc))
            while not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            if isinstance(exc, Exception):
                raise SlmFailed(task.result()) from exc
            raise
        self.remove_sources()
        return self.report("completed")


async def storage_migrate_libvirt(lv: LibvirtDomainDisks, moves: Sequence[DiskMove],
                                  options: SlmOptions | None = None, *,
                                  on_event: ProgressCallback | None = None,
                                  interrupt: asyncio.Event | None = None) -> SlmReport:
    """Move disks of the libvirt domain behind ``lv`` to their targets (see the module).

    A disk is named by its target (``vda``), its alias or its source path.

    :returns: the report, outcome ``completed``; libvirt's XML names the new sources.
    :raises PlanRefused: before anything changed (a disk missing, read-only, named twice or busy; a
        target that exists without ``reuse``, a device of another size, a blockdev JSON target).
    :raises SlmFailed: a failure or an interruption after the copy started (``exc.report``).
    :raises asyncio.CancelledError: re-raised after the rollback.
    """
    mig = _LibvirtStorageMigration(lv, moves, options or SlmOptions(), on_event, interrupt)
    report = await mig.run()
    log.info("storage migration through libvirt completed in %.1f s", report.total_time)
    return report
