"""``dataplane migrate`` and ``dataplane receive``: the two roles of a cross-cluster live migration.

The work is done by :mod:`dataplane.migration.cclm`; this module parses options, opens the QMP
connection and the channel, prints progress (text or JSON lines) and maps outcomes to exit statuses
(0 completed, 1 refused or rolled back, 2 wrong command line, 3 in doubt), and settles an in-doubt
migration (``dataplane resolve``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dataplane.cli.common import (
    EXIT_OK,
    CommandFailed,
    Commands,
    InDoubt,
    StatsWriter,
    UsageError,
    add_command,
    arg_type,
    channel_client,
    channel_options,
    channel_server,
    check_connections,
    check_plaintext_address,
    check_stats_path,
    log,
    node_pair,
    non_negative_int,
    parse_bind,
    parse_to,
    positive_float,
    positive_int,
    ready,
    run_loop,
    stop_event,
    tls_config,
)
from dataplane.progress import progress_line, terminal_width
from dataplane.units import format_bytes

if TYPE_CHECKING:
    from qmp_driver import QemuDriver

__all__ = ["connect_qemu", "qemu_options", "qemu_target", "register_migration"]


# --------------------------------------------------------------------------- options


def qemu_options(parser: argparse.ArgumentParser, role: str) -> None:
    g = parser.add_argument_group(f"the {role} QEMU (one of)")
    g.add_argument("--qmp", metavar="PATH", type=Path,
                   help="the QMP unix socket of a QEMU this command may drive")
    g.add_argument("--libvirt", metavar="URI",
                   help="a libvirt URI (e.g. qemu:///system); QEMU is driven through libvirt's monitor")
    g.add_argument("--domain", metavar="NAME", help="the libvirt domain (with --libvirt)")


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=["text", "json"], default="text",
                        help="text: a live progress bar and a summary; json: one JSON object per line on "
                             "stdout (progress, decision and phase events, then the report)")
    parser.add_argument("--workdir", metavar="DIR", type=Path,
                        help="where the local unix sockets of the relays are made (default: /tmp)")


def register_migration(commands: Commands) -> None:
    """Add ``migrate`` and ``receive``."""
    mig = add_command(
        commands,
        "migrate",
        help="live-migrate a running VM and its local disks to a destination listening with `receive`",
        description=(
            "The source side of a cross-cluster live migration. Dials the destination's channel\n"
            "listener (mutual TLS), sends the plan (disks, sizes, options), and once the destination is\n"
            "ready mirrors every disk over NBD and migrates RAM and device state through the channel.\n"
            "QEMU only sees local unix sockets. At the switchover the mirrors end consistently, the\n"
            "guest moves, and this QEMU stays paused (postmigrate) for its owner to stop.\n"
            "\n"
            "Convergence (docs/migration.md): the downtime limit, auto-converge (vCPU throttling when\n"
            "the guest dirties faster than the link), stall detection (remaining RAM not shrinking by\n"
            "--stall-shrink over --stall-window), postcopy when stalled (--postcopy auto), and a\n"
            "completion timeout of --timeout-base plus --timeout-per-gib per GiB of RAM and disks\n"
            "(a smaller VM counts as one GiB).\n"
            "\n"
            "The switchover is a commit: the destination resumes the guest only after this side's QEMU\n"
            "completed and this command told it so; never do both copies run. Any failure or\n"
            "interruption (SIGINT/SIGTERM) before that rolls back: migration cancelled, mirrors\n"
            "cancelled, NBD nodes deleted, settings restored; the VM keeps running here on its untouched\n"
            "disks, and the destination is told to abort. If the two sides lose each other right at the\n"
            "commit, neither copy runs and the outcome is in-doubt: the report names the `dataplane\n"
            "resolve` command that settles it.\n"
            "\n"
            "exit status: 0 completed, 1 refused / rolled back, 2 wrong command line, 3 in doubt."
        ),
        examples=[
            ("dataplane migrate --qmp /run/vm/qmp.sock --to dst.example:7000 --certs ./pki",
             "every writable disk, TLS identities from a `certs init` directory"),
            ("dataplane migrate --libvirt qemu:///system --domain vm1 --to 10.0.0.7:7000 --cert c.crt "
             "--key c.key --ca trust.pem --peer-name dp.cluster-b.example --disk vda --multifd 4 "
             "--output json", "inside a launcher pod, one disk, multifd, JSON lines"),
            ("dataplane migrate --qmp q.sock --to dst:7000 --certs ./pki --postcopy never "
             "--auto-converge off --timeout-per-gib 60", "pure precopy with a hard deadline"),
        ],
    )
    qemu_options(mig, "source")
    mig.add_argument("--to", metavar="HOST:PORT", required=True, type=arg_type(parse_to),
                     help="the destination's `dataplane receive --listen` address")
    mig.add_argument("--disk", metavar="NODE", action="append", dest="disks",
                     help="a disk to migrate, by block node name or device id; repeat (default: every "
                          "writable disk)")
    mig.add_argument("--disk-map", metavar="NODE=DEST_NODE", action="append", dest="disk_map",
                     type=arg_type(node_pair("DEST_NODE")),
                     help="migrate disk NODE (node name or device id here) into the destination's node "
                          "DEST_NODE (node name or device id there) instead of the node of the same name: "
                          "a new volume, of any image format or backend; repeat; a mapped disk is "
                          "migrated even if --disk names others")
    mig.add_argument("--downtime-ms", metavar="MS", type=positive_int, default=300,
                     help="the downtime QEMU may take at the switchover (default: 300)")
    mig.add_argument("--multifd", metavar="N", type=non_negative_int, default=0,
                     help="RAM over N parallel multifd streams (default: 0, one stream)")
    mig.add_argument("--postcopy", choices=["never", "auto"], default="auto",
                     help="auto: switch a stalled precopy to postcopy (not with --multifd) (default: auto)")
    mig.add_argument("--auto-converge", choices=["auto", "on", "off"], default="auto",
                     help="throttle the guest's vCPUs when it dirties memory faster than the link; auto "
                          "and on enable it (QEMU throttles only when needed) (default: auto)")
    mig.add_argument("--stall-window", metavar="SECONDS", type=arg_type(positive_float),
                     default=10.0, help="stall detection window (default: 10)")
    mig.add_argument("--stall-shrink", metavar="FRACTION", type=float, default=0.05,
                     help="how much the remaining RAM must shrink over the window (default: 0.05)")
    mig.add_argument("--timeout-base", metavar="SECONDS", type=arg_type(positive_float),
                     default=120.0, help="completion timeout: fixed part (default: 120)")
    mig.add_argument("--timeout-per-gib", metavar="SECONDS", type=arg_type(positive_float),
                     default=120.0, help="completion timeout: per GiB of RAM and disks, counting at least "
                                         "one GiB (default: 120)")
    mig.add_argument("--receiver", metavar="ID",
                     help="the receiver that must take this migration when --to is a daemon's shared channel "
                          "listener (`serve --listen`): its job id, as `receive` printed it (default: the "
                          "oldest receiver there waiting for this side's certificate)")
    mig.add_argument("--connections", metavar="N", type=positive_int, default=1,
                     help="TCP connections of the channel session, 1..16 (default: 1)")
    _output_options(mig)
    channel_options(mig, side="client")
    mig.set_defaults(handler=_cmd_migrate, daemon_capable=True)

    rcv = add_command(
        commands,
        "receive",
        help="receive one live migration into a destination QEMU started with -incoming defer",
        description=(
            "The destination side of a cross-cluster live migration. The destination QEMU must run\n"
            "with `-incoming defer` (and normally -S) and have empty disks with the source's block node\n"
            "names (or the nodes `migrate --disk-map` names) and exact sizes, in any image format; they\n"
            "are reopened with discard=unmap so that the source's holes stay holes (not with\n"
            "--preallocated). Listens for the channel (mutual TLS) and takes one migration: the\n"
            "plan is validated first (a missing, smaller or read-only disk, or a different memory size,\n"
            "is refused before anything starts), then the disks are exported over NBD and the incoming\n"
            "migration set up, both on local unix sockets; this QEMU cannot start the guest by itself.\n"
            "Once it has the whole guest and the source committed, the NBD server is stopped and the\n"
            "guest resumed (unless --paused). If the source aborts or goes away before that, this run's\n"
            "exports are dropped, the guest never runs here, and this command fails; if the source goes\n"
            "away after this QEMU has the guest but before its commit, the outcome is in-doubt (see\n"
            "`dataplane resolve`). The QEMU is its owner's to stop. Prints 'dataplane: receive\n"
            "listening on HOST:PORT' on stderr once listening.\n"
            "\n"
            "exit status: 0 completed, 1 refused / rolled back, 2 wrong command line, 3 in doubt."
        ),
        examples=[
            ("dataplane receive --qmp /run/vm/qmp.sock --listen 0.0.0.0:7000 --certs ./pki",
             "standalone"),
            ("dataplane receive --libvirt qemu:///system --domain vm1 --listen :7000 --cert s.crt "
             "--key s.key --ca trust.pem --peer-name dp.cluster-a.example --output json",
             "inside a launcher pod"),
        ],
    )
    qemu_options(rcv, "destination")
    rcv.add_argument("--listen", metavar="HOST:PORT", type=arg_type(parse_bind),
                     help="where the channel listens ([IPv6]:PORT; :PORT for every interface; port 0 picks "
                          "one and prints it); required, except through a daemon with a channel listener "
                          "(`serve --listen`): then the source whose certificate carries --peer-name "
                          "migrates through that one")
    rcv.add_argument("--paused", action="store_true",
                     help="leave the guest paused on the destination after the migration")
    rcv.add_argument("--disk", metavar="NODE", action="append", dest="disks",
                     help="a disk the source may write, by block node name or device id; repeat (default: "
                          "every guest disk; a protocol, backing or unused node is never accepted)")
    rcv.add_argument("--preallocated", action="store_true",
                     help="leave the disks' nodes as configured: written zeros and the source's holes are "
                          "then allocated here (default: each disk is reopened with discard=unmap, as "
                          "KubeVirt configures disks, so that thin volumes stay thin; a disk that cannot "
                          "be is named in the report)")
    _output_options(rcv)
    channel_options(rcv, side="server")
    rcv.set_defaults(handler=_cmd_receive, daemon_capable=True)


def qemu_target(args: argparse.Namespace) -> tuple[str, Callable[[], Any]]:
    """(what, connect) for --qmp / --libvirt + --domain. Raises UsageError."""
    from qmp_driver import QemuDriver

    if args.qmp and args.libvirt:
        raise UsageError("give either --qmp or --libvirt/--domain, not both")
    if args.qmp:
        path = str(args.qmp)
        return f"QEMU at {path}", lambda: QemuDriver.connect_socket(path)
    if args.libvirt:
        if not args.domain:
            raise UsageError("--libvirt needs --domain NAME")
        uri, dom = args.libvirt, args.domain
        return f"domain {dom!r} of {uri}", lambda: QemuDriver.connect_libvirt(uri, dom)
    if args.domain:
        raise UsageError("--domain needs --libvirt URI")
    raise UsageError("which QEMU? give --qmp PATH or --libvirt URI --domain NAME")


async def connect_qemu(what: str, connect: Callable[[], Any]) -> QemuDriver:
    from qmp_driver import DriverError

    try:
        drv: QemuDriver = await connect()
    except DriverError as exc:
        raise CommandFailed(f"cannot reach the {what}: {exc}") from exc
    via = getattr(drv.transport, "libvirt_version", None)
    try:  # what this QEMU can do is read from its schema, never assumed from its version
        names = ", ".join((await drv.features()).names()) or "none of note"
    except DriverError as exc:  # only a log line depends on it: never a reason to stop
        names = f"unknown ({exc})"
    log.info("%s: QEMU %s%s; features: %s", what, drv.version, f" under libvirt {via}" if via else "", names)
    return drv


# --------------------------------------------------------------------------- output


class _Printer:
    """Renders events: JSON lines, or a progress bar (redrawn on a terminal, a line every 2 s otherwise)."""

    def __init__(self, mode: str, out: TextIO = sys.stdout) -> None:
        self.mode = mode
        self.out = out
        self.tty = out.isatty()
        self.last_line = 0.0
        self.bar_shown = False

    def __call__(self, event: dict[str, Any]) -> None:
        if self.mode == "json":
            self.out.write(json.dumps(event, default=str) + "\n")
            self.out.flush()
            return
        kind = event.get("event")
        if kind == "progress":
            self._progress(event)
        elif kind == "decision":
            self._line(f"policy: {event['action']}: {event['reason']}")
        elif kind == "phase":
            self._line(f"phase: {event['phase']}")

    def _line(self, text: str) -> None:
        if self.bar_shown and self.tty:
            self.out.write("\r\033[K")
            self.bar_shown = False
        self.out.write(text + "\n")
        self.out.flush()

    def _progress(self, e: dict[str, Any]) -> None:
        # one column less than the terminal: a line that fills the last column wraps on some terminals
        text = progress_line(e, terminal_width() - 1 if self.tty else 100)
        if text is None:
            return
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.out.flush()
            self.bar_shown = True
        elif time.monotonic() - self.last_line >= 2.0:
            self.last_line = time.monotonic()
            self._line(text)

    def report(self, rep: dict[str, Any], lines: list[str]) -> None:
        if self.mode == "json":
            self(rep)
            return
        for line in lines:
            self._line(line)


def resolve_hint(args: argparse.Namespace, role: str) -> str:
    """The ``dataplane resolve`` command line for this side, from the options it ran with."""
    from dataplane.channel.addr import format_hostport

    argv = ["dataplane", "resolve"]
    if args.qmp:
        argv += ["--qmp", str(args.qmp)]
    else:
        argv += ["--libvirt", str(args.libvirt), "--domain", str(args.domain)]
    if role == "source":
        argv += ["--to", format_hostport(*args.to)]
    else:
        argv += ["--listen", format_hostport(*args.listen)]
    if args.plaintext:
        argv.append("--plaintext")
        if args.plaintext_network_is_isolated:
            argv.append("--plaintext-network-is-isolated")
    for opt, value in (("--certs", args.certs), ("--cert", args.cert), ("--key", args.key), ("--ca", args.ca),
                       ("--peer-name", args.peer_name)):
        if value:
            argv += [opt, str(value)]
    other = "destination" if role == "source" else "source"
    return f"`{' '.join(argv)}` here, with its counterpart on the {other}"


def _source_summary(r: dict[str, Any]) -> list[str]:
    out = [f"outcome: {r['outcome']} (phase {r['phase']})"]
    if r["outcome"] == "rolled-back":
        out.append("the VM keeps running on the source, on its untouched disks")
    elif r["outcome"] == "in-doubt":
        st = r.get("source_state") or {}
        out.append(f"in doubt: the source stays stopped ({st.get('status', '?')}, migration "
                   f"{st.get('migration', '?')}); run `dataplane resolve` on both sides")
    elif r["switched_over"]:
        dest = r.get("destination") or "unconfirmed"
        out.append(f"the destination is authoritative (guest {dest}); this QEMU stays paused")
    down = f"{r['downtime_ms']} ms" if r.get("downtime_ms") is not None else "-"
    out.append(f"total time {r['total_time']:.1f} s, downtime {down} (QEMU's figure)"
               + (", postcopy" if r.get("postcopy") else ""))
    out.append(f"RAM  {format_bytes(r['ram_raw'])} raw, {format_bytes(r['ram_wire'])} on the wire")
    out.append(f"disk {format_bytes(r['disk_raw'])} raw, {format_bytes(r['disk_wire'])} on the wire")
    out.append(f"compression ratio {r['compression_ratio']:.2f}, {r['zero_pages']} zero pages elided, "
               f"{r['reconnects']} reconnects")
    if r.get("error") and r["outcome"] != "rolled-back":  # a rollback's cause is the error line on stderr
        out.append(f"error: {r['error']}")
    return out


# --------------------------------------------------------------------------- handlers


def _options(args: argparse.Namespace) -> Any:
    from dataplane.migration import MigrationOptions

    check_connections(args.connections)
    if args.multifd > 255:
        raise UsageError(f"argument --multifd: at most 255 channels, got {args.multifd}")
    if not 0 < args.stall_shrink < 1:
        raise UsageError(f"argument --stall-shrink: must be between 0 and 1, got {args.stall_shrink}")
    return MigrationOptions(
        downtime_limit_ms=args.downtime_ms, auto_converge=args.auto_converge != "off",
        multifd_channels=args.multifd, postcopy=args.postcopy, stall_window=args.stall_window,
        stall_min_shrink=args.stall_shrink, timeout_base=args.timeout_base,
        timeout_per_gib=args.timeout_per_gib)


def _vm_request(args: argparse.Namespace, *, tls: bool = True) -> dict[str, Any]:
    """The VM and channel members of a daemon request (paths made absolute: the daemon reads them);
    ``tls``: with the TLS options (not for a receiver on the daemon's shared listener)."""
    import os

    from dataplane.cli.through_daemon import tls_request

    body: dict[str, Any] = {"compress": args.compress, "grace": args.grace,
                            "bandwidth": int(args.bandwidth or 0)}
    if tls:
        body["tls"] = tls_request(args)
    if args.libvirt:
        body["libvirt"] = {"uri": args.libvirt, "domain": args.domain}
    else:
        body["qmp"] = os.path.abspath(args.qmp)
    if args.workdir is not None:
        body["workdir"] = os.path.abspath(args.workdir)
    if args.disks:
        body["disks"] = list(args.disks)
    return body


def _migrate_finish(args: argparse.Namespace, printer: _Printer, report: dict[str, Any],
                    job: dict[str, Any]) -> int:
    """A daemon job's end as ``migrate`` ends: the report, then the exit status."""
    error = job.get("error") or report.get("error") or "no reason given"
    if report.get("outcome") == "refused":
        if args.output == "json":
            printer(report)
        raise CommandFailed(error)
    if "total_time" in report:
        printer.report(report, _source_summary(report))
    if report.get("outcome") == "in-doubt":
        raise InDoubt(f"{error}; resolve with: {resolve_hint(args, 'source')}")
    if report.get("outcome") != "completed":
        raise CommandFailed(error)
    return EXIT_OK


def _cmd_migrate(args: argparse.Namespace) -> int:
    what, connect = qemu_target(args)
    options = _options(args)
    tls = tls_config(args, "client")
    check_stats_path(args.stats_json)
    printer = _Printer(args.output)
    if args.daemon is not None:
        from dataplane.channel.addr import format_hostport
        from dataplane.cli.through_daemon import through_daemon

        check_plaintext_address(args, args.to[0], tls)
        body = {**_vm_request(args), "to": format_hostport(*args.to), "downtime_ms": args.downtime_ms,
                "multifd": args.multifd, "postcopy": args.postcopy, "auto_converge": args.auto_converge,
                "stall_window": args.stall_window, "stall_shrink": args.stall_shrink,
                "timeout_base": args.timeout_base, "timeout_per_gib": args.timeout_per_gib,
                "connections": args.connections}
        if args.disk_map:
            body["disk_map"] = dict(args.disk_map)
        if args.receiver:
            body["receiver"] = args.receiver
        return through_daemon(args, "migrations", body, printer,
                              lambda report, job: _migrate_finish(args, printer, report, job),
                              "asking the daemon to roll back unless the switchover already happened")

    async def run() -> int:
        import asyncio

        from dataplane.channel.addr import format_hostport
        from dataplane.channel.errors import ChannelError, ConnectError
        from dataplane.migration import MigrationError, PlanRefused, RolledBack
        from dataplane.migration.cclm import run_source

        target = format_hostport(*args.to)
        client = channel_client(args, tls)
        stats = StatsWriter(args.stats_json, client.stats)
        try:
            await client.start()
        except (ConnectError, ChannelError) as exc:
            raise CommandFailed(str(getattr(exc, "reason", None) or exc)) from exc
        ready(f"migrate connected to {target} ({client.ready_connections} connections)")
        writer = asyncio.create_task(stats.run())
        stop = stop_event("rolling back unless the switchover already happened")
        try:
            src = await connect_qemu(what, connect)
            try:
                try:
                    rep = await run_source(client, src, disks=args.disks, options=options,
                                           workdir=args.workdir, on_event=printer, interrupt=stop,
                                           disk_map=dict(args.disk_map or []), receiver=args.receiver)
                except RolledBack as exc:
                    from dataplane.migration.cclm import CclmReport, ChannelFigures

                    figures = ChannelFigures.from_stats(client.stats())
                    d = CclmReport(exc.report, figures).as_dict()
                    printer.report(d, _source_summary(d))
                    error = exc.report.error or "no reason given"
                    after = ("a rollback step failed: check the source VM" if exc.report.rollback_errors
                             else "the VM keeps running here on its untouched disks")
                    phase = exc.report.phase
                    raise CommandFailed(f"rolled back in phase {phase}: {error}; {after}") from None
                except PlanRefused as exc:
                    if args.output == "json":
                        printer({"event": "report", "outcome": "refused", "switched_over": False,
                                 "error": str(exc)})
                    raise CommandFailed(str(exc)) from exc
                except MigrationError as exc:
                    raise CommandFailed(str(exc)) from exc
                d = rep.as_dict()
                printer.report(d, _source_summary(d))
                if rep.outcome == "in-doubt":
                    raise InDoubt(f"{rep.migration.error}; resolve with: {resolve_hint(args, 'source')}")
                return EXIT_OK
            finally:
                await src.close()
        finally:
            writer.cancel()
            stats.write()
            await client.close()

    return run_loop(run)


def _receive_lines(rep: dict[str, Any]) -> list[str]:
    """The text summary of a destination's report event (``TargetReport.as_dict()``)."""
    lines = [f"outcome: {rep['outcome']}" + (f" (guest {rep['status']})" if rep.get("status") else ""),
             f"total time {rep['total_time']:.1f} s" + (", postcopy" if rep.get("postcopy") else "")]
    lines += [f"disk {node}: holes {how}" for node, how in (rep.get("holes") or {}).items()]
    return lines


def _receive_finish(args: argparse.Namespace, printer: _Printer, rep: dict[str, Any]) -> int:
    """The report as ``receive`` prints it, then its exit status."""
    printer.report(rep, _receive_lines(rep))
    if rep["outcome"] == "in-doubt":
        raise InDoubt(f"{rep.get('error')}; resolve with: {resolve_hint(args, 'destination')}")
    if rep["outcome"] != "completed":  # the cause, as the one error line on stderr
        raise CommandFailed(f"{rep['outcome']}: {rep.get('error') or 'no reason given'}")
    return EXIT_OK


def _shared_receive(args: argparse.Namespace, printer: _Printer) -> int:
    """``--daemon ... receive`` without --listen: on the daemon's shared channel listener, for the
    source whose certificate carries --peer-name (or the client name of --certs)."""
    from dataplane.cli.through_daemon import through_daemon

    peer = args.peer_name
    if peer is None and args.certs is not None:
        from dataplane import certs

        try:
            peer = certs.load_cert_set(args.certs).client.names[0]
        except certs.CertsError as exc:
            raise CommandFailed(f"--certs: {exc}") from exc
    if not peer:
        raise UsageError("without --listen, give --peer-name NAME: the name the source's certificate "
                         "must carry (the daemon's shared listener holds the TLS identity)")
    body = {**_vm_request(args, tls=False), "peer": peer, "paused": args.paused,
            "preallocated": args.preallocated}

    def finish(report: dict[str, Any], job: dict[str, Any]) -> int:
        if "total_time" not in report:
            raise CommandFailed(str(job.get("error") or report.get("error")))
        return _receive_finish(args, printer, report)

    return through_daemon(args, "receivers", body, printer, finish,
                          "asking the daemon to abort unless the destination already took over")


def _cmd_receive(args: argparse.Namespace) -> int:
    what, connect = qemu_target(args)
    printer = _Printer(args.output)
    if args.listen is None:
        if args.daemon is None:
            raise UsageError("the following arguments are required: --listen")
        check_stats_path(args.stats_json)
        return _shared_receive(args, printer)
    tls = tls_config(args, "server")
    check_stats_path(args.stats_json)
    if args.daemon is not None:
        from dataplane.channel.addr import format_hostport
        from dataplane.cli.through_daemon import through_daemon

        def finish(report: dict[str, Any], job: dict[str, Any]) -> int:
            if "total_time" not in report:  # refused by the daemon before it started: the reason alone
                raise CommandFailed(str(job.get("error") or report.get("error")))
            return _receive_finish(args, printer, report)

        check_plaintext_address(args, args.listen[0], tls)
        body = {**_vm_request(args), "listen": format_hostport(*args.listen), "paused": args.paused,
                "preallocated": args.preallocated}
        return through_daemon(args, "receivers", body, printer, finish,
                              "asking the daemon to abort unless the destination already took over")

    async def run() -> int:
        import asyncio

        from dataplane.channel.addr import format_hostport
        from dataplane.channel.connection import os_error_text
        from dataplane.channel.server import ChannelServer
        from dataplane.migration.cclm import run_target

        host, port = args.listen
        dst = await connect_qemu(what, connect)
        stop = stop_event("aborting unless the destination already took over")
        server_box: list[ChannelServer] = []

        def make_server(on_stream: Callable[[Any], None]) -> ChannelServer:
            server = channel_server(args, tls, args.listen, on_stream=on_stream, max_sessions=4)
            server_box.append(server)
            return server

        stats = StatsWriter(args.stats_json, lambda: server_box[0].stats() if server_box else {})
        writer = asyncio.create_task(stats.run())
        try:
            try:
                rep = await run_target(
                    make_server, dst, paused=args.paused, workdir=args.workdir,
                    on_listening=lambda a: ready(f"receive listening on {format_hostport(*a)}"),
                    on_event=printer, interrupt=stop, allowed=args.disks,
                    sparse=not args.preallocated)
            except OSError as exc:
                raise CommandFailed(f"cannot listen on {format_hostport(host, port)}: "
                                   f"{os_error_text(exc)}") from exc
            return _receive_finish(args, printer, rep.as_dict())
        finally:
            writer.cancel()
            stats.write()
            await dst.close()

    return run_loop(run)
