"""``dataplane serve``: the node daemon (see :mod:`dataplane.daemon`)."""

from __future__ import annotations

import argparse

from dataplane.cli.common import (
    EXIT_OK,
    CommandFailed,
    Commands,
    add_command,
    positive_int,
    ready,
    run_loop,
    stop_event,
    unix_api_path,
)

DEFAULT_API = "unix:/run/dataplane/api.sock"


def register_serve(commands: Commands) -> None:
    cmd = add_command(
        commands,
        "serve",
        help="run the node daemon: an HTTP/JSON API on a unix socket (storage migrations, events, metrics)",
        description=(
            "The node daemon. Serves an HTTP/JSON API on a unix socket: storage live migrations\n"
            "(POST /v1/storage-migrations with the parameters of `storage-migrate`; GET to follow one,\n"
            "DELETE to cancel it; GET .../events streams the same JSON events as the command, as\n"
            "server-sent events), /healthz, /readyz, /metrics (Prometheus) and /openapi.json, the\n"
            "contract every request body is checked against. At most --max-storage migrations run at\n"
            "once; more wait in a queue, in order. SIGTERM or SIGINT: no new jobs, the queued ones\n"
            "are cancelled, the running ones roll back unless past their pivot (the VM keeps its old\n"
            "disk) and finish otherwise, then the daemon exits 0. Prints 'dataplane: serve listening\n"
            "on PATH' on stderr once it listens.\n"
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
                     help=f"where the API listens (default: {DEFAULT_API}); TCP is not served yet")
    cmd.add_argument("--max-storage", metavar="N", type=positive_int, default=2,
                     help="storage migrations that run at once; more are queued (default: 2)")
    cmd.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    path = unix_api_path("--api", args.api, " (TCP with mutual TLS is not served yet)")

    async def run() -> int:
        from dataplane.daemon.server import Daemon

        stop = stop_event("stopping: rolling back the migrations before their pivot")
        daemon = Daemon(max_storage=args.max_storage)
        try:
            runner = await daemon.serve(path)
        except OSError as exc:
            raise CommandFailed(f"cannot serve {path}: {exc.strerror or exc}") from exc
        ready(f"serve listening on {path}")
        try:
            await stop.wait()
            await daemon.shutdown()
        finally:
            await runner.cleanup()
        return EXIT_OK

    return run_loop(run)
