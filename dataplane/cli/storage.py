"""``dataplane storage-migrate``: move a running VM's disks to other storage, in place (one QEMU).

The work is done by :mod:`dataplane.migration.slm`; this module parses the options, opens the QMP
connection, prints progress (text or JSON lines) and maps outcomes to exit statuses (0 completed,
1 refused or rolled back or partly done, 2 wrong command line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from dataplane.cli.common import (
    EXIT_OK,
    CommandFailed,
    Commands,
    UsageError,
    add_command,
    arg_type,
    node_pair,
    parse_rate_arg,
    positive_float,
    run_loop,
    stop_event,
)
from dataplane.cli.migration import connect_qemu, qemu_options, qemu_target
from dataplane.progress import progress_line, terminal_width
from dataplane.units import format_bytes

__all__ = ["register_storage"]


def register_storage(commands: Commands) -> None:
    """Add ``storage-migrate``."""
    cmd = add_command(
        commands,
        "storage-migrate",
        help="move a running VM's disks to other storage in place (storage live migration)",
        description=(
            "Copies each named disk of the running VM to its target while the guest keeps writing,\n"
            "then switches the guest's device over to the target (the pivot) and lets go of the old\n"
            "file. One QEMU, one node: nothing else is started. A TARGET is a file path (created\n"
            "sparse with the disk's size when missing; --format says raw or qcow2, default the\n"
            "disk's own), a host block device (/dev/...: used raw up to the disk's size), or blockdev\n"
            "JSON ('{\"driver\": ...}') for any backend QEMU supports. Holes and zero regions stay\n"
            "unallocated on the target.\n"
            "\n"
            "The copy starts in the background copy mode. When the guest writes faster than the copy\n"
            "converges, guest writes are made to go to both disks (write-blocking, on QEMU 8.2+) or,\n"
            "where that is not possible or not enough, throttled until the pivot; each step is\n"
            "printed with its reason. Any failure or interruption (SIGINT/SIGTERM) before the pivot\n"
            "rolls back: the VM keeps running on its old disk, untouched; the target file is kept\n"
            "for inspection. The old file is deleted only with --remove-source. With --libvirt the\n"
            "copy goes through libvirt's block copy API (libvirt's domain XML names the new disk; no\n"
            "monitor passthrough), the target is a file or a block device, and a copy the guest\n"
            "outruns is made to converge by limiting the guest's writes to that disk.\n"
            "\n"
            "exit status: 0 completed, 1 refused / rolled back / partly done (the error line says\n"
            "which disk the VM uses now), 2 wrong command line."
        ),
        examples=[
            ("dataplane storage-migrate --qmp /run/vm/qmp.sock --disk vda=/fast/vm-vda.qcow2 --format qcow2",
             "one disk to a new qcow2 file"),
            ("dataplane storage-migrate --qmp q.sock --disk data=/dev/mapper/vg-new --bandwidth 200MiB/s",
             "onto a block device, the copy capped"),
        ],
    )
    qemu_options(cmd, "VM's")
    cmd.add_argument("--disk", metavar="NODE=TARGET", action="append", dest="disks", required=True,
                     type=arg_type(node_pair("TARGET")),
                     help="a disk (block node name or device id) and where it goes; repeat for more disks")
    cmd.add_argument("--format", choices=["raw", "qcow2"],
                     help="the image format of file targets (default: the disk's own, raw if it is neither)")
    cmd.add_argument("--reuse", action="store_true",
                     help="write over an existing target file of the disk's exact size")
    cmd.add_argument("--remove-source", action="store_true",
                     help="delete each old file after its successful pivot (never by default)")
    cmd.add_argument("--bandwidth", metavar="RATE", type=arg_type(parse_rate_arg),
                     help="cap the copy per disk: bytes/s like 100MiB/s or bits/s like 800M (default: "
                          "unlimited)")
    cmd.add_argument("--stall-window", metavar="SECONDS", type=arg_type(positive_float), default=10.0,
                     help="convergence: how long the copy may make no progress before it is made to "
                          "converge (default: 10)")
    cmd.add_argument("--timeout", metavar="SECONDS", type=arg_type(positive_float), default=3600.0,
                     help="give up (and roll back) if the copy has not converged by then (default: 3600)")
    cmd.add_argument("--output", choices=["text", "json"], default="text",
                     help="text: progress and a summary; json: one JSON object per line on stdout")
    cmd.set_defaults(handler=_cmd_storage_migrate, daemon_capable=True)


class _Printer:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.tty = sys.stdout.isatty()
        self.last = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if self.mode == "json":
            print(json.dumps(event, default=str), flush=True)
            return
        kind = event.get("event")
        if kind == "decision":
            print(f"policy: {event['action']}: {event['reason']}", flush=True)
        elif kind == "phase":
            print(f"phase: {event['phase']}", flush=True)
        elif kind == "progress" and time.monotonic() - self.last >= (0.5 if self.tty else 2.0):
            self.last = time.monotonic()
            line = progress_line(event, terminal_width() - 1 if self.tty else 100)
            if line:
                print(line, flush=True)


def _summary(report: dict[str, Any]) -> list[str]:
    """The text summary of a report event (``SlmReport.as_dict()``)."""
    out = [f"outcome: {report['outcome']} in {report['total_time']:.1f} s, "
           f"{format_bytes(report['bytes_copied'])} copied"]
    for d in report["disks"]:
        now = d["file"] or d["now"]
        extra = "" if not d["pivoted"] else (", old file removed" if d["source_removed"] else
                                             "" if d["old_released"] else ", old node still open")
        out.append(f"disk {d['disk']}: {'now on' if d['pivoted'] else 'still on'} {now} ({d['mode']}{extra})")
        if d.get("holes", "kept") != "kept":
            out.append(f"disk {d['disk']}: holes {d['holes']}")
    return out


def _finish(printer: _Printer, report: dict[str, Any], output: str) -> int:
    """Print the report as the command does; the exit status (CommandFailed unless completed)."""
    if output == "json":
        printer(report)
    else:
        for line in _summary(report) if report.get("disks") is not None else []:
            print(line, flush=True)
    if report.get("outcome") == "refused":  # nothing changed: the reason alone, as PlanRefused says it
        raise CommandFailed(str(report.get("error")))
    if report.get("outcome") != "completed":
        raise CommandFailed(f"{report.get('outcome')}: {report.get('error')}")
    return EXIT_OK


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """The daemon's StorageMigrationRequest for this command line."""
    fmt = {"format": args.format} if args.format else {}
    body: dict[str, Any] = {"disks": [{"disk": d, "target": t, **fmt} for d, t in args.disks],
                            "bandwidth": int(args.bandwidth or 0), "reuse": args.reuse,
                            "remove_source": args.remove_source, "stall_window": args.stall_window,
                            "timeout": args.timeout}
    if args.libvirt:
        body["libvirt"] = {"uri": args.libvirt, "domain": args.domain}
    else:
        body["qmp"] = os.path.abspath(args.qmp)
    return body


