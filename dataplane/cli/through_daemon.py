"""``dataplane --daemon unix:PATH COMMAND ...``: run a command as a job of the node daemon, with
the standalone command's output and exit status.

The command line becomes the job's request; the job's events are printed as the command prints its
own; ``connected`` and ``listening`` become the command's lines on stderr; SIGINT/SIGTERM cancel
the job (it rolls back as the command would). The report and the job's error line decide the exit
status, through the command's own ``finish``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from dataplane.cli.common import CommandFailed, UsageError, ready, run_loop, stop_event, unix_api_path

log = logging.getLogger(__name__)

__all__ = ["Finish", "through_daemon", "tls_request"]

#: ``finish(report, job)``: print the report as the command does and return its exit status (or
#: raise CommandFailed / InDoubt); ``job`` is the ended job (``state``, ``error``).
Finish = Callable[[dict[str, Any], dict[str, Any]], int]

#: The stderr line of each event the daemon adds to a command's own.
_READY_LINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "connected": lambda e: f"migrate connected to {e.get('address')} ({e.get('connections')} connections)",
    "listening": lambda e: f"receive listening on {e.get('address')}"
                           + (f" as receiver {e['receiver']}" if e.get("receiver") else ""),
}


def tls_request(args: argparse.Namespace) -> dict[str, Any]:
    """The ``tls`` member of a request for the TLS options of the command line (paths made absolute:
    the daemon reads them). Check them first with ``tls_config``, which gives the command's errors."""
    import os

    if args.plaintext:
        return {"plaintext": True,
                "plaintext_network_is_isolated": bool(getattr(args, "plaintext_network_is_isolated", False))}
    out: dict[str, Any] = {}
    files = {k: getattr(args, k) for k in ("cert", "key", "ca")}
    if args.certs is not None and not all(files.values()):
        out["certs"] = os.path.abspath(args.certs)
    out.update({k: os.path.abspath(v) for k, v in files.items() if v is not None})
    if args.peer_name:
        out["peer_name"] = args.peer_name
    return out


def through_daemon(args: argparse.Namespace, resource: str, body: dict[str, Any],
                   printer: Callable[[dict[str, Any]], None], finish: Finish, stopping: str) -> int:
    """Run ``body`` as a job of ``resource`` in the daemon of ``--daemon``; return ``finish``'s exit
    status. ``stopping`` says what a signal does (logged).

    :raises UsageError: ``--daemon`` is not ``unix:PATH``.
    :raises CommandFailed: the daemon cannot be reached or refused the request, or its event stream
        ended without a report.
    """
    path = unix_api_path("--daemon", args.daemon)
    if getattr(args, "stats_json", None) is not None:
        raise UsageError("--stats-json is not available with --daemon: the daemon's /metrics has the figures")

    async def run() -> int:
        import asyncio

        from dataplane.daemon.client import DaemonClient, DaemonError

        stop = stop_event(stopping)
        report: dict[str, Any] | None = None
        async with DaemonClient(path) as api:
            try:
                job = await api.create(resource, body)
                log.info("daemon job %s (%s)", job["id"], job["state"])

                async def cancel_on_signal() -> None:
                    await stop.wait()
                    await api.cancel(resource, job["id"])

                canceller = asyncio.create_task(cancel_on_signal())
                try:
                    async for event in api.events(resource, job["id"]):
                        kind = str(event.get("event"))
                        if kind == "report":
                            report = event
                        elif kind in _READY_LINES:
                            ready(_READY_LINES[kind](event))
                        else:
                            printer(event)
                finally:
                    canceller.cancel()
                ended = await api.get(resource, job["id"])
            except DaemonError as exc:
                raise CommandFailed(str(exc)) from None
        if report is None:
            raise CommandFailed("the daemon's event stream ended without a report")
        return finish(report, ended)

    return run_loop(run)
