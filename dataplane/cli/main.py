"""The ``dataplane`` parser and entry point: every command group, and one error line per failure."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from dataplane import __version__
from dataplane.cli.certs import register_certs
from dataplane.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CommandFailed,
    Commands,
    Parser,
    UsageError,
)
from dataplane.cli.migration import register_migration
from dataplane.cli.resolve import register_resolve
from dataplane.cli.serve import register_serve
from dataplane.cli.storage import register_storage
from dataplane.cli.tunnel import register_tunnel

__all__ = ["COMMAND_GROUPS", "build_parser", "main"]

#: Every command group, in the order of ``dataplane --help``.
COMMAND_GROUPS: list[Callable[[Commands], None]] = [
    register_migration,
    register_resolve,
    register_storage,
    register_serve,
    register_tunnel,
    register_certs,
]


def build_parser() -> argparse.ArgumentParser:
    """The complete ``dataplane`` parser (every group of :data:`COMMAND_GROUPS`)."""
    parser = Parser(
        prog=PROG,
        description=(
            "dataplane: live migration of running QEMU/KVM VMs and their non-shared disks across\n"
            "clusters (CCLM), and storage live migration (SLM) in place or onto another node's new\n"
            "volumes (`migrate --disk-map`), through QMP or libvirt; `serve` runs the node daemon."
        ),
        epilog=(
            "examples:\n"
            "  # live-migrate a VM and its disks to another cluster\n"
            "  dataplane receive --qmp /run/dst/qmp.sock --listen 0.0.0.0:7000 --certs ./pki   # cluster B\n"
            "  dataplane migrate --qmp /run/src/qmp.sock --to dst:7000 --certs ./pki            # cluster A\n"
            "\n"
            "  # move a running VM's disk to a new qcow2 file on the same node\n"
            "  dataplane storage-migrate --qmp /run/vm/qmp.sock --disk vda=/fast/vda.qcow2 --format qcow2\n"
            "\n"
            "  # certificates for the channel's mutual TLS\n"
            "  dataplane certs init ./pki\n"
            "\n"
            "  # carry a local socket to another cluster\n"
            "  dataplane tunnel listen --bind 0.0.0.0:7000 --certs ./pki --forward mig=unix:/run/dst.sock\n"
            "  dataplane tunnel connect --to dst:7000 --certs ./pki --expose mig=unix:/run/src.sock\n"
            "\n"
            "  # help on one command\n"
            "  dataplane certs init --help\n"
            "\n"
            "exit status: 0 success, 1 failure, 2 wrong command line, 3 a migration ended in doubt\n"
            "(see `dataplane resolve --help`)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--daemon", metavar="unix:PATH", default=None,
        help="run the command through the node daemon at PATH (`dataplane serve`), with the same output "
             "and exit status; migrate, receive and storage-migrate")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log verbosity on stderr (default: info)",
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for register in COMMAND_GROUPS:
        register(commands)
    return parser


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line *argv* (default: ``sys.argv[1:]``); return the exit status.

    0 success, 1 an expected failure, 2 a wrong command line (both printed as
    one line on stderr), 130 interrupted. Raises only on bugs.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except UsageError as exc:
        message, prog = exc.args
        _fail(prog, message)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    prog = getattr(args, "_prog", PROG)
    if args.daemon is not None and not getattr(args, "daemon_capable", False):
        _fail(prog, f"--daemon: {args.command} does not run through the daemon "
                    f"(migrate, receive and storage-migrate do)")
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except CommandFailed as exc:
        _fail(prog, str(exc.args[0]) if exc.args else type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        _fail(prog, "interrupted")
        return 130
    except OSError as exc:  # an environment failure no handler anticipated: still one line
        _fail(prog, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
