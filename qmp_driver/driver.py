"""One driver object per QEMU instance: typed async methods over any transport.

Example::

    drv = await QemuDriver.connect_socket("/run/vm/qmp.sock")
    async with drv:
        print(drv.version, (await drv.query_status()).status)
        await drv.blockdev_mirror("m0", "disk0", "target0", sync="full")
        await drv.wait_job_ready("m0", timeout=60)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from .errors import CommandError, ConnectionLost, DriverTimeout, Unsupported
from .events import Event, Predicate, Subscription, match
from .schema import Features, QmpSchema
from .socket_transport import SocketTransport
from .transport import Transport
from .types import (
    BlockDevice,
    BlockExport,
    BlockJob,
    BlockNode,
    JobInfo,
    MigrationInfo,
    StatusInfo,
    VersionInfo,
)

log = logging.getLogger(__name__)

#: Default deadline for one command's reply. QMP commands return quickly; long
#: work (mirrors, migration) runs in the background and is awaited via events.
COMMAND_TIMEOUT = 60.0

MIGRATION_DONE = frozenset({"completed", "failed", "cancelled"})


def _opt(args: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Add every keyword whose value is not None, turning ``a_b`` into ``a-b``."""
    for k, v in kwargs.items():
        if v is not None:
            args[k.replace("_", "-")] = v
    return args


