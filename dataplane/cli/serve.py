"""``dataplane serve``: the node daemon (see :mod:`dataplane.daemon`)."""

from __future__ import annotations

import argparse
import ssl
from typing import TYPE_CHECKING

from dataplane.cli.common import (
    EXIT_OK,
    CommandFailed,
    Commands,
    UsageError,
    add_command,
    arg_type,
    parse_bind,
    parse_rate_arg,
    positive_int,
    ready,
    run_loop,
    stop_event,
    unix_api_path,
)

if TYPE_CHECKING:
    from dataplane.channel.tls import TLSConfig

DEFAULT_API = "unix:/run/dataplane/api.sock"
DEFAULT_STATE = "/var/lib/dataplane"


def register_serve(commands: Commands) -> None:
    cmd = add_command(
        commands,
        "serve",
        help="run the node daemon: an HTTP/JSON API on a unix socket (migrations, receivers, storage "
             "migrations, events, metrics)",
        description=(
            "The node daemon. Serves an HTTP/JSON API on a unix socket: cross-cluster migrations\n"
            "(POST /v1/migrations with the parameters of `migrate`), receivers (POST /v1/receivers,\n"
            "those of `receive`) and storage live migrations (POST /v1/storage-migrations, those of\n"
            "`storage-migrate`); GET to follow a job, PATCH to change its bandwidth or downtime limit\n"
            "live, DELETE to cancel it; GET .../events streams the same JSON events as the command, as\n"
            "server-sent events; /healthz, /readyz, /metrics (Prometheus) and /openapi.json, the\n"
            "contract every request body is checked against. At most --max-migrations outbound\n"
            "migrations, --max-receivers receivers and --max-storage storage migrations run at once;\n"
            "more wait in a queue, in order. --bandwidth-budget is shared equally by the running\n"
            "migrations (each one's own cap still applies). SIGTERM or SIGINT: no new jobs, the queued\n"
            "ones are cancelled, the running ones roll back unless past their switchover or pivot (the\n"
            "VM keeps running where it was) and finish otherwise, then the daemon exits 0. Prints\n"
            "'dataplane: serve listening on PATH' on stderr once it listens.\n"
            "\n"
            "exit status: 0 stopped by a signal, 1 the socket cannot be served, 2 wrong command line."
        ),
        examples=[
            ("dataplane serve --api unix:/run/dataplane/api.sock", "the daemon"),
            ("curl --unix-socket /run/dataplane/api.sock -H 'Content-Type: application/json' "
             "-d '{\"qmp\": \"/run/vm/qmp.sock\", \"disks\": [{\"disk\": \"vda\", "
             "\"target\": \"/new/vda.qcow2\", \"format\": \"qcow2\"}]}' "
             "http://localhost/v1/storage-migrations", "a storage migration through it"),
        ],
    )
    cmd.add_argument("--api", metavar="unix:PATH", default=DEFAULT_API,
                     help=f"where the API listens (default: {DEFAULT_API})")
    ch = cmd.add_argument_group(
        "one channel listener for every receiver (optional)",
        "--listen HOST:PORT takes the migrations of every receiver created without a listener of its\n"
        "own (POST /v1/receivers with `peer`; `dataplane --daemon ... receive --peer-name NAME`).\n"
        "Each session goes to the receiver it names (`migrate --receiver ID`) or to the oldest one\n"
        "waiting, and only if its certificate carries that receiver's peer name. Give --certs DIR\n"
        "(its server identity; the clients its CA issued may connect) or --cert, --key and --ca.")
    ch.add_argument("--listen", metavar="HOST:PORT", type=arg_type(parse_bind),
                    help="the shared channel listener (port 0 picks one; a ready line names it)")
    ch.add_argument("--certs", metavar="DIR", help="a `dataplane certs init` directory")
    ch.add_argument("--cert", metavar="PATH", help="the listener's certificate (PEM)")
    ch.add_argument("--key", metavar="PATH", help="its private key (PEM)")
    ch.add_argument("--ca", metavar="PATH", help="the CA bundle that issued the sources' certificates")
    tcp = cmd.add_argument_group(
        "TCP with mutual TLS (optional; the unix socket is always served)",
        "--api-tcp HOST:PORT serves the same API over HTTPS to clients holding a certificate the CA\n"
        "bundle trusts (and carrying --api-peer-name, if given). Give --api-certs DIR (a `dataplane\n"
        "certs init` directory: this daemon is its server, its client is the API's client) or\n"
        "--api-cert, --api-key and --api-ca.")
    tcp.add_argument("--api-tcp", metavar="HOST:PORT", type=arg_type(parse_bind),
                     help="also listen here (port 0 picks one; the ready line names it)")
    tcp.add_argument("--api-certs", metavar="DIR", help="a `dataplane certs init` directory")
    tcp.add_argument("--api-cert", metavar="PATH", help="the daemon's certificate (PEM)")
    tcp.add_argument("--api-key", metavar="PATH", help="its private key (PEM)")
    tcp.add_argument("--api-ca", metavar="PATH", help="the CA bundle that issued the clients' certificates")
    tcp.add_argument("--api-peer-name", metavar="NAME",
                     help="the name a client's certificate must carry (default with --api-certs: its "
                          "client's name; otherwise any certificate the CA issued)")
    cmd.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE,
                     help="the crash journal: every change a job makes to a QEMU is written here first; "
                          "after a crash or kill -9 the next start undoes what it finds and reports it as "
                          f"the job's outcome (default: {DEFAULT_STATE}; one daemon per directory)")
    cmd.add_argument("--max-storage", metavar="N", type=positive_int, default=2,
                     help="storage migrations that run at once; more are queued (default: 2)")
    cmd.add_argument("--max-migrations", metavar="N", type=positive_int, default=2,
                     help="outbound cross-cluster migrations that run at once; more are queued (default: 2, "
                          "as KubeVirt's parallelOutboundMigrationsPerNode)")
    cmd.add_argument("--max-receivers", metavar="N", type=positive_int, default=8,
                     help="receivers that listen at once; more are queued (default: 8)")
    cmd.add_argument("--bandwidth-budget", metavar="RATE", type=arg_type(parse_rate_arg),
                     help="what all running migrations of this node send together, shared equally: "
                          "bits/s like 2G or bytes/s like 200MiB/s (default: unlimited)")
    cmd.set_defaults(handler=_cmd_serve)


