"""A storage-migration job of the daemon: its validated parameters made into a run of
:func:`dataplane.migration.slm.storage_migrate` (QMP) or
:func:`dataplane.migration.slm_libvirt.storage_migrate_libvirt` (libvirt), and its end made into
an outcome, a report and an error line, as ``dataplane storage-migrate`` would print them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from dataplane.migration import PlanRefused
from dataplane.migration.slm import DiskMove, SlmControl, SlmFailed, SlmOptions, storage_migrate
from dataplane.storage.targets import TargetError, parse_target
from qmp_driver import DriverError, QemuDriver

from . import journal
from .jobs import JobEnd

__all__ = ["run_storage_migration", "storage_moves"]


def storage_moves(params: Mapping[str, Any]) -> list[DiskMove]:
    """The disk moves of a validated request.

    :raises TargetError: a target that cannot be parsed (with the disk it belongs to).
    """
    moves = []
    for m in params["disks"]:
        try:
            moves.append(DiskMove(m["disk"], parse_target(m["target"], m.get("format"))))
        except TargetError as exc:
            raise TargetError(f"disk {m['disk']!r}: {exc}") from None
    return moves


def _refused(error: str) -> JobEnd:
    return JobEnd("refused", {"event": "report", "outcome": "refused", "error": error}, error)


async def run_storage_migration(params: Mapping[str, Any], on_event: Callable[[dict[str, Any]], None],
                                interrupt: asyncio.Event, control: SlmControl) -> JobEnd:
    """Run the storage migration ``params`` asks for (a validated ``StorageMigrationRequest``).

    ``interrupt`` set: roll back unless the pivot happened; ``control``: live changes. Never
    raises for a migration that fails or is refused (that is the job's outcome).

    :raises asyncio.CancelledError: cancelled (after the migration's own rollback).
    """
    try:
        moves = storage_moves(params)
    except TargetError as exc:
        return _refused(str(exc))
    options = SlmOptions(bandwidth=int(params.get("bandwidth", 0)), reuse=bool(params.get("reuse", False)),
                         remove_source=bool(params.get("remove_source", False)),
                         stall_window=float(params.get("stall_window", 10.0)),
                         timeout=float(params.get("timeout", 3600.0)))
    drv: Any
    try:
        if "libvirt" in params:
            from dataplane.migration.slm_libvirt import storage_migrate_libvirt
            from qmp_driver.libvirt_blockcopy import LibvirtDomainDisks

            lv = params["libvirt"]
            drv = await LibvirtDomainDisks.open(lv["uri"], lv["domain"])
            try:
                await journal.watch_libvirt(drv, {"libvirt": dict(lv)})
            except BaseException:
                await drv.close()
                raise
            work = storage_migrate_libvirt(drv, moves, options, on_event=on_event, interrupt=interrupt,
                                           control=control)
        else:
            drv = await QemuDriver.connect_socket(params["qmp"])
            try:
                await journal.watch(drv, {"qmp": params["qmp"]})
            except BaseException:
                await drv.close()
                raise
            work = storage_migrate(drv, moves, options, on_event=on_event, interrupt=interrupt,
                                   control=control)
    except (DriverError, OSError) as exc:
        where = f"libvirt domain {params['libvirt']['domain']!r}" if "libvirt" in params else params["qmp"]
        return _refused(f"cannot reach the VM ({where}): {exc}")
    try:
        report = await work
    except PlanRefused as exc:
        return _refused(str(exc))
    except SlmFailed as exc:
        return JobEnd(exc.report.outcome, exc.report.as_dict(), exc.report.error)
    except DriverError as exc:  # QEMU or libvirt failed outside the copy (planning, releasing old nodes)
        error = f"the VM's QEMU or libvirt failed: {exc}; check which disk each device uses"
        return JobEnd("failed", {"event": "report", "outcome": "failed", "error": error}, error)
    finally:
        await drv.close()
    return JobEnd("completed", report.as_dict())