class Action:
    """Builders for ``transaction`` actions (dirty bitmaps, mostly)."""

    @staticmethod
    def bitmap_add(node: str, name: str, granularity: int | None = None, persistent: bool | None = None,
                   disabled: bool | None = None) -> dict[str, Any]:
        data = _opt({"node": node, "name": name}, granularity=granularity, persistent=persistent,
                    disabled=disabled)
        return {"type": "block-dirty-bitmap-add", "data": data}

    @staticmethod
    def bitmap_remove(node: str, name: str) -> dict[str, Any]:
        return {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": name}}

    @staticmethod
    def bitmap_clear(node: str, name: str) -> dict[str, Any]:
        return {"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": name}}

    @staticmethod
    def bitmap_enable(node: str, name: str) -> dict[str, Any]:
        return {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": name}}

    @staticmethod
    def bitmap_disable(node: str, name: str) -> dict[str, Any]:
        return {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": name}}

    @staticmethod
    def bitmap_merge(node: str, target: str, bitmaps: Iterable[str | dict[str, str]]) -> dict[str, Any]:
        return {"type": "block-dirty-bitmap-merge",
                "data": {"node": node, "target": target, "bitmaps": list(bitmaps)}}


#: ``before_change(driver, command, arguments)`` (see :attr:`QemuDriver.before_change`).
BeforeChange = Callable[["QemuDriver", str, Mapping[str, Any] | None], Awaitable[None]]


class QemuDriver:
    """Asynchronous control of one QEMU, over a QMP socket or through libvirt.

    Create it with :meth:`connect_socket` or :meth:`connect_libvirt`; both run
    discovery (version, commands, migration capabilities) before returning.
    All methods raise :class:`~qmp_driver.errors.CommandError` when QEMU
    refuses, :class:`~qmp_driver.errors.ConnectionLost` when the monitor goes
    away, :class:`~qmp_driver.errors.DriverTimeout` past their deadline and
    :class:`~qmp_driver.errors.Unsupported` when this QEMU lacks the command.
    """

    def __init__(self, transport: Transport, *, command_timeout: float = COMMAND_TIMEOUT) -> None:
        self.transport = transport
        self.command_timeout = command_timeout
        self.version = VersionInfo(0, 0, 0)
        self.commands: frozenset[str] = frozenset()
        self.migration_capabilities: frozenset[str] = frozenset()
        self._features: Features | None = None
        #: awaited with (driver, command, arguments) before every command that is not a ``query-*``
        #: (one that may change the QEMU): a crash journal writes it down first. Its exceptions
        #: propagate, and the command is then not sent.
        self.before_change: BeforeChange | None = None

    # ------------------------------------------------------------------ setup

    @classmethod
    async def connect_socket(cls, path: str, *, timeout: float = 10.0) -> QemuDriver:
        """Connect to a QMP unix socket.

        :raises ConnectFailed: nothing listens there, or it is not QMP.
        :raises DriverTimeout: no greeting within ``timeout``.
        """
        return await cls._start(await SocketTransport.connect(path, timeout=timeout))

    @classmethod
    async def connect_libvirt(cls, uri: str, domain: str, *, timeout: float = 10.0) -> QemuDriver:
        """Attach to a running libvirt domain (by name or UUID) on ``uri``.

        :raises DomainNotFound: no such domain.
        :raises ConnectFailed: libvirt unreachable or the domain is not running.
        :raises DriverTimeout: libvirt did not answer within ``timeout``.
        """
        from .libvirt_transport import LibvirtTransport  # imports libvirt-python: only when asked for

        return await cls._start(await LibvirtTransport.connect(uri, domain, timeout=timeout))

    @classmethod
    async def _start(cls, transport: Transport) -> QemuDriver:
        drv = cls(transport)
        try:
            await drv.discover()
        except BaseException:
            await transport.close()
            raise
        return drv

    async def discover(self) -> None:
        """Learn QEMU's version, its commands and its migration capabilities.

        :raises ConnectionLost, DriverTimeout, CommandError: from the queries.
        """
        self.version = VersionInfo.from_qmp(await self.execute("query-version"))
        self.commands = frozenset(c["name"] for c in await self.execute("query-commands"))
        if "query-migrate-capabilities" in self.commands:
            caps = await self.execute("query-migrate-capabilities")
            self.migration_capabilities = frozenset(c["capability"] for c in caps)

    async def schema(self) -> QmpSchema:
        """This QEMU's QMP schema (``query-qmp-schema``), for questions a version number cannot answer.

        :raises ConnectionLost, DriverTimeout, CommandError: from the query.
        """
        return QmpSchema(await self.execute("query-qmp-schema"))

    async def features(self) -> Features:
        """What this QEMU can do that the data plane's behaviour depends on (read once, then cached).

        Found in its schema and its migration capabilities, never assumed from its version.
        :raises ConnectionLost, DriverTimeout, CommandError: from the query.
        """
        if self._features is None:
            self._features = Features.detect(await self.schema(), self.migration_capabilities)
        return self._features

    async def close(self) -> None:
        """Close the monitor connection. Idempotent; never raises."""
        await self.transport.close()

    async def __aenter__(self) -> QemuDriver:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<QemuDriver {self.transport.describe()} QEMU {self.version}>"

    # ------------------------------------------------------------ primitives

    def supports(self, command: str) -> bool:
        """True if this QEMU offers ``command``."""
        return command in self.commands

    def require(self, command: str) -> None:
        """:raises Unsupported: this QEMU lacks ``command``."""
        if self.commands and command not in self.commands:
            raise Unsupported(f"QMP command {command!r}", str(self.version))

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      *, timeout: float | None = None) -> Any:
        """Run any QMP command and return its ``return`` member.

        :raises CommandError, ConnectionLost, DriverTimeout: see the class doc.
        :raises Unsupported: the command is not offered by this QEMU.
        """
        self.require(command)
        if self.before_change is not None and not command.startswith("query-"):
            await self.before_change(self, command, arguments)
        return await self.transport.execute(command, arguments,
                                            timeout=self.command_timeout if timeout is None else timeout)

    # ----------------------------------------------------------------- events

    def expect(self, predicate: Predicate, maxlen: int = 4096) -> Subscription:
        """Subscribe to events matching ``predicate``; use before sending the trigger.

        Use as a context manager::

            with drv.expect(match("BLOCK_JOB_READY", device="m0")) as ready:
                await drv.blockdev_mirror("m0", ...)
                await ready.wait(timeout=60)
        """
        return self.transport.hub.subscribe(predicate, maxlen)

    def on_event(self, fn: Any) -> None:
        """Call ``fn(event)`` for every event (logging, metrics)."""
        self.transport.hub.add_listener(fn)

    async def wait_event(self, predicate: Predicate, timeout: float | None = None) -> Event:
        """Wait for the next event matching ``predicate`` (only events from now on).

        :raises DriverTimeout: none within ``timeout``.
        :raises ConnectionLost: the monitor went away.
        """
        with self.expect(predicate) as sub:
            return await sub.wait(timeout)

    async def execute_and_wait(self, command: str, arguments: Mapping[str, Any] | None,
                               predicate: Predicate, timeout: float | None = None) -> tuple[Any, Event]:
        """Send a command and await the event it causes, subscribed beforehand.

        :raises CommandError: the command failed (nothing is awaited then).
        :raises DriverTimeout: the event did not come within ``timeout``.
        :raises ConnectionLost, Unsupported: see the class doc.
        """
        with self.expect(predicate) as sub:
            result = await self.execute(command, arguments)
            return result, await sub.wait(timeout)

    # -------------------------------------------------------------- run state

    async def query_status(self) -> StatusInfo:
        """``query-status``."""
        return StatusInfo.from_qmp(await self.execute("query-status"))

    async def stop(self) -> None:
        """Pause the guest (``stop``)."""
        await self.execute("stop")

    async def cont(self) -> None:
        """Resume the guest (``cont``)."""
        await self.execute("cont")

    async def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to exit and wait until the monitor closes.

        :raises DriverTimeout: QEMU still answers after ``timeout``.
        """
        sub = self.transport.hub.subscribe(lambda ev: False)
        try:
            try:
                await self.execute("quit")
            except ConnectionLost:
                return
            try:
                await sub.wait(timeout)
            except ConnectionLost:
                return
        finally:
            sub.close()

    # ------------------------------------------------------------ block graph

    async def blockdev_add(self, options: Mapping[str, Any]) -> None:
        """``blockdev-add`` with the given options (``driver``, ``node-name``, ...)."""
        await self.execute("blockdev-add", options)

    async def blockdev_del(self, node_name: str) -> None:
        """``blockdev-del``: remove a node that nothing uses any more."""
        await self.execute("blockdev-del", {"node-name": node_name})

    async def query_named_block_nodes(self, flat: bool = True) -> list[BlockNode]:
        """``query-named-block-nodes`` (flat: no nested backing chains)."""
        return [BlockNode.from_qmp(n) for n in await self.execute("query-named-block-nodes", {"flat": flat})]

    async def query_block(self) -> list[BlockDevice]:
        """``query-block``: the guest's block devices."""
        return [BlockDevice.from_qmp(b) for b in await self.execute("query-block")]

    async def node(self, node_name: str) -> BlockNode:
        """The named node.

        :raises KeyError: no node of that name.
        """
        for n in await self.query_named_block_nodes():
            if n.node_name == node_name:
                return n
        raise KeyError(node_name)

    # ------------------------------------------------------------- block jobs

    async def blockdev_mirror(self, job_id: str, device: str, target: str, *, sync: str = "full",
                              granularity: int | None = None, buf_size: int | None = None,
                              copy_mode: str | None = None, speed: int | None = None,
                              auto_finalize: bool | None = None, auto_dismiss: bool | None = None,
                              on_source_error: str | None = None, on_target_error: str | None = None,
                              replaces: str | None = None, filter_node_name: str | None = None) -> None:
        """Start ``blockdev-mirror`` from node ``device`` to existing node ``target``.

        ``copy_mode`` is ``background`` (default) or ``write-blocking``.
        """
        args = _opt({"job-id": job_id, "device": device, "target": target, "sync": sync},
                    granularity=granularity, buf_size=buf_size, copy_mode=copy_mode, speed=speed,
                    auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, on_source_error=on_source_error,
                    on_target_error=on_target_error, replaces=replaces, filter_node_name=filter_node_name)
        await self.execute("blockdev-mirror", args)

    async def drive_mirror(self, job_id: str, device: str, target: str, *, sync: str = "full",
                           format: str | None = None, mode: str | None = None,
                           granularity: int | None = None, buf_size: int | None = None,
                           copy_mode: str | None = None, speed: int | None = None,
                           auto_finalize: bool | None = None, auto_dismiss: bool | None = None,
                           node_name: str | None = None, replaces: str | None = None) -> None:
        """Start ``drive-mirror`` to a file ``target`` (``mode``: existing / absolute-paths)."""
        args = _opt({"job-id": job_id, "device": device, "target": target, "sync": sync},
                    format=format, mode=mode, granularity=granularity, buf_size=buf_size,
                    copy_mode=copy_mode, speed=speed, auto_finalize=auto_finalize,
                    auto_dismiss=auto_dismiss, node_name=node_name, replaces=replaces)
        await self.execute("drive-mirror", args)

    async def query_block_jobs(self) -> list[BlockJob]:
        """``query-block-jobs``."""
        return [BlockJob.from_qmp(j) for j in await self.execute("query-block-jobs")]

    async def query_jobs(self) -> list[JobInfo]:
        """``query-jobs`` (all job types, with their status)."""
        return [JobInfo.from_qmp(j) for j in await self.execute("query-jobs")]

    async def job_complete(self, job_id: str) -> None:
        """Pivot a READY mirror to its target (``job-complete``, else ``block-job-complete``)."""
        if self.supports("job-complete"):
            await self.execute("job-complete", {"id": job_id})
        else:
            await self.execute("block-job-complete", {"device": job_id})

    async def block_job_cancel(self, job_id: str, force: bool = False) -> None:
        """``block-job-cancel``. Not forced on a READY mirror, the target stays a
        consistent point-in-time copy and the job ends ``concluded``."""
        await self.execute("block-job-cancel", {"device": job_id, "force": force})

    async def job_cancel(self, job_id: str) -> None:
        """``job-cancel``."""
        await self.execute("job-cancel", {"id": job_id})

    async def job_finalize(self, job_id: str) -> None:
        """``job-finalize`` (for jobs started with auto-finalize off)."""
        await self.execute("job-finalize", {"id": job_id})

    async def job_dismiss(self, job_id: str) -> None:
        """``job-dismiss`` (for jobs started with auto-dismiss off)."""
        await self.execute("job-dismiss", {"id": job_id})

    async def block_job_set_speed(self, job_id: str, speed: int) -> None:
        """``block-job-set-speed`` in bytes/s (0 = unlimited)."""
        await self.execute("block-job-set-speed", {"device": job_id, "speed": speed})

    async def wait_job_ready(self, job_id: str, timeout: float | None = None) -> Event:
        """Wait for ``BLOCK_JOB_READY`` of ``job_id``; returns at once if already ready.

        :raises DriverTimeout, ConnectionLost: see :meth:`wait_event`.
        :raises CommandError: the job ended (error or cancel) before READY.
        """
        pred = match(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"),
                     device=job_id)
        with self.expect(pred) as sub:
            for j in await self.query_block_jobs():
                if j.device == job_id and j.ready:
                    return Event("BLOCK_JOB_READY", {"device": job_id, "len": j.length, "offset": j.offset})
            while True:
                ev = await sub.wait(timeout)
                if ev.name == "BLOCK_JOB_READY":
                    return ev
                if ev.name == "BLOCK_JOB_ERROR":
                    continue  # reported; the job decides (on-*-error) whether it ends
                err = ev.data.get("error") or f"job {ev.name.split('_')[-1].lower()} before READY"
                raise CommandError("wait_job_ready", {"job": job_id}, "JobFailed", str(err))

    async def wait_job_status(self, job_id: str, statuses: str | Iterable[str],
                              timeout: float | None = None) -> Event:
        """Wait for ``JOB_STATUS_CHANGE`` of ``job_id`` to one of ``statuses``;
        returns at once if the job already is there."""
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        with self.expect(match("JOB_STATUS_CHANGE", id=job_id, status=frozenset(wanted))) as sub:
            for j in await self.query_jobs():
                if j.id == job_id and j.status in wanted:
                    return Event("JOB_STATUS_CHANGE", {"id": job_id, "status": j.status})
            return await sub.wait(timeout)

    # ---------------------------------------------------------- dirty bitmaps

    async def bitmap_add(self, node: str, name: str, granularity: int | None = None,
                         persistent: bool | None = None, disabled: bool | None = None) -> None:
        """``block-dirty-bitmap-add``."""
        await self.execute("block-dirty-bitmap-add", Action.bitmap_add(node, name, granularity, persistent,
                                                                       disabled)["data"])

    async def bitmap_remove(self, node: str, name: str) -> None:
        """``block-dirty-bitmap-remove``."""
        await self.execute("block-dirty-bitmap-remove", {"node": node, "name": name})

    async def bitmap_clear(self, node: str, name: str) -> None:
        """``block-dirty-bitmap-clear``."""
        await self.execute("block-dirty-bitmap-clear", {"node": node, "name": name})

    async def bitmap_enable(self, node: str, name: str) -> None:
        """``block-dirty-bitmap-enable``."""
        await self.execute("block-dirty-bitmap-enable", {"node": node, "name": name})

    async def bitmap_disable(self, node: str, name: str) -> None:
        """``block-dirty-bitmap-disable``."""
        await self.execute("block-dirty-bitmap-disable", {"node": node, "name": name})

    async def bitmap_merge(self, node: str, target: str, bitmaps: Iterable[str | dict[str, str]]) -> None:
        """``block-dirty-bitmap-merge`` of ``bitmaps`` into ``target``."""
        await self.execute("block-dirty-bitmap-merge", Action.bitmap_merge(node, target, bitmaps)["data"])

    async def transaction(self, actions: Iterable[Mapping[str, Any]],
                          completion_mode: str | None = None) -> None:
        """Run ``actions`` (see :class:`Action`) atomically: all or none take effect."""
        args: dict[str, Any] = {"actions": list(actions)}
        if completion_mode:
            args["properties"] = {"completion-mode": completion_mode}
        await self.execute("transaction", args)

    async def query_bitmaps(self, node: str) -> list[dict[str, Any]]:
        """The dirty bitmaps of ``node`` (name, count, granularity, recording, ...).

        :raises KeyError: no node of that name.
        """
        return (await self.node(node)).dirty_bitmaps

    # -------------------------------------------------------------------- NBD

    async def nbd_server_start(self, addr: Mapping[str, Any] | str, *, tls_creds: str | None = None,
                               max_connections: int | None = None) -> None:
        """``nbd-server-start``. ``addr`` is a unix socket path or a QMP SocketAddress dict."""
        if isinstance(addr, str):
            addr = {"type": "unix", "path": addr}
        addr = dict(addr)
        if "data" not in addr:  # nbd-server-start takes the legacy {"type", "data": {...}} form
            kind = addr.pop("type")
            addr = {"type": kind, "data": addr}
        args = _opt({"addr": addr}, tls_creds=tls_creds, max_connections=max_connections)
        await self.execute("nbd-server-start", args)

    async def nbd_server_stop(self) -> None:
        """``nbd-server-stop``: drops every export and client."""
        await self.execute("nbd-server-stop")

    async def block_export_add(self, export_id: str, node_name: str, *, name: str | None = None,
                               writable: bool = False, description: str | None = None) -> None:
        """Export ``node_name`` over the running NBD server under ``name`` (default: the id).

        Uses ``block-export-add`` (QEMU >= 5.2), else ``nbd-server-add``.
        """
        export_name = name or export_id
        if self.supports("block-export-add"):
            args = _opt({"type": "nbd", "id": export_id, "node-name": node_name, "name": export_name,
                         "writable": writable}, description=description)
            await self.execute("block-export-add", args)
        else:
            await self.execute("nbd-server-add", {"device": node_name, "name": export_name,
                                                  "writable": writable})

    async def block_export_del(self, export_id: str, mode: str | None = None) -> None:
        """Remove an export (``block-export-del``, else ``nbd-server-remove``).

        ``mode`` is ``safe`` (refuse while clients are connected) or ``hard``.
        """
        if self.supports("block-export-del"):
            await self.execute("block-export-del", _opt({"id": export_id}, mode=mode))
        else:
            await self.execute("nbd-server-remove", _opt({"name": export_id}, mode=mode))

    async def query_block_exports(self) -> list[BlockExport]:
        """``query-block-exports``."""
        return [BlockExport.from_qmp(e) for e in await self.execute("query-block-exports")]

    # -------------------------------------------------------------- migration

    async def migrate_set_capabilities(self, caps: Mapping[str, bool]) -> None:
        """Set migration capabilities, e.g. ``{"events": True, "pause-before-switchover": True}``.

        :raises Unsupported: a capability is unknown to this QEMU.
        """
        for name in caps:
            if self.migration_capabilities and name not in self.migration_capabilities:
                raise Unsupported(f"migration capability {name!r}", str(self.version))
        await self.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": k, "state": bool(v)} for k, v in caps.items()]})

    async def query_migrate_capabilities(self) -> dict[str, bool]:
        """``query-migrate-capabilities`` as ``{name: state}``."""
        return {c["capability"]: bool(c["state"]) for c in await self.execute("query-migrate-capabilities")}

    async def migrate_set_parameters(self, params: Mapping[str, Any]) -> None:
        """``migrate-set-parameters`` with QMP names (``max-bandwidth``, ``downtime-limit``, ...)."""
        await self.execute("migrate-set-parameters", dict(params))

    async def query_migrate_parameters(self) -> dict[str, Any]:
        """``query-migrate-parameters``."""
        return dict(await self.execute("query-migrate-parameters"))

    async def migrate(self, uri: str, *, resume: bool | None = None) -> None:
        """Start an outgoing migration to ``uri`` (``unix:``, ``tcp:``, ``fd:``, ``exec:``)."""
        await self.execute("migrate", _opt({"uri": uri}, resume=resume))

    async def migrate_incoming(self, uri: str) -> None:
        """Start listening for an incoming migration (QEMU started with ``-incoming defer``)."""
        await self.execute("migrate-incoming", {"uri": uri})

    async def migrate_cancel(self) -> None:
        """``migrate_cancel``: abort the outgoing migration; the source keeps running."""
        await self.execute("migrate_cancel")

    async def migrate_continue(self, state: str = "pre-switchover") -> None:
        """``migrate-continue`` from a pause state (``pre-switchover``)."""
        await self.execute("migrate-continue", {"state": state})

    async def migrate_start_postcopy(self) -> None:
        """``migrate-start-postcopy`` (needs the ``postcopy-ram`` capability on both sides)."""
        await self.execute("migrate-start-postcopy")

    async def query_migrate(self) -> MigrationInfo:
        """``query-migrate``."""
        return MigrationInfo.from_qmp(await self.execute("query-migrate"))

    async def wait_migration(self, statuses: str | Iterable[str], timeout: float | None = None) -> str:
        """Wait until the migration status is one of ``statuses``; returns the status.

        Needs the ``events`` capability for prompt wake-ups; it also returns at
        once if ``query-migrate`` already shows a wanted status.

        :raises DriverTimeout: not reached within ``timeout``.
        :raises ConnectionLost: the monitor went away.
        """
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        with self.expect(match("MIGRATION", status=frozenset(wanted))) as sub:
            info = await self.query_migrate()
            if info.status in wanted:
                return info.status
            ev = await sub.wait(timeout)
            return str(ev.data["status"])

    async def getfd(self, fdname: str, fd: int) -> None:
        """Pass ``fd`` to QEMU under ``fdname`` (for ``fd:NAME`` migration URIs)."""
        await self.transport.execute_with_fd("getfd", {"fdname": fdname}, fd, timeout=self.command_timeout)

    async def closefd(self, fdname: str) -> None:
        """Drop a file descriptor passed with :meth:`getfd`."""
        await self.execute("closefd", {"fdname": fdname})


__all__ = ["QemuDriver", "Action", "DriverTimeout", "MIGRATION_DONE"]