def _api_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server context of --api-tcp (mutual TLS), None without it. Raises UsageError /
    CommandFailed."""
    from dataplane import certs
    from dataplane.channel.tls import TLSConfig, TLSConfigError, server_context

    given = [o for o, v in (("--api-certs", args.api_certs), ("--api-cert", args.api_cert),
                            ("--api-key", args.api_key), ("--api-ca", args.api_ca)) if v]
    if args.api_tcp is None:
        if given:
            raise UsageError(f"{', '.join(given)} without --api-tcp")
        return None
    cert, key, ca, peer = args.api_cert, args.api_key, args.api_ca, args.api_peer_name
    if args.api_certs:
        try:
            cs = certs.load_cert_set(args.api_certs)
        except certs.CertsError as exc:
            raise CommandFailed(f"--api-certs: {exc}") from exc
        cert, key, ca = cert or cs.server.cert, key or cs.server.key, ca or cs.server.trust
        peer = peer or cs.client.names[0]
    missing = [o for o, v in (("--api-cert", cert), ("--api-key", key), ("--api-ca", ca)) if not v]
    if missing:
        raise UsageError(f"--api-tcp needs mutual TLS: give --api-certs DIR, or {', '.join(missing)}")
    try:
        return server_context(TLSConfig.from_paths(cert, key, ca, peer))
    except TLSConfigError as exc:
        raise CommandFailed(f"--api-tcp: {exc}") from exc


def _channel_tls(args: argparse.Namespace) -> TLSConfig | None:
    """The shared listener's TLS (no peer pinned: each receiver authorises its own), None without
    --listen. Raises UsageError / CommandFailed."""
    from dataplane import certs
    from dataplane.channel.tls import TLSConfig, TLSConfigError, server_context

    given = [o for o, v in (("--certs", args.certs), ("--cert", args.cert), ("--key", args.key),
                            ("--ca", args.ca)) if v]
    if args.listen is None:
        if given:
            raise UsageError(f"{', '.join(given)} without --listen")
        return None
    cert, key, ca = args.cert, args.key, args.ca
    if args.certs:
        try:
            cs = certs.load_cert_set(args.certs)
        except certs.CertsError as exc:
            raise CommandFailed(f"--certs: {exc}") from exc
        cert, key, ca = cert or cs.server.cert, key or cs.server.key, ca or cs.server.trust
    missing = [o for o, v in (("--cert", cert), ("--key", key), ("--ca", ca)) if not v]
    if missing:
        raise UsageError(f"--listen needs mutual TLS: give --certs DIR, or {', '.join(missing)}")
    try:
        cfg = TLSConfig.from_paths(cert, key, ca, None)
        server_context(cfg)  # reads and checks the files now
    except TLSConfigError as exc:
        raise CommandFailed(f"--listen: {exc}") from exc
    return cfg


def _cmd_serve(args: argparse.Namespace) -> int:
    path = unix_api_path("--api", args.api)
    tls = _api_tls(args)
    channel_tls = _channel_tls(args)

    async def run() -> int:
        import asyncio
        import os
        from pathlib import Path

        from dataplane.daemon.journal import StateDirBusy, lock_state_dir
        from dataplane.daemon.server import Daemon

        state = Path(args.state_dir)
        try:
            lock = lock_state_dir(state)
        except StateDirBusy as exc:
            raise CommandFailed(str(exc)) from None
        except OSError as exc:
            raise CommandFailed(f"--state-dir {state}: {exc.strerror or exc}") from None
        stop = stop_event("stopping: rolling back the migrations before their pivot")
        listener = None
        if channel_tls is not None:
            from dataplane.channel.addr import format_hostport
            from dataplane.daemon.listener import SharedListener

            listener = SharedListener(args.listen[0], args.listen[1], channel_tls)
            try:
                await listener.start()
            except OSError as exc:
                os.close(lock)
                raise CommandFailed(f"cannot listen on {format_hostport(*args.listen)}: "
                                    f"{exc.strerror or exc}") from exc
            ready(f"serve channel listening on {format_hostport(*listener.address)}")
        daemon = Daemon(max_storage=args.max_storage, max_migrations=args.max_migrations,
                        max_receivers=args.max_receivers, bandwidth_budget=int(args.bandwidth_budget or 0),
                        state_dir=state, listener=listener)
        try:
            try:
                runner = await daemon.serve(path)
            except OSError as exc:
                raise CommandFailed(f"cannot serve {path}: {exc.strerror or exc}") from exc
            ready(f"serve listening on {path}")
            if tls is not None:
                from dataplane.channel.addr import format_hostport

                try:
                    bound = await daemon.serve_tcp(runner, args.api_tcp[0], args.api_tcp[1], tls)
                except OSError as exc:
                    await runner.cleanup()
                    raise CommandFailed(f"cannot serve --api-tcp {format_hostport(*args.api_tcp)}: "
                                        f"{exc.strerror or exc}") from exc
                ready(f"serve listening on https://{format_hostport(*bound)} (mutual TLS)")
            reconciling = asyncio.create_task(daemon.reconcile())
            try:
                await stop.wait()
                await reconciling
                await daemon.shutdown()
            finally:
                await runner.cleanup()
        finally:
            if listener is not None:
                await listener.close()
            os.close(lock)
        return EXIT_OK

    return run_loop(run)
