"""``dataplane serve``: the node daemon (see :mod:`dataplane.daemon`)."""

from __future__ import annotations

import argparse
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
    _tls_options(ch, "", "the listener's", "the sources' certificates")
    tcp = cmd.add_argument_group(
        "TCP with mutual TLS (optional; the unix socket is always served)",
        "--api-tcp HOST:PORT serves the same API over HTTPS to clients holding a certificate the CA\n"
        "bundle trusts (and carrying --api-peer-name, if given). Give --api-certs DIR (a `dataplane\n"
        "certs init` directory: this daemon is its server, its client is the API's client) or\n"
        "--api-cert, --api-key and --api-ca.")
    tcp.add_argument("--api-tcp", metavar="HOST:PORT", type=arg_type(parse_bind),
                     help="also listen here (port 0 picks one; the ready line names it)")
    _tls_options(tcp, "api-", "the daemon's", "the clients' certificates")
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


def _server_tls(args: argparse.Namespace, prefix: str, where: str, *, pin_client: bool) -> TLSConfig | None:
    """The mutual-TLS identity of a listener of the daemon: ``--<prefix>certs DIR`` (its server
    identity; with ``pin_client`` the set's client name is pinned unless ``--<prefix>peer-name``
    says another) or ``--<prefix>cert/key/ca``; None without the listener's option ``where``
    (``--listen``, ``--api-tcp``). The files are read and checked now.

    :raises UsageError: TLS options without the listener, or missing ones.
    :raises CommandFailed: files that do not load or fit.
    """
    from dataplane import certs
    from dataplane.channel.tls import TLSConfig, TLSConfigError, server_context

    attr = prefix.replace("-", "_")
    opts = {n: getattr(args, f"{attr}{n}") for n in ("certs", "cert", "key", "ca")}
    if getattr(args, where.lstrip("-").replace("-", "_")) is None:
        given = [f"--{prefix}{n}" for n, v in opts.items() if v]
        if given:
            raise UsageError(f"{', '.join(given)} without {where}")
        return None
    peer = getattr(args, f"{attr}peer_name", None)
    try:
        if opts["certs"]:
            try:
                cs = certs.load_cert_set(opts["certs"])
            except certs.CertsError as exc:
                raise CommandFailed(f"--{prefix}certs: {exc}") from exc
            cfg = cs.config("server", cert=opts["cert"], key=opts["key"], ca=opts["ca"], peer_name=peer,
                            pin_peer=pin_client)
        else:
            missing = [f"--{prefix}{n}" for n in ("cert", "key", "ca") if not opts[n]]
            if missing:
                raise UsageError(f"{where} needs mutual TLS: give --{prefix}certs DIR, "
                                 f"or {', '.join(missing)}")
            cfg = TLSConfig.from_paths(opts["cert"], opts["key"], opts["ca"], peer)
        server_context(cfg)  # reads and checks the files now
    except TLSConfigError as exc:
        raise CommandFailed(f"{where}: {exc}") from exc
    return cfg


def _tls_options(group: argparse._ArgumentGroup, prefix: str, whose: str, issued: str) -> None:
    """``--<prefix>certs``, ``--<prefix>cert``, ``--<prefix>key``, ``--<prefix>ca`` of a listener."""
    group.add_argument(f"--{prefix}certs", metavar="DIR", help="a `dataplane certs init` directory")
    group.add_argument(f"--{prefix}cert", metavar="PATH", help=f"{whose} certificate (PEM)")
    group.add_argument(f"--{prefix}key", metavar="PATH", help="its private key (PEM)")
    group.add_argument(f"--{prefix}ca", metavar="PATH", help=f"the CA bundle that issued {issued}")


def _cmd_serve(args: argparse.Namespace) -> int:
    path = unix_api_path("--api", args.api)
    api_tls = _server_tls(args, "api-", "--api-tcp", pin_client=True)
    tls = None
    if api_tls is not None:
        from dataplane.channel.tls import server_context

        tls = server_context(api_tls)
    channel_tls = _server_tls(args, "", "--listen", pin_client=False)

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
