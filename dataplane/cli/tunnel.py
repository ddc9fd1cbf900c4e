"""``dataplane tunnel listen|connect``: local sockets carried across clusters over the channel."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dataplane.aio import cancel_and_collect, first_done
from dataplane.cli.common import (
    EXIT_OK,
    CommandFailed,
    Commands,
    StatsWriter,
    UsageError,
    add_command,
    arg_type,
    channel_client,
    channel_options,
    channel_server,
    check_connections,
    check_stats_path,
    log,
    parse_bind,
    parse_to,
    positive_int,
    ready,
    run_loop,
    stop_event,
    tls_config,
)

if TYPE_CHECKING:
    from dataplane.channel.addr import Endpoint

__all__ = ["register_tunnel"]


def parse_forward(text: str) -> tuple[str, Endpoint]:
    from dataplane.channel.addr import parse_mapping

    return parse_mapping(text)


def parse_expose(text: str) -> tuple[str, Endpoint]:
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
    listen.add_argument("--bind", metavar="HOST:PORT", required=True, type=arg_type(parse_bind),
                        help="where to listen ([IPv6]:PORT for IPv6; :PORT for every interface)")
    listen.add_argument("--forward", metavar="NAME=TARGET", action="append", required=True,
                        type=arg_type(parse_forward), dest="forwards",
                        help="connect streams named NAME to TARGET (unix:/PATH or tcp:HOST:PORT); repeat")
    channel_options(listen, side="server")
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
    connect.add_argument("--to", metavar="HOST:PORT", required=True, type=arg_type(parse_to),
                         help="the listener ([IPv6]:PORT for IPv6)")
    connect.add_argument("--expose", metavar="NAME=LISTEN", action="append", required=True,
                         type=arg_type(parse_expose), dest="exposes",
                         help="listen on LISTEN (unix:/PATH or tcp:HOST:PORT); each connection becomes a "
                              "stream NAME; repeat")
    connect.add_argument("--connections", metavar="N", type=positive_int, default=1,
                         help="TCP connections of the session, 1..16 (default: 1)")
    channel_options(connect, side="client")
    connect.set_defaults(handler=_cmd_tunnel_connect)


def _tunnel_mappings(pairs: Sequence[tuple[str, Endpoint]], option: str) -> dict[str, Endpoint]:
    out: dict[str, Endpoint] = {}
    for name, ep in pairs:
        if name in out:
            raise UsageError(f"{option}: the name {name!r} is given twice")
        out[name] = ep
    return out


def _cmd_tunnel_listen(args: argparse.Namespace) -> int:
    forwards = _tunnel_mappings(args.forwards, "--forward")
    tls = tls_config(args, "server")
    check_stats_path(args.stats_json)

    async def run() -> int:
        import asyncio

        from dataplane.channel.addr import format_hostport
        from dataplane.channel.connection import os_error_text
        from dataplane.channel.relay import DestinationRelay
        from dataplane.units import format_rate

        host, port = args.bind
        relay = DestinationRelay(forwards)
        server = channel_server(args, tls, args.bind, on_stream=relay.on_stream)
        stop = stop_event()
        try:
            await server.start()
        except OSError as exc:
            where = format_hostport(host, port)
            raise CommandFailed(f"cannot listen on {where}: {os_error_text(exc)}") from exc
        stats = StatsWriter(args.stats_json, server.stats)
        stats.write()
        if args.bandwidth:
            log.info("bandwidth cap per session: %s", format_rate(args.bandwidth))
        ready(f"tunnel listening on {format_hostport(*server.address)}")
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

    return run_loop(run)


def _cmd_tunnel_connect(args: argparse.Namespace) -> int:
    exposes = _tunnel_mappings(args.exposes, "--expose")
    tls = tls_config(args, "client")
    check_stats_path(args.stats_json)
    check_connections(args.connections)

    async def run() -> int:
        import asyncio

        from dataplane.channel.addr import format_hostport
        from dataplane.channel.errors import ChannelError, ConnectError
        from dataplane.channel.relay import SourceRelay
        from dataplane.units import format_rate

        target = format_hostport(*args.to)
        client = channel_client(args, tls)
        relay = SourceRelay(client, exposes)
        stop = stop_event()
        stats = StatsWriter(args.stats_json, client.stats)
        try:
            await relay.start()
        except OSError as exc:
            raise CommandFailed(str(exc)) from exc
        writer: asyncio.Task[None] | None = None
        try:
            starting = asyncio.create_task(client.start())
            await first_done(starting, stop.wait())
            if not starting.done():
                log.info("interrupted while connecting to %s", target)
                await cancel_and_collect(starting)
                await client.close()
                return EXIT_OK
            try:
                starting.result()
            except (ConnectError, ChannelError) as exc:
                raise CommandFailed(str(exc.reason or exc)) from exc
            stats.write()
            if args.bandwidth:
                log.info("bandwidth cap: %s", format_rate(args.bandwidth))
            ready(f"tunnel connected to {target} ({client.ready_connections} connections)")
            writer = asyncio.create_task(stats.run())
            await first_done(client.done, stop.wait())
            if client.done.done():
                error = client.done.result()
                if error is None:
                    log.info("the listener closed the session")
                    return EXIT_OK
                raise CommandFailed(f"session with {target} failed: {error.reason or type(error).__name__}")
            log.info("shutting down: closing the session")
            await client.close()
            return EXIT_OK
        finally:
            if writer is not None:
                writer.cancel()
            await relay.close()
            stats.write()

    return run_loop(run)
