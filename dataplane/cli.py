"""The ``dataplane`` command line (``dataplane = "dataplane.cli:main"``, also ``python -m dataplane``).

Commands are grouped (``dataplane certs init``, later ``dataplane tunnel
listen``, ``dataplane migrate``, ...). To add a group:

1. write ``def register_<group>(commands: Commands) -> None`` that adds the
   group with :func:`add_command` and its subcommands below it, each with a
   handler ``def _cmd_<group>_<action>(args: argparse.Namespace) -> int``
   set through ``parser.set_defaults(handler=...)``;
2. append it to :data:`COMMAND_GROUPS`.

Rules for handlers: import heavy modules inside the handler (``dataplane
--help`` stays fast), return the exit status, and turn *expected* failures
into :class:`CommandError` (exit 1: the operation failed) or
:class:`UsageError` (exit 2: the command line is wrong). :func:`main` prints
those as one line on stderr, ``dataplane <command>: error: <message>``,
never a traceback; a traceback means a bug. Every command gets a help text
with examples (``examples=`` of :func:`add_command`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeAlias

from dataplane import __version__

__all__ = [
    "COMMAND_GROUPS",
    "CommandError",
    "Commands",
    "UsageError",
    "add_command",
    "build_parser",
    "main",
    "positive_int",
    "register_certs",
]

PROG = "dataplane"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("dataplane")

#: What a group's register function receives: the ``add_subparsers()`` object of the top-level parser.
Commands: TypeAlias = argparse._SubParsersAction  # type: ignore[type-arg]
Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """An expected failure of a command: printed as one line, exit status 1."""

    exit_code = EXIT_FAILURE


class UsageError(CommandError):
    """A wrong command line: printed as one line, exit status 2."""

    exit_code = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised as UsageError, printed by :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')", self.prog)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_command(
    commands: Commands,
    name: str,
    *,
    help: str,
    description: str | None = None,
    examples: Sequence[tuple[str, str]] = (),
) -> argparse.ArgumentParser:
    """Add command *name* below *commands*; return its parser.

    ``help`` is the one-line summary shown in the parent's list;
    ``description`` (default: ``help``) opens the command's own ``--help``,
    and ``examples`` (``(command line, what it does)`` pairs) close it.
    """
    epilog = None
    if examples:
        epilog = "examples:\n" + "\n".join(f"  # {what}\n  {line}\n" for line, what in examples)
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(_prog=parser.prog)  # the deepest command's name, for error lines
    return parser


# --------------------------------------------------------------------------- certs


def register_certs(commands: Commands) -> None:
    """The ``certs`` group: ``certs init``."""
    group = add_command(
        commands,
        "certs",
        help="create the certificates for the mutually authenticated channel",
        description=(
            "Certificates for the channel's mutual TLS 1.3: a CA (or one CA per cluster) and the\n"
            "listener (server) and dialer (client) identities. See docs/security.md."
        ),
        examples=[
            ("dataplane certs init ./pki", "one CA, default names"),
            ("dataplane certs init ./pki --two-cas", "one CA per cluster, cross-trusted"),
        ],
    )
    actions = group.add_subparsers(title="commands", dest="certs_command", metavar="COMMAND", required=True)
    init = add_command(
        actions,
        "init",
        help="create a CA and the server and client certificates in a directory",
        description=(
            "Create a CA (ECDSA P-256) and two identities signed by it in DIR: the server (the\n"
            "channel listener, destination cluster; EKU serverAuth) and the client (the dialer,\n"
            "source cluster; EKU clientAuth), each with the trust bundle it must pin for its peer.\n"
            "With --two-cas, cluster-a's CA signs the client and cluster-b's CA the server, and each\n"
            "side trusts only the other cluster's CA. Names that parse as IP addresses become IP\n"
            "SANs, others DNS SANs; the first name of each side is also its CN. Private keys are\n"
            "written with mode 0600. Existing files are never overwritten without --force.\n"
            "DIR/manifest.json and DIR/README.txt say which file is what."
        ),
        examples=[
            ("dataplane certs init ./pki", "server 'dataplane-server', client 'dataplane-client'"),
            (
                "dataplane certs init ./pki --server-name dp.cluster-b.example --server-name 10.0.0.7 "
                "--client-name dp.cluster-a.example",
                "your own names (DNS and IP)",
            ),
            ("dataplane certs init ./pki --two-cas --days 30", "two cluster CAs, 30-day certificates"),
            ("dataplane certs init ./pki --force", "replace an existing set"),
        ],
    )
    init.add_argument("directory", metavar="DIR", type=Path, help="where to write (created if missing)")
    init.add_argument(
        "--two-cas", action="store_true", help="one CA per cluster, each side trusting the other's"
    )
    init.add_argument(
        "--server-name",
        metavar="NAME",
        action="append",
        dest="server_names",
        help="a name of the server (listener) certificate; repeat for more (default: dataplane-server)",
    )
    init.add_argument(
        "--client-name",
        metavar="NAME",
        action="append",
        dest="client_names",
        help="a name of the client (dialer) certificate; repeat for more (default: dataplane-client)",
    )
    init.add_argument("--ca-name", metavar="NAME", help="name of the single CA (default: dataplane-ca)")
    init.add_argument(
        "--days", metavar="D", type=positive_int, default=365, help="validity in days (default: 365)"
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(handler=_cmd_certs_init)


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from dataplane import certs

    if args.two_cas and args.ca_name is not None:
        raise UsageError("--ca-name names the single CA; with --two-cas the CAs are cluster-a and cluster-b")
    try:
        cs = certs.init_certs(
            args.directory,
            ca_name=args.ca_name or certs.DEFAULT_CA_NAME,
            server_names=args.server_names or certs.DEFAULT_SERVER_NAMES,
            client_names=args.client_names or certs.DEFAULT_CLIENT_NAMES,
            two_cas=args.two_cas,
            days=args.days,
            force=args.force,
        )
    except certs.InvalidNameError as exc:
        raise UsageError(str(exc)) from exc
    except certs.CertsExistError as exc:
        names = ", ".join(p.name for p in exc.existing)
        raise CommandError(
            f"{args.directory}: refusing to overwrite existing files ({names}); use --force to replace them"
        ) from exc
    except certs.CertsError as exc:
        raise CommandError(str(exc)) from exc
    files = cs.files()
    kind = "two cross-trusted CAs (cluster-a, cluster-b)" if cs.two_cas else f"one CA '{cs.cas[0].name}'"
    print(f"created {len(files)} files in {cs.directory} ({kind}, valid {cs.days} days):")
    width = max(len(p.name) for p, _ in files)
    for path, what in files:
        print(f"  {path.name:<{width}}  {what}")
    for ident, peer, where in ((cs.server, cs.client, "listener"), (cs.client, cs.server, "dialer")):
        print(
            f"{ident.role} ({where}): {ident.cert.name} + {ident.key.name}, pins {ident.trust.name}, "
            f"expects peer name {peer.names[0]}; sha256 {ident.fingerprint}"
        )
    return EXIT_OK


# --------------------------------------------------------------------------- the parser and main

#: Every command group, in the order of ``dataplane --help``.
COMMAND_GROUPS: list[Callable[[Commands], None]] = [
    register_certs,
]


def build_parser() -> argparse.ArgumentParser:
    """The complete ``dataplane`` parser (every group of :data:`COMMAND_GROUPS`)."""
    parser = _Parser(
        prog=PROG,
        description=(
            "dataplane: live migration of running QEMU/KVM VMs and their disks, across clusters (CCLM)\n"
            "and storage backends (SLM)."
        ),
        epilog=(
            "examples:\n"
            "  # certificates for the channel's mutual TLS\n"
            "  dataplane certs init ./pki\n"
            "\n"
            "  # help on one command\n"
            "  dataplane certs init --help\n"
            "\n"
            "exit status: 0 success, 1 failure, 2 wrong command line."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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
    try:
        return int(args.handler(args))
    except CommandError as exc:
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
