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
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from dataplane import __version__

if TYPE_CHECKING:
    import asyncio

    from dataplane.channel.addr import Endpoint
    from dataplane.channel.tls import TLSConfig

__all__ = [
    "COMMAND_GROUPS",
    "CommandError",
    "Commands",
    "UsageError",
    "add_command",
    "build_parser",
    "main",
    "positive_int",
    "non_negative_int",
    "check_connections",
    "stop_event",
    "register_certs",
    "register_migration",
    "register_tunnel",
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


# --------------------------------------------------------------------------- tunnel


def _arg_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap a ValueError-raising parser as an argparse type (its message becomes the error line)."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {text}")
    return value


def _tunnel_common(parser: argparse.ArgumentParser, *, side: str) -> None:
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
                     help="no TLS at all: neither encrypted nor authenticated (logged as a warning)")
    parser.add_argument("--compress", choices=["auto", "on", "off"], default="auto",
                        help="compression of the data this side sends (default: auto: only while the link "
                             "is the bottleneck and the data compresses)")
    parser.add_argument("--bandwidth", metavar="RATE", type=_arg_type(_parse_rate),
                        help="cap what this side sends per session: bits/s like 200M, 1G, 500kbit, or "
                             "bytes/s like 100MiB/s, 50MB/s (default: unlimited)")
    parser.add_argument("--grace", metavar="SECONDS", type=_arg_type(_positive_float), default=60.0,
                        help="how long a session survives with no connection before its streams are reset "
                             "(default: 60)")
    parser.add_argument("--stats-json", metavar="PATH", type=Path,
                        help="write statistics as JSON to PATH every second and at exit (atomic replace)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default=argparse.SUPPRESS, help="log verbosity on stderr (same as the global option)")


def _parse_rate(text: str) -> float | None:
    from dataplane.channel.addr import parse_rate

    return parse_rate(text)


def _parse_bind(text: str) -> tuple[str, int]:
    from dataplane.channel.addr import parse_hostport

    return parse_hostport(text, allow_zero=True, allow_empty_host=True)


def _parse_to(text: str) -> tuple[str, int]:
    from dataplane.channel.addr import parse_hostport

    return parse_hostport(text)


def _parse_forward(text: str) -> tuple[str, Endpoint]:
    from dataplane.channel.addr import parse_mapping

    return parse_mapping(text)


def _parse_expose(text: str) -> tuple[str, Endpoint]:
    from dataplane.channel.addr import parse_mapping

    return parse_mapping(text, listen=True)


def register_tunnel(commands: Commands) -> None:
    """The ``tunnel`` group: ``tunnel listen`` and ``tunnel connect``."""
    group = add_command(
        commands,
        "tunnel",
        help="carry local sockets (QEMU migration, NBD) across clusters over the streaming channel",
        description=(
            "The cross-cluster streaming channel as a tunnel: `tunnel connect` (source cluster) exposes\n"
            "local sockets; every connection to one becomes a stream of one session (N TCP connections,\n"
            "mutual TLS 1.3, compressed, resumable), which `tunnel listen` (destination cluster)\n"
            "connects to a local target. See docs/channel.md."
        ),
        examples=[
            ("dataplane tunnel listen --bind 0.0.0.0:7000 --certs ./pki --forward mig=unix:/run/dst.sock",
             "destination cluster"),
            ("dataplane tunnel connect --to dst.example:7000 --certs ./pki --expose mig=unix:/run/src.sock "
             "--connections 4", "source cluster"),
        ],
    )
    actions = group.add_subparsers(title="commands", dest="tunnel_command", metavar="COMMAND", required=True)
    listen = add_command(
        actions,
        "listen",
        help="accept channel sessions and connect their streams to local targets",
        description=(
            "Listen on HOST:PORT for channel sessions (any number, over time). A stream named NAME is\n"
            "connected to NAME's --forward target, then accepted; unknown names and unreachable targets\n"
            "are refused (the dialing side closes the application's socket and logs why). Streams of a\n"
            "session reach their targets in the order the dialing side accepted them. Runs until SIGINT\n"
            "or SIGTERM. Prints 'dataplane: tunnel listening on HOST:PORT' on stderr once listening\n"
            "(port 0 picks a free port and prints it)."
        ),
        examples=[
            ("dataplane tunnel listen --bind 0.0.0.0:7000 --certs ./pki "
             "--forward mig=unix:/run/qemu-incoming.sock --forward disk0=tcp:127.0.0.1:10809",
             "QEMU migration and an NBD export"),
            ("dataplane tunnel listen --bind 10.0.0.7:7000 --cert server.crt --key server.key "
             "--ca server-trust.pem --peer-name dp.cluster-a.example --forward mig=tcp:127.0.0.1:4444 "
             "--stats-json /run/dp/stats.json", "explicit TLS files, statistics"),
            ("dataplane tunnel listen --bind 127.0.0.1:7000 --plaintext --forward echo=tcp:127.0.0.1:7",
             "plaintext (isolated test network only)"),
        ],
    )
    listen.add_argument("--bind", metavar="HOST:PORT", required=True, type=_arg_type(_parse_bind),
                        help="where to listen ([IPv6]:PORT for IPv6; :PORT for every interface)")
    listen.add_argument("--forward", metavar="NAME=TARGET", action="append", required=True,
                        type=_arg_type(_parse_forward), dest="forwards",
                        help="connect streams named NAME to TARGET (unix:/PATH or tcp:HOST:PORT); repeat")
    _tunnel_common(listen, side="server")
    listen.set_defaults(handler=_cmd_tunnel_listen)

    connect = add_command(
        actions,
        "connect",
        help="dial a channel listener and expose local sockets whose connections become streams",
        description=(
            "Open one session to the listener at HOST:PORT over --connections TCP connections and\n"
            "listen locally for each --expose: every connection accepted there becomes a stream NAME,\n"
            "connected by the listener to its target. Streams are opened in accept order, each after\n"
            "the previous one reached its target. Lost connections are redialled with backoff; after\n"
            "--grace seconds without any, the streams are reset, the local sockets closed, and the\n"
            "command exits with status 1. Runs until SIGINT or SIGTERM (exit 0). Prints\n"
            "'dataplane: tunnel connected to HOST:PORT (N connections)' on stderr once connected."
        ),
        examples=[
            ("dataplane tunnel connect --to dst.example:7000 --certs ./pki --connections 4 "
             "--expose mig=unix:/run/qemu-outgoing.sock --expose disk0=tcp:127.0.0.1:10810",
             "QEMU migrates to unix:/run/qemu-outgoing.sock; NBD mirror to 127.0.0.1:10810"),
            ("dataplane tunnel connect --to 10.0.0.7:7000 --cert client.crt --key client.key "
             "--ca client-trust.pem --peer-name dp.cluster-b.example --bandwidth 1G --compress on "
             "--expose mig=tcp:127.0.0.1:4444", "explicit TLS files, 1 Gbit/s cap, always compress"),
        ],
    )
    connect.add_argument("--to", metavar="HOST:PORT", required=True, type=_arg_type(_parse_to),
                         help="the listener ([IPv6]:PORT for IPv6)")
    connect.add_argument("--expose", metavar="NAME=LISTEN", action="append", required=True,
                         type=_arg_type(_parse_expose), dest="exposes",
                         help="listen on LISTEN (unix:/PATH or tcp:HOST:PORT); each connection becomes a "
                              "stream NAME; repeat")
    connect.add_argument("--connections", metavar="N", type=positive_int, default=1,
                         help="TCP connections of the session, 1..16 (default: 1)")
    _tunnel_common(connect, side="client")
    connect.set_defaults(handler=_cmd_tunnel_connect)


def _tunnel_mappings(pairs: Sequence[tuple[str, Endpoint]], option: str) -> dict[str, Endpoint]:
    out: dict[str, Endpoint] = {}
    for name, ep in pairs:
        if name in out:
            raise UsageError(f"{option}: the name {name!r} is given twice")
        out[name] = ep
    return out


def _tunnel_tls(args: argparse.Namespace, side: str) -> TLSConfig | None:
    """The TLSConfig of this side, or None with --plaintext. Raises UsageError / CommandError."""
    from dataplane.channel.tls import TLSConfig, TLSConfigError, client_context, server_context

    explicit = [opt for opt, value in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca),
                                       ("--certs", args.certs), ("--peer-name", args.peer_name)) if value]
    if args.plaintext:
        if explicit:
            raise UsageError(f"--plaintext disables TLS; do not combine it with {', '.join(explicit)}")
        return None
    cert, key, ca, peer_name = args.cert, args.key, args.ca, args.peer_name
    if args.certs is not None:
        from dataplane import certs

        try:
            cs = certs.load_cert_set(args.certs)
        except certs.CertsError as exc:
            raise CommandError(f"--certs: {exc}") from exc
        own, other = (cs.server, cs.client) if side == "server" else (cs.client, cs.server)
        cert, key, ca = cert or own.cert, key or own.key, ca or own.trust
        peer_name = peer_name or other.names[0]
    missing = [opt for opt, value in (("--cert", cert), ("--key", key), ("--ca", ca)) if value is None]
    if missing:
        raise UsageError(
            f"TLS needs {', '.join(missing)} (or --certs DIR made by 'dataplane certs init'); "
            "--plaintext turns TLS off on an isolated test network")
    if not peer_name:
        peer = "dialer's (client's)" if side == "server" else "listener's (server's)"
        raise UsageError(
            f"TLS needs --peer-name NAME: the name the {peer} certificate must carry "
            "(its CN or a subjectAltName, e.g. --peer-name dataplane-client)")
    try:
        cfg = TLSConfig.from_paths(cert, key, ca, peer_name)
        (server_context if side == "server" else client_context)(cfg)  # loads and checks the files now
    except TLSConfigError as exc:
        raise CommandError(str(exc)) from exc
    return cfg


