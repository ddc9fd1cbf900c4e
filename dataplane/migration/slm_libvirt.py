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
import logging
import os
import time
from collections.abc import Sequence
from xml.sax.saxutils import quoteattr

from dataplane.storage.targets import Target, TargetError, device_size
from qmp_driver import CommandError
from qmp_driver.libvirt_blockcopy import LibvirtDisk, LibvirtDomainDisks

from .cclm_common import emit
from .errors import MigrationError, PlanRefused
from .slm import (
    CopyMonitor,
    DiskMove,
    ProgressCallback,
    SlmControl,
    SlmDisk,
    SlmOptions,
    SlmReport,
    SlmRun,
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


class _LibvirtStorageMigration(SlmRun):
    def __init__(self, lv: LibvirtDomainDisks, moves: Sequence[DiskMove], options: SlmOptions,
                 on_event: ProgressCallback | None, interrupt: asyncio.Event | None) -> None:
        super().__init__(moves, options, on_event, interrupt)
        self.lv = lv

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
            await asyncio.to_thread(self.check_holes, slm, target)
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
            await self.apply_control()
            await self.lv.block_copy(disk.device, disk.target_node, bandwidth=self.bandwidth,
                                     reuse=reuse)
            self.copying.append(disk)
            log.info("copying disk %s through libvirt to %s", disk.disk, disk.target)
        emit(self.on_event, {"event": "phase", "phase": "copy", "disks": [d.disk for d in self.disks]})

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
            self.check_interrupt()
            await self.apply_control()
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
            emit(self.on_event, {"event": "progress", "phase": "copy", "elapsed": round(now - self.t0, 3),
                       "disk_done": sum(d.copied for d in self.disks),
                       "disk_total": sum(d.length for d in self.disks), "disk_rate": rate_total})
            if ready == len(self.disks):
                return
            await asyncio.sleep(self.opts.progress_interval)

    async def converge(self, disk: SlmDisk, copy_rate: float) -> None:
        await self.throttle(disk, copy_rate, "libvirt cannot switch a running copy to write-blocking")

    async def set_write_limit(self, device: str, rate: int) -> None:
        await self.lv.throttle_writes(device, rate)

    async def set_copy_speed(self, disk: SlmDisk, rate: int) -> None:
        await self.lv.set_speed(disk.device, rate)

    async def pivot(self) -> None:
        emit(self.on_event, {"event": "phase", "phase": "pivot"})
        for disk in self.disks:
            deadline = time.monotonic() + 60
            while not await self.lv.pivot(disk.device):
                if time.monotonic() > deadline:
                    raise MigrationError(f"the copy of disk {disk.disk!r} never became ready to pivot")
                await asyncio.sleep(0.1)
            disk.pivoted = True
            self.copying.remove(disk)
            now = next((d for d in await self.lv.disks() if d.target == disk.device), None)
            disk.file = now.source if now else ""
            disk.old_released = True  # libvirt released the old nodes at the pivot
            log.info("disk %s now runs on %s", disk.disk, disk.file)
        await self.lift_throttles()

    async def rollback(self, exc: BaseException) -> SlmReport:
        errors: list[str] = []
        for disk in list(self.copying):
            try:
                if await self.lv.job(disk.device) is not None:
                    await self.lv.cancel(disk.device)
            except CommandError as e:
                errors.append(f"cancel the copy of {disk.disk}: {e.description}")
        await self.lift_throttles()
        return self.failed_report(exc, errors)

    async def transfer(self) -> None:
        await self.start()
        await self.wait_ready()
        self.check_interrupt()
        await self.pivot()

    async def finish(self) -> None:
        for disk in self.disks:
            if disk.pivoted:
                self.remove_old_file(disk)


async def storage_migrate_libvirt(lv: LibvirtDomainDisks, moves: Sequence[DiskMove],
                                  options: SlmOptions | None = None, *,
                                  on_event: ProgressCallback | None = None,
                                  interrupt: asyncio.Event | None = None,
                                  control: SlmControl | None = None) -> SlmReport:
    """Move disks of the libvirt domain behind ``lv`` to their targets (see the module).

    A disk is named by its target (``vda``), its alias or its source path. ``control`` changes the
    copy's bandwidth live (:class:`~dataplane.migration.slm.SlmControl`).

    :returns: the report, outcome ``completed``; libvirt's XML names the new sources.
    :raises PlanRefused: before anything changed (a disk missing, read-only, named twice or busy; a
        target that exists without ``reuse``, a device of another size, a blockdev JSON target).
    :raises SlmFailed: a failure or an interruption after the copy started (``exc.report``).
    :raises asyncio.CancelledError: re-raised after the rollback.
    """
    mig = _LibvirtStorageMigration(lv, moves, options or SlmOptions(), on_event, interrupt)
    mig.control = control
    report = await mig.run()
    log.info("storage migration through libvirt completed in %.1f s", report.total_time)
    return report
