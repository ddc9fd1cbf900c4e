"""What every ``dataplane`` command shares: errors and exit statuses, argument types, the channel's
options (TLS, compression, bandwidth, grace) and the endpoints built from them, statistics files,
signals and the event loop.

Rules for handlers: import heavy modules inside the handler (``dataplane --help`` stays fast), return
the exit status, and turn *expected* failures into :class:`CommandFailed` (exit 1: the operation
failed) or :class:`UsageError` (exit 2: the command line is wrong). :func:`dataplane.cli.main.main`
prints those as one line on stderr, ``dataplane <command>: error: <message>``, never a traceback; a
traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

if TYPE_CHECKING:
    import asyncio

    from dataplane.channel.client import ChannelClient
    from dataplane.channel.server import ChannelServer
    from dataplane.channel.tls import TLSConfig

__all__ = [
    "EXIT_FAILURE",
    "EXIT_IN_DOUBT",
    "EXIT_OK",
    "EXIT_USAGE",
    "MAX_CONNECTIONS",
    "PROG",
    "CommandFailed",
    "Commands",
    "InDoubt",
    "Parser",
    "StatsWriter",
    "UsageError",
    "add_command",
    "arg_type",
    "channel_client",
    "channel_options",
    "channel_server",
    "check_connections",
    "check_stats_path",
    "non_negative_int",
    "parse_bind",
    "parse_rate_arg",
    "parse_to",
    "positive_float",
    "positive_int",
    "ready",
    "run_loop",
    "stop_event",
    "tls_config",
]

PROG = "dataplane"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: A migration ended in doubt: neither copy of the guest runs until ``dataplane resolve``.
EXIT_IN_DOUBT = 3

log = logging.getLogger("dataplane")

#: What a group's register function receives: the ``add_subparsers()`` object of the top-level parser.
Commands: TypeAlias = argparse._SubParsersAction
Handler = Callable[[argparse.Namespace], int]


class CommandFailed(Exception):
    """An expected failure of a command: printed as one line, exit status 1."""

    exit_code = EXIT_FAILURE


class InDoubt(CommandFailed):
    """A migration ended in doubt: printed as one line (with the resolve command), exit status 3."""

    exit_code = EXIT_IN_DOUBT


class UsageError(CommandFailed):
    """A wrong command line: printed as one line, exit status 2."""

    exit_code = EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised as UsageError, printed by :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')", self.prog)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


#: Most TCP connections one channel session stripes over (``--connections``).
MAX_CONNECTIONS = 16


def check_connections(n: int) -> None:
    """:raises UsageError: *n* connections are more than one session takes."""
    if n > MAX_CONNECTIONS:
        raise UsageError(f"argument --connections: at most {MAX_CONNECTIONS} per session, got {n}")


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


def arg_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap a ValueError-raising parser as an argparse type (its message becomes the error line)."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {text}")
    return value


def channel_options(parser: argparse.ArgumentParser, *, side: str) -> None:
    tls = parser.add_argument_group(
        "TLS (mutual TLS 1.3; see docs/security.md)",
        "Give --certs DIR (a `dataplane certs init` directory: this side's identity and the peer's name\n"
        "are taken from it), or --cert, --key, --ca and --peer-name; options given explicitly override\n"
        "--certs. --plaintext disables TLS (an isolated test network only).",
    )
    tls.add_argument("--cert", metavar="PATH", type=Path, help="this side's certificate (PEM)")
    tls.add_argument("--key", metavar="PATH", type=Path, help="this side's private key (PEM)")
    tls.add_argument("--ca", metavar="PATH", type=Path,
                     help="the CA bundle that issued the peer's certificate (PEM)")
    peer = "dialer (client)" if side == "server" else "listener (server)"
    tls.add_argument("--peer-name", metavar="NAME",
                     help=f"the name the {peer} certificate must carry (CN or subjectAltName); required")
    tls.add_argument("--certs", metavar="DIR", type=Path,
                     help=f"a `dataplane certs init` directory; uses its {side} identity")
    tls.add_argument("--plaintext", action="store_true",
                     help="no TLS at all: neither encrypted nor authenticated (logged as a warning); "
                          "only on a loopback address unless --plaintext-network-is-isolated")
    tls.add_argument("--plaintext-network-is-isolated", action="store_true",
                     help="allow --plaintext on a non-loopback address: you assert that no other host "
                          "can reach it (any peer that can may write the destination's disks)")
    parser.add_argument("--compress", choices=["auto", "on", "off"], default="auto",
                        help="compression of the data this side sends (default: auto: only while the link "
                             "is the bottleneck and the data compresses)")
    parser.add_argument("--bandwidth", metavar="RATE", type=arg_type(parse_rate_arg),
                        help="cap what this side sends per session: bits/s like 200M, 1G, 500kbit, or "
                             "bytes/s like 100MiB/s, 50MB/s (default: unlimited)")
    parser.add_argument("--grace", metavar="SECONDS", type=arg_type(positive_float), default=60.0,
                        help="how long a session survives with no connection before its streams are reset "
                             "(default: 60)")
    parser.add_argument("--stats-json", metavar="PATH", type=Path,
                        help="write statistics as JSON to PATH every second and at exit (atomic replace)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default=argparse.SUPPRESS, help="log verbosity on stderr (same as the global option)")


def parse_rate_arg(text: str) -> float | None:
    from dataplane.units import parse_rate

    return parse_rate(text)


def node_pair(right: str) -> Callable[[str], tuple[str, str]]:
    """A parser of ``NODE=<right>`` arguments (both sides non-empty) for :func:`arg_type`."""

    def parse(text: str) -> tuple[str, str]:
        node, sep, value = text.partition("=")
        if not sep or not node or not value:
            raise ValueError(f"expected NODE={right}, got {text!r}")
        return node, value

    return parse


def unix_api_path(option: str, text: str, why: str = "") -> str:
    """The PATH of a ``unix:PATH`` daemon API address given as ``option``; raises UsageError."""
    scheme, sep, path = text.partition(":")
    if scheme != "unix" or not sep or not path:
        raise UsageError(f"{option} {text}: expected unix:PATH{why}")
    return path


def parse_bind(text: str) -> tuple[str, int]:
    from dataplane.channel.addr import parse_hostport

    return parse_hostport(text, allow_zero=True, allow_empty_host=True)


def parse_to(text: str) -> tuple[str, int]:
    from dataplane.channel.addr import parse_hostport

    return parse_hostport(text)


def tls_config(args: argparse.Namespace, side: str) -> TLSConfig | None:
    """The TLSConfig of this side, or None with --plaintext. Raises UsageError / CommandFailed."""
    from dataplane.channel.tls import TLSConfig, TLSConfigError, client_context, server_context

    explicit = [opt for opt, value in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca),
                                       ("--certs", args.certs), ("--peer-name", args.peer_name)) if value]
    if args.plaintext:
        if explicit:
            raise UsageError(f"--plaintext disables TLS; do not combine it with {', '.join(explicit)}")
        return None
    try:
        if args.certs is not None:
            from dataplane import certs

            try:
                cs = certs.load_cert_set(args.certs)
            except certs.CertsError as exc:
                raise CommandFailed(f"--certs: {exc}") from exc
            cfg = cs.config(side, cert=args.cert, key=args.key, ca=args.ca, peer_name=args.peer_name)
        else:
            missing = [opt for opt, value in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca))
                       if value is None]
            if missing:
                raise UsageError(
                    f"TLS needs {', '.join(missing)} (or --certs DIR made by 'dataplane certs init'); "
                    "--plaintext turns TLS off on an isolated test network")
            if not args.peer_name:
                peer = "dialer's (client's)" if side == "server" else "listener's (server's)"
                raise UsageError(
                    f"TLS needs --peer-name NAME: the name the {peer} certificate must carry "
                    "(its CN or a subjectAltName, e.g. --peer-name dataplane-client)")
            cfg = TLSConfig.from_paths(args.cert, args.key, args.ca, args.peer_name)
        (server_context if side == "server" else client_context)(cfg)  # loads and checks the files now
    except TLSConfigError as exc:
        raise CommandFailed(str(exc)) from exc
    return cfg


def check_stats_path(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise UsageError(f"--stats-json: directory {path.parent} does not exist")


class StatsWriter:
    """Writes a stats dict as JSON to a path every second and on demand, replacing it atomically."""

    def __init__(self, path: Path | None, source: Callable[[], dict[str, object]]) -> None:
        self.path = path
        self.source = source
        self._warned = False

    def write(self) -> None:
        import json
        import os

        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.source(), indent=1, default=str) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot write statistics to %s: %s", self.path, exc.strerror or exc)

    async def run(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(1.0)
            self.write()


def ready(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _tune_malloc() -> None:
    """Keep freed buffers of up to a few MiB in glibc's heap instead of unmapping them.

    A tunnel allocates and frees a buffer of up to 1 MiB for every socket read and frame; with
    glibc's defaults many of those come from fresh mmap()s or a trimmed heap, and every byte then
    costs a page fault and zeroing (about 7 % of a relay's CPU). Fixed thresholds stop that churn;
    RSS stays bounded by the channel's own limits. No-op without glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD: blocks up to 4 MiB come from the heap
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: return heap memory above 64 MiB free
    except (OSError, AttributeError):
        log.debug("mallopt is not available: keeping the allocator's defaults")


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the data path.

    A relay allocates a few short-lived containers per frame, so the default
    collector (a young collection every 700 allocations, and every so often
    a full one over every module, class and function loaded) took 4-5 % of a
    tunnel end's CPU. Everything alive at start-up is frozen out of the
    collections, young collections run 50 times less often and full ones
    about 1000 times less often. Cycles are still collected, later: the
    data path frees its buffers by reference counting, so what waits for a
    collection is small bookkeeping.
    """
    import gc

    gc.freeze()
    gc.set_threshold(35_000, 20, 100)


def run_loop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run coroutine function *main* on uvloop when installed (else the default loop); return its result."""
    import asyncio

    _tune_malloc()
    _tune_gc()
    factory = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
        log.debug("event loop: uvloop %s", uvloop.__version__)
    except ImportError:
        log.debug("event loop: asyncio's default (uvloop is not installed)")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def stop_event(what: str | None = None) -> asyncio.Event:
    """An asyncio.Event set by SIGINT / SIGTERM; with *what*, each signal is logged with what happens next."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def handler(signame: str) -> None:
        if what is not None:
            if stop.is_set():
                log.warning("%s received again: already stopping", signame)
                return
            log.warning("%s received: %s", signame, what)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig.name)
    return stop


def check_plaintext_address(args: argparse.Namespace, host: str, tls: TLSConfig | None) -> None:
    """Refuse --plaintext on an address other hosts may reach, unless the operator said the network
    is isolated. Raises UsageError."""
    from dataplane.channel.addr import is_loopback

    if tls is not None or getattr(args, "plaintext_network_is_isolated", False) or is_loopback(host):
        return
    where = host or "every interface"
    raise UsageError(f"--plaintext on {where}: any host that reaches it could write this side's data "
                     f"unauthenticated; use TLS, a loopback address, or add --plaintext-network-is-isolated "
                     f"if no other host can reach it")


def channel_client(args: argparse.Namespace, tls: TLSConfig | None) -> ChannelClient:
    """The (unstarted) channel client of a dialing command: ``--to``, ``--connections`` and the
    options of :func:`channel_options`; *tls* from :func:`tls_config` (None: plaintext)."""
    from dataplane.channel.client import ChannelClient
    from dataplane.channel.session import Limits, SessionConfig

    host, port = args.to
    check_plaintext_address(args, host, tls)
    return ChannelClient(host, port, tls, plaintext=tls is None, connections=args.connections,
                         limits=Limits(grace=args.grace), config=SessionConfig(compression=args.compress),
                         bandwidth=args.bandwidth)


def channel_server(args: argparse.Namespace, tls: TLSConfig | None, address: tuple[str, int],
                   **kwargs: Any) -> ChannelServer:
    """The (unstarted) channel listener of a listening command at *address*, with the options of
    :func:`channel_options`; *kwargs* go to :class:`ChannelServer` (``on_stream``, ``max_sessions``)."""
    from dataplane.channel.server import ChannelServer
    from dataplane.channel.session import Limits, SessionConfig

    host, port = address
    check_plaintext_address(args, host, tls)
    return ChannelServer(host, port, tls, plaintext=tls is None, limits=Limits(grace=args.grace),
                         config=SessionConfig(compression=args.compress), bandwidth=args.bandwidth, **kwargs)
