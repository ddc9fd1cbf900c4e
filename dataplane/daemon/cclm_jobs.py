"""The cross-cluster jobs of the daemon: a ``migration`` (the source side, what ``dataplane
migrate`` does: :func:`run_migration`) and a ``receiver`` (the destination side, what ``dataplane
receive`` does: :func:`run_receiver`), each made from its validated parameters
(``MigrationRequest`` / ``ReceiverRequest`` of :mod:`.openapi`) and ended as an outcome, the report
event the CLI prints and its one error line.

Besides the CLI's events a job emits ``connected`` (a migration's channel session is up:
``address``, ``connections``) and ``listening`` (a receiver's channel listener: ``address``), the
two lines the CLI writes on stderr. A job's channel, its QEMU connection and its interrupt are its
own: cancelling one never touches another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from dataplane import certs
from dataplane.channel.addr import format_hostport, is_loopback, parse_hostport
from dataplane.channel.client import ChannelClient
from dataplane.channel.errors import ChannelError, ConnectError
from dataplane.channel.server import ChannelServer
from dataplane.channel.session import Limits, SessionConfig
from dataplane.channel.stream import ChannelStream
from dataplane.channel.tls import TLSConfig, TLSConfigError, client_context, server_context
from dataplane.migration import MigrationControl, MigrationError, MigrationOptions, PlanRefused, RolledBack
from dataplane.migration.cclm import CclmReport, ChannelFigures, run_source, run_target
from qmp_driver import DriverError, QemuDriver

from . import journal
from .jobs import JobEnd
from .listener import Slot

log = logging.getLogger(__name__)

__all__ = ["JobRefused", "check_plaintext", "run_migration", "run_receiver", "tls_for"]

#: Sessions a receiver's listener takes at once (the migration, and a `dataplane resolve`).
RECEIVER_SESSIONS = 4


class JobRefused(Exception):
    """The request cannot run as asked (its TLS files, its addresses); nothing was changed."""


def _refused(error: str) -> JobEnd:
    return JobEnd("refused", {"event": "report", "outcome": "refused", "switched_over": False,
                              "error": error}, error)


def tls_for(params: Mapping[str, Any], side: str) -> TLSConfig | None:
    """The TLS configuration of a request's ``tls`` member for ``side`` (``client`` or ``server``):
    a ``certs`` directory (``dataplane certs init``; ``peer_name`` may override the peer's name), or
    ``cert``, ``key``, ``ca`` and ``peer_name``; None for ``plaintext``.

    :raises JobRefused: the files cannot be read or do not fit together (the reason).
    """
    tls = params["tls"]
    if tls.get("plaintext"):
        return None
    try:
        if "certs" in tls:
            try:
                cs = certs.load_cert_set(tls["certs"])
            except certs.CertsError as exc:
                raise JobRefused(f"tls.certs: {exc}") from None
            cfg = cs.config(side, cert=tls.get("cert"), key=tls.get("key"), ca=tls.get("ca"),
                            peer_name=tls.get("peer_name"))
        else:
            cfg = TLSConfig.from_paths(tls["cert"], tls["key"], tls["ca"], tls["peer_name"])
        (server_context if side == "server" else client_context)(cfg)  # reads and checks the files now
    except TLSConfigError as exc:
        raise JobRefused(f"tls: {exc}") from None
    return cfg


def check_plaintext(params: Mapping[str, Any], host: str, tls: TLSConfig | None) -> None:
    """Plaintext only on a loopback ``host``, or where the request says the network is isolated.

    :raises JobRefused: otherwise (why).
    """
    if tls is not None or params["tls"].get("plaintext_network_is_isolated") or is_loopback(host):
        return
    raise JobRefused(f"plaintext on {host or 'every interface'}: any host that reaches it could write "
                     f"this side's data unauthenticated; use TLS, a loopback address, or set "
                     f"tls.plaintext_network_is_isolated if no other host can reach it")


def _channel(params: Mapping[str, Any]) -> dict[str, Any]:
    """The channel options shared by both sides."""
    rate = int(params.get("bandwidth", 0))
    return {"limits": Limits(grace=float(params.get("grace", 60.0))),
            "config": SessionConfig(compression=params.get("compress", "auto")),
            "bandwidth": rate or None}


async def _connect_qemu(params: Mapping[str, Any]) -> tuple[str, QemuDriver]:
    """(what, driver), its changes journaled (:func:`journal.watch`). :raises JobRefused: it cannot
    be reached."""
    if "libvirt" in params:
        uri, dom = params["libvirt"]["uri"], params["libvirt"]["domain"]
        what = f"domain {dom!r} of {uri}"
        connect: Callable[[], Any] = lambda: QemuDriver.connect_libvirt(uri, dom)  # noqa: E731
    else:
        what = f"QEMU at {params['qmp']}"
        connect = lambda: QemuDriver.connect_socket(params["qmp"])  # noqa: E731
    try:
        drv: QemuDriver = await connect()
    except (DriverError, OSError) as exc:
        raise JobRefused(f"cannot reach the {what}: {exc}") from None
    where = {"libvirt": dict(params["libvirt"])} if "libvirt" in params else {"qmp": params["qmp"]}
    try:
        await journal.watch(drv, where)
    except BaseException:
        await drv.close()
        raise
    return what, drv


def migration_options(params: Mapping[str, Any]) -> MigrationOptions:
    """The :class:`MigrationOptions` of a validated ``MigrationRequest`` (the CLI's defaults)."""
    return MigrationOptions(
        downtime_limit_ms=int(params.get("downtime_ms", 300)),
        auto_converge=params.get("auto_converge", "auto") != "off",
        multifd_channels=int(params.get("multifd", 0)), postcopy=params.get("postcopy", "auto"),
        stall_window=float(params.get("stall_window", 10.0)),
        stall_min_shrink=float(params.get("stall_shrink", 0.05)),
        timeout_base=float(params.get("timeout_base", 120.0)),
        timeout_per_gib=float(params.get("timeout_per_gib", 120.0)))


async def run_migration(params: Mapping[str, Any], on_event: Callable[[dict[str, Any]], None],
                        interrupt: asyncio.Event, control: MigrationControl) -> JobEnd:
    """Run the source side of the migration ``params`` asks for (a validated ``MigrationRequest``).

    ``interrupt`` set: roll back unless the switchover happened; ``control``: the downtime limit
    and the channel's bandwidth, live. Never raises for a migration that fails or is refused (that
    is the job's outcome: ``completed``, ``in-doubt``, ``rolled-back``, ``refused``, ``failed``).

    :raises asyncio.CancelledError: cancelled (after the migration's own rollback).
    """
    host, port = parse_hostport(params["to"])
    try:
        tls = tls_for(params, "client")
        check_plaintext(params, host, tls)
    except JobRefused as exc:
        return _refused(str(exc))
    target = format_hostport(host, port)
    ch = _channel(params)
    client = ChannelClient(host, port, tls, plaintext=tls is None,
                           connections=int(params.get("connections", 1)), limits=ch["limits"],
                           config=ch["config"], bandwidth=ch["bandwidth"])
    control.on_bandwidth = lambda rate: client.set_bandwidth(rate or None)
    if control.bandwidth is not None:  # asked before the job started
        client.set_bandwidth(control.bandwidth or None)
    try:
        try:
            await client.start()
        except (ConnectError, ChannelError) as exc:
            return _refused(str(getattr(exc, "reason", None) or exc))  # as `migrate` says it
        on_event({"event": "connected", "address": target, "connections": client.ready_connections})
        try:
            _what, src = await _connect_qemu(params)
        except JobRefused as exc:
            return _refused(str(exc))
        try:
            report = await run_source(client, src, disks=params.get("disks"),
                                      options=migration_options(params), workdir=params.get("workdir"),
                                      on_event=on_event, interrupt=interrupt,
                                      disk_map=dict(params.get("disk_map", {})), control=control,
                                      before_commit=journal.before_commit, receiver=params.get("receiver"))
        except RolledBack as exc:
            d = CclmReport(exc.report, ChannelFigures.from_stats(client.stats())).as_dict()
            why = exc.report.error or "no reason given"
            after = ("a rollback step failed: check the source VM" if exc.report.rollback_errors
                     else "the VM keeps running here on its untouched disks")
            return JobEnd("rolled-back", d, f"rolled back in phase {exc.report.phase}: {why}; {after}")
        except PlanRefused as exc:
            return _refused(str(exc))
        except (MigrationError, DriverError, OSError) as exc:  # the source QEMU or the journal failed
            why = str(exc) or type(exc).__name__
            return JobEnd("failed", {"event": "report", "outcome": "failed", "error": why}, why)
        finally:
            await src.close()
        doubt = (report.migration.error or "no reason given") if report.outcome == "in-doubt" else None
        return JobEnd(report.outcome, report.as_dict(), doubt)
    finally:
        control.on_bandwidth = None
        await client.close()


async def run_receiver(params: Mapping[str, Any], on_event: Callable[[dict[str, Any]], None],
                       interrupt: asyncio.Event, control: Slot | None = None) -> JobEnd:
    """Receive the one migration ``params`` asks for (a validated ``ReceiverRequest``) and run the
    destination side into its QEMU: on a listener of its own (``listen``, ``tls``), or, with
    ``peer``, on the daemon's shared listener (``control``: its place there; see
    :mod:`.listener`). A ``listening`` event gives the address (a port 0 resolved).

    ``interrupt`` set: abort unless the guest already resumed here. Never raises for a migration
    that fails or is refused (the outcome: ``completed``, ``in-doubt``, ``rolled-back``,
    ``refused``, ``aborted``).

    :raises asyncio.CancelledError: cancelled (the source is told to abort unless the guest runs here).
    """
    make_server: Callable[[Callable[[ChannelStream], None]], Any]
    shared = {} if "listen" in params or control is None else {"receiver": control.receiver}
    if "listen" in params:  # a listener of its own, as `dataplane receive`
        host, port = parse_hostport(params["listen"], allow_zero=True, allow_empty_host=True)
        try:
            tls = tls_for(params, "server")
            check_plaintext(params, host, tls)
        except JobRefused as exc:
            return _refused(str(exc))
        ch = _channel(params)

        def make_server(on_stream: Callable[[ChannelStream], None]) -> ChannelServer:
            return ChannelServer(host, port, tls, plaintext=tls is None, limits=ch["limits"],
                                 config=ch["config"], bandwidth=ch["bandwidth"], on_stream=on_stream,
                                 max_sessions=RECEIVER_SESSIONS)
    elif control is None:
        return _refused("this daemon has no channel listener (dataplane serve --listen): "
                        "give the receiver its own listen and tls")
    else:  # the daemon's shared listener
        host, port = control.listener.address
        make_server = control.factory(params["peer"])
    try:
        _what, dst = await _connect_qemu(params)
    except JobRefused as exc:
        return _refused(str(exc))
    listening: list[tuple[str, int]] = []

    def on_listening(address: tuple[str, int]) -> None:
        listening.append(address)
        on_event({"event": "listening", "address": format_hostport(*address), **shared})

    try:
        try:
            rep = await run_target(
                make_server, dst, paused=bool(params.get("paused", False)), workdir=params.get("workdir"),
                on_listening=on_listening, on_event=on_event, interrupt=interrupt,
                allowed=params.get("disks"), sparse=not params.get("preallocated", False))
        except OSError as exc:
            if listening:  # not the listener: the destination failed after it listened
                why = f"{exc.strerror or exc}"
                return JobEnd("failed", {"event": "report", "outcome": "failed", "error": why}, why)
            return _refused(f"cannot listen on {format_hostport(host, port)}: {exc.strerror or exc}")
        except DriverError as exc:
            why = f"the destination QEMU or the journal failed: {exc}"
            return JobEnd("failed", {"event": "report", "outcome": "failed", "error": why}, why)
    finally:
        await dst.close()
    error = rep.error if rep.outcome != "completed" else None
    return JobEnd(rep.outcome, rep.as_dict(), error)