def _check_stats_path(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise UsageError(f"--stats-json: directory {path.parent} does not exist")


class _StatsWriter:
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


def _ready(message: str) -> None:
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


def _run_loop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
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


def _cmd_tunnel_listen(args: argparse.Namespace) -> int:
    forwards = _tunnel_mappings(args.forwards, "--forward")
    tls = _tunnel_tls(args, "server")
    _check_stats_path(args.stats_json)

    async def run() -> int:
        import asyncio

        from dataplane.channel.addr import format_hostport, format_rate
        from dataplane.channel.driver import ChannelServer, os_error_text
        from dataplane.channel.relay import DestinationRelay
        from dataplane.channel.session import Limits, SessionConfig

        host, port = args.bind
        relay = DestinationRelay(forwards)
        server = ChannelServer(host, port, tls, plaintext=tls is None, limits=Limits(grace=args.grace),
                               config=SessionConfig(compression=args.compress), bandwidth=args.bandwidth,
                               on_stream=relay.on_stream)
        stop = stop_event()
        try:
            await server.start()
        except OSError as exc:
            where = format_hostport(host, port)
            raise CommandError(f"cannot listen on {where}: {os_error_text(exc)}") from exc
        stats = _StatsWriter(args.stats_json, server.stats)
        stats.write()
        if args.bandwidth:
            log.info("bandwidth cap per session: %s", format_rate(args.bandwidth))
        _ready(f"tunnel listening on {format_hostport(*server.address)}")
        writer = asyncio.create_task(stats.run())
        try:
            await stop.wait()
            log.info("shutting down: closing every session")
        finally:
            writer.cancel()
            await server.close()
            await relay.close()
            stats.write()
        return EXIT_OK

    return _run_loop(run)


def _cmd_tunnel_connect(args: argparse.Namespace) -> int:
    exposes = _tunnel_mappings(args.exposes, "--expose")
    tls = _tunnel_tls(args, "client")
    _check_stats_path(args.stats_json)
    check_connections(args.connections)

    async def run() -> int:
        import asyncio

        from dataplane.channel.addr import format_hostport, format_rate
        from dataplane.channel.driver import ChannelClient, ConnectError
        from dataplane.channel.errors import ChannelError
        from dataplane.channel.relay import SourceRelay
        from dataplane.channel.session import Limits, SessionConfig

        host, port = args.to
        target = format_hostport(host, port)
        client = ChannelClient(host, port, tls, plaintext=tls is None,
                               connections=args.connections, limits=Limits(grace=args.grace),
                               config=SessionConfig(compression=args.compress), bandwidth=args.bandwidth)
        relay = SourceRelay(client, exposes)
        stop = stop_event()
        stats = _StatsWriter(args.stats_json, client.stats)
        try:
            await relay.start()
        except OSError as exc:
            raise CommandError(str(exc)) from exc
        writer: asyncio.Task[None] | None = None
        try:
            starting = asyncio.create_task(client.start())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("interrupted while connecting to %s", target)
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                await client.close()
                return EXIT_OK
            stopping.cancel()
            try:
                starting.result()
            except (ConnectError, ChannelError) as exc:
                raise CommandError(str(exc.reason or exc)) from exc
            stats.write()
            if args.bandwidth:
                log.info("bandwidth cap: %s", format_rate(args.bandwidth))
            _ready(f"tunnel connected to {target} ({client.ready_connections} connections)")
            writer = asyncio.create_task(stats.run())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([client.done, stopping], return_when=asyncio.FIRST_COMPLETED)
            if client.done.done():
                stopping.cancel()
                error = client.done.result()
                if error is None:
                    log.info("the listener closed the session")
                    return EXIT_OK
                raise CommandError(f"session with {target} failed: {error.reason or type(error).__name__}")
            log.info("shutting down: closing the session")
            await client.close()
            return EXIT_OK
        finally:
            if writer is not None:
                writer.cancel()
            await relay.close()
            stats.write()

    return _run_loop(run)


# --------------------------------------------------------------------------- migrate / receive


def register_migration(commands: Commands) -> None:
    """``migrate`` and ``receive`` (written in :mod:`dataplane.cli_migration`)."""
    from dataplane import cli_migration

    cli_migration.register(commands)


# --------------------------------------------------------------------------- the parser and main

#: Every command group, in the order of ``dataplane --help``.
COMMAND_GROUPS: list[Callable[[Commands], None]] = [
    register_migration,
    register_tunnel,
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
            "  # live-migrate a VM and its disks to another cluster\n"
            "  dataplane receive --qmp /run/dst/qmp.sock --listen 0.0.0.0:7000 --certs ./pki   # cluster B\n"
            "  dataplane migrate --qmp /run/src/qmp.sock --to dst:7000 --certs ./pki            # cluster A\n"
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