def _through_daemon(args: argparse.Namespace, printer: _Printer) -> int:
    from dataplane.cli.through_daemon import through_daemon

    return through_daemon(args, "storage-migrations", _request(args), printer,
                          lambda report, _job: _finish(printer, report, args.output),
                          "asking the daemon to roll back unless the pivot already happened")


def _cmd_storage_migrate(args: argparse.Namespace) -> int:
    from dataplane.storage.targets import TargetError, parse_target

    what, connect = qemu_target(args)
    moves = []
    for disk, target in args.disks:
        try:
            moves.append((disk, parse_target(target, args.format)))
        except TargetError as exc:
            raise UsageError(f"--disk {disk}={target}: {exc}") from None
    printer = _Printer(args.output)
    if args.daemon is not None:
        return _through_daemon(args, printer)

    async def run() -> int:
        from dataplane.migration import PlanRefused
        from dataplane.migration.slm import DiskMove, SlmFailed, SlmOptions, storage_migrate

        stop = stop_event("rolling back unless the pivot already happened")
        options = SlmOptions(bandwidth=int(args.bandwidth or 0), reuse=args.reuse,
                             remove_source=args.remove_source, stall_window=args.stall_window,
                             timeout=args.timeout)
        disk_moves = [DiskMove(d, t) for d, t in moves]
        drv: Any
        if args.libvirt:  # libvirt's own block copy API: libvirt must know the new disk
            from dataplane.migration.slm_libvirt import storage_migrate_libvirt
            from qmp_driver import DriverError
            from qmp_driver.libvirt_blockcopy import LibvirtDomainDisks

            try:
                drv = await LibvirtDomainDisks.open(args.libvirt, args.domain)
            except DriverError as exc:
                raise CommandFailed(f"cannot reach the {what}: {exc}") from exc
            work = storage_migrate_libvirt(drv, disk_moves, options, on_event=printer, interrupt=stop)
        else:
            drv = await connect_qemu(what, connect)
            work = storage_migrate(drv, disk_moves, options, on_event=printer, interrupt=stop)
        try:
            report = await work
        except PlanRefused as exc:
            raise CommandFailed(str(exc)) from exc
        except SlmFailed as exc:
            return _finish(printer, exc.report.as_dict(), args.output)
        finally:
            await drv.close()
        return _finish(printer, report.as_dict(), args.output)

    return run_loop(run)
