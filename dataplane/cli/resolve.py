"""``dataplane resolve``: settle a migration that ended in doubt (see :mod:`dataplane.migration.resolve`).

This module parses the options, connects to the local QEMU and, unless ``--peer-destroyed``, to the
other side over a channel session (the destination listens, the source dials), and prints the
resolution. Exit statuses: 0 resolved, 1 refused or failed, 2 wrong command line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from dataplane.cli.common import (
    EXIT_OK,
    CommandFailed,
    Commands,
    UsageError,
    add_command,
    arg_type,
    channel_client,
    channel_options,
    channel_server,
    parse_bind,
    parse_to,
    positive_float,
    ready,
    run_loop,
    tls_config,
)
from dataplane.cli.migration import connect_qemu, qemu_options, qemu_target

__all__ = ["register_resolve"]


def register_resolve(commands: Commands) -> None:
    """Add ``resolve``."""
    res = add_command(
        commands,
        "resolve",
        help="settle a migration that ended in doubt: afterwards exactly one copy of the guest runs",
        description=(
            "A migration ends in doubt (exit status 3) when the two sides lost each other right at the\n"
            "commit: the source QEMU stopped and may have handed the guest over, the destination holds\n"
            "it paused, and neither knows what the other did. Run this on both sides, the destination\n"
            "with --listen and the source with --to, with the same TLS options as the migration (the\n"
            "in-doubt report prints both command lines). Each side reads its QEMU's state, the two\n"
            "exchange them, and the side that stays stopped confirms before the other acts:\n"
            "  - both QEMUs completed the migration (or the source is in postcopy): the destination\n"
            "    resumes (commit);\n"
            "  - otherwise: the source resumes (abort): a migration still active is cancelled, the\n"
            "    migration's mirror jobs and NBD nodes are removed and its capabilities turned off;\n"
            "  - one side runs already: nothing changes; both run: refused, a person must choose.\n"
            "Anything unsafe is refused and changes nothing. If the other side's QEMU is destroyed for\n"
            "good, --peer-destroyed resolves alone (you vouch that it can never run): the destination\n"
            "resumes if it holds the whole guest; the source resumes unless a postcopy moved its state.\n"
            "\n"
            "exit status: 0 resolved (the report says which copy runs), 1 refused or failed (nothing\n"
            "unsafe was done), 2 wrong command line."
        ),
        examples=[
            ("dataplane resolve --qmp /run/dst/qmp.sock --listen 0.0.0.0:7000 --certs ./pki",
             "the destination"),
            ("dataplane resolve --qmp /run/vm/qmp.sock --to dst.example:7000 --certs ./pki", "the source"),
            ("dataplane resolve --qmp /run/vm/qmp.sock --peer-destroyed --role source",
             "alone: the destination's QEMU is gone for good"),
        ],
    )
    qemu_options(res, "local")
    where = res.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="HOST:PORT", type=arg_type(parse_bind),
                       help="the destination side: listen for the source's resolve")
    where.add_argument("--to", metavar="HOST:PORT", type=arg_type(parse_to),
                       help="the source side: dial the destination's resolve")
    res.add_argument("--peer-destroyed", action="store_true",
                     help="resolve alone: the other side's QEMU is destroyed and can never run "
                          "(needs --role)")
    res.add_argument("--role", choices=["source", "destination"],
                     help="this side's role, with --peer-destroyed")
    res.add_argument("--timeout", metavar="SECONDS", type=arg_type(positive_float), default=300.0,
                     help="how long to wait for the other side (default: 300)")
    res.add_argument("--output", choices=["text", "json"], default="text",
                     help="json: the report as one JSON object on stdout")
    channel_options(res, side="server")
    res.set_defaults(handler=_cmd_resolve)


def _cmd_resolve(args: argparse.Namespace) -> int:
    what, connect = qemu_target(args)
    if args.peer_destroyed:
        if args.listen or args.to:
            raise UsageError("--peer-destroyed resolves alone: do not give --listen or --to")
        if not args.role:
            raise UsageError("--peer-destroyed needs --role source or --role destination")
        return run_loop(lambda: _resolve_alone(args, what, connect))
    if args.role:
        raise UsageError("--role goes with --peer-destroyed (otherwise --listen / --to say the role)")
    if not (args.listen or args.to):
        raise UsageError("give --listen HOST:PORT (destination) or --to HOST:PORT (source), "
                         "or --peer-destroyed --role ROLE")
    side = "server" if args.listen else "client"
    tls = tls_config(args, side)
    args.connections = 1
    return run_loop(lambda: _resolve_pair(args, what, connect, tls))


def _print_resolution(args: argparse.Namespace, role: str, resolution: Any, me: Any, peer: Any) -> int:
    where = {"completed": "the destination", "rolled-back": "the source"}.get(resolution.outcome, "no copy")
    report = {"event": "report", "role": role, "action": resolution.action, "outcome": resolution.outcome,
              "reason": resolution.reason, "state": vars(me) if me else None,
              "peer_state": vars(peer) if peer else None}
    if args.output == "json":
        print(json.dumps(report), flush=True)
    else:
        print(f"resolved: {resolution.action} ({resolution.reason}); outcome {resolution.outcome}: "
              f"the guest runs on {where}", flush=True)
    return EXIT_OK


async def _resolve_alone(args: argparse.Namespace, what: str, connect: Callable[[], Any]) -> int:
    from dataplane.migration.resolve import ResolveError, resolve_alone

    drv = await connect_qemu(what, connect)
    try:
        resolution, me = await resolve_alone(drv, args.role)
    except ResolveError as exc:
        raise CommandFailed(f"not resolved: {exc}") from exc
    finally:
        await drv.close()
    return _print_resolution(args, args.role, resolution, me, None)


async def _resolve_pair(args: argparse.Namespace, what: str, connect: Callable[[], Any], tls: Any) -> int:
    import asyncio

    from dataplane.channel.addr import format_hostport
    from dataplane.channel.errors import ChannelError, ConnectError
    from dataplane.migration import ControlLost
    from dataplane.migration.control_stream import ControlStream
    from dataplane.migration.resolve import (
        ResolveError,
        accept_resolve_stream,
        dial_resolve,
        serve_resolve,
    )

    drv = await connect_qemu(what, connect)
    role = "destination" if args.listen else "source"
    try:
        if args.listen:
            arrived: asyncio.Future[ControlStream] = asyncio.get_running_loop().create_future()
            server = channel_server(args, tls, args.listen, on_stream=accept_resolve_stream(arrived),
                                    max_sessions=1)
            try:
                await server.start()
            except OSError as exc:
                raise CommandFailed(f"cannot listen on {format_hostport(*args.listen)}: {exc}") from exc
            ready(f"resolve listening on {format_hostport(*server.address)}")
            try:
                resolution, me, peer = await serve_resolve(arrived, drv, timeout=args.timeout)
            finally:
                if arrived.done():
                    await arrived.result().drain()
                await server.close()
        else:
            client = channel_client(args, tls)
            try:
                await asyncio.wait_for(client.start(), args.timeout)
            except (ConnectError, ChannelError, TimeoutError) as exc:
                raise CommandFailed(f"cannot reach the destination's resolve: {exc}") from exc
            control = ControlStream()
            try:
                resolution, me, peer = await dial_resolve(client, control, drv)
            finally:
                await control.drain()
                await client.close()
    except (ResolveError, ControlLost, TimeoutError) as exc:
        raise CommandFailed(f"not resolved: {exc}") from exc
    finally:
        await drv.close()
    return _print_resolution(args, role, resolution, me, peer)
