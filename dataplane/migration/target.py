"""The destination side: receive the disks over NBD and the VM state over the
migration stream.

::

    prepared = await prepare_target(dst, plan, "/run/dst/nbd.sock", "unix:/run/dst/mig.sock")
    ...                     # the source runs migrate_source()
    await finish_target(dst, prepared=prepared)     # nbd-server-stop, then cont
    # on failure of the source: await abort_target(dst, prepared)

The destination QEMU must run with ``-incoming defer`` and hold, as the root
node of a guest device, a block node of the same name as each planned disk.
Across clusters the destination resumes only after the source's commit
(:mod:`dataplane.migration.cclm`): :func:`await_incoming`, then
:func:`resume_target`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from dataplane.storage.sparse import enable_unmap
from qmp_driver import MIGRATION_DONE, CommandError, DriverError, QemuDriver

from .errors import MigrationError, PlanRefused
from .plan import MigrationOptions, MigrationPlan, memory_size, resolve_targets, validate_target

log = logging.getLogger(__name__)

#: The reason given in ``holes`` when the caller asked for the nodes as configured (``sparse=False``).
PREALLOCATED = "preallocated, not reopened"


@dataclass
class PreparedTarget:
    """What :func:`prepare_target` set up on the destination, so that only that is torn down.

    ``capabilities`` are the migration capabilities set (``postcopy-ram`` says whether postcopy is
    possible; the source must not use it otherwise); ``nbd_server`` whether this run started the
    NBD server; ``exports`` the export ids it added; ``holes`` whether each disk stays thin.
    """

    capabilities: dict[str, bool] = field(default_factory=dict)
    nbd_server: bool = False
    exports: list[str] = field(default_factory=list)
    #: per destination node: ``"kept"`` (holes and written zeros of the source stay unallocated)
    #: or ``"as configured: <why>"`` (the node is left as it was opened: the holes stay holes only if
    #: that was with ``discard=unmap``, which QMP cannot tell)
    holes: dict[str, str] = field(default_factory=dict)


async def prepare_target(dst: QemuDriver, plan: MigrationPlan, nbd_socket: str | Mapping[str, Any],
                         migrate_uri: str, *, allowed: Collection[str] | None = None,
                         sparse: bool = True) -> PreparedTarget:
    """Make ``dst`` ready to receive ``plan``.

    Validates first (nothing is changed if that fails: see :func:`validate_target`; ``allowed``
    restricts the destination nodes the plan may write to these node names or device ids). Then
    makes sure the destination cannot start the guest by itself (``stop`` while ``inmigrate``
    has the effect of ``-S``: QMP cannot read that flag, so it is set rather than checked), sets
    the ``late-block-activate`` and ``events`` capabilities, with ``sparse`` reopens every disk's
    nodes with ``discard=unmap`` (:func:`dataplane.storage.sparse.enable_unmap`: the source's holes
    and written zeros then stay unallocated, as on a KubeVirt disk; a node that cannot be reopened
    is left as configured and named in ``holes`` with the reason; "kept" also needs the source's
    zero writes that may unmap, ``mirror_detect_zeroes``), starts the NBD server on
    ``nbd_socket`` (a unix socket path or a QMP SocketAddress), exports each disk writable
    under its ``export_name`` and starts ``migrate-incoming`` on ``migrate_uri``. If a step
    fails, the NBD server and exports this call set up are removed (:func:`abort_target`)
    before the error propagates: an NBD server or export somebody else made is left alone. The
    ``stop``, the capabilities and the nodes' ``discard=unmap`` stay (the destination QEMU of a
    failed migration is its owner's to discard). A destination that cannot enable
    ``postcopy-ram`` (an unprivileged QEMU without userfaultfd) is prepared without it.

    :returns: what was set up (pass it to :func:`abort_target` and :func:`resume_target`).
    :raises PlanRefused: the destination is not waiting for an incoming migration, its guest
        memory size differs, or :func:`validate_target` refuses its block nodes.
    :raises qmp_driver.DriverError: a QMP command failed (e.g. an NBD server already runs).
    """
    status = await dst.query_status()
    if status.status != "inmigrate":
        raise PlanRefused(f"the destination is not waiting for an incoming migration (status "
                          f"{status.status!r}; start it with -incoming defer)")
    mem = await memory_size(dst)
    if mem != plan.memory_size:
        raise PlanRefused(f"guest memory differs: destination {mem} bytes, source {plan.memory_size} bytes")
    nodes, devices = await dst.query_named_block_nodes(), await dst.query_block()
    plan = resolve_targets(plan, nodes, devices)
    validate_target(plan, nodes, devices, allowed=allowed)
    await dst.stop()  # while inmigrate: no autostart, as with -S (the guest resumes only on commit)
    prepared = PreparedTarget(target_capabilities(plan))
    caps = prepared.capabilities
    try:
        await dst.migrate_set_capabilities(caps)
    except CommandError as exc:
        if not caps.get("postcopy-ram"):
            raise
        # e.g. no userfaultfd for an unprivileged QEMU: precopy still works, the source is told
        log.warning("the destination cannot enable postcopy (%s); continuing without it", exc.description)
        caps["postcopy-ram"] = False
        await dst.migrate_set_capabilities(caps)
    if plan.options.multifd_channels:
        await dst.migrate_set_parameters({"multifd-channels": plan.options.multifd_channels})
    try:
        for disk in plan.disks:
            why = await enable_unmap(dst, disk.dest_node) if sparse else PREALLOCATED
            if why is None and not plan.options.mirror_detect_zeroes:
                why = "the source does not send zero writes that may unmap (libvirt's sequence)"
            prepared.holes[disk.dest_node] = "kept" if why is None else f"as configured: {why}"
            if why is not None and sparse:
                log.warning("disk %s: left as configured (%s): the source's holes are allocated here unless "
                            "the node has discard=unmap", disk.describe(), why)
        await dst.nbd_server_start(nbd_socket)
        prepared.nbd_server = True
        for disk in plan.disks:
            await dst.block_export_add(disk.export_name, disk.dest_node, name=disk.export_name,
                                       writable=True)
            prepared.exports.append(disk.export_name)
        await dst.migrate_incoming(migrate_uri)
    except BaseException:
        await abort_target(dst, prepared)
        raise
    return prepared


async def image_paths(dst: QemuDriver, plan: MigrationPlan) -> list[str]:
    """The local image files behind the planned disks of ``dst``, in plan order (absolute paths; other
    protocols, such as ``json:`` pseudo-filenames or network URLs, are left out).

    :raises qmp_driver.DriverError: ``query-named-block-nodes`` failed.
    """
    nodes, devices = await dst.query_named_block_nodes(), await dst.query_block()
    files = {n.node_name: n.filename for n in nodes}
    plan = resolve_targets(plan, nodes, devices)
    return [f for f in (files.get(d.dest_node, "") for d in plan.disks) if f.startswith("/")]


def target_capabilities(plan: MigrationPlan) -> dict[str, bool]:
    """The migration capabilities the destination needs for ``plan`` (the source sets the same ones)."""
    caps = {"late-block-activate": True, "events": True}
    if plan.options.multifd_channels:
        caps["multifd"] = True
    if postcopy_enabled(plan.options):
        caps["postcopy-ram"] = True
    return caps


def postcopy_enabled(options: MigrationOptions) -> bool:
    """Whether postcopy-ram is enabled for these options (QEMU 7.2 cannot combine it with multifd)."""
    return options.postcopy == "auto" and not options.multifd_channels


async def await_incoming(dst: QemuDriver, timeout: float | None = 120.0) -> str:
    """Wait until the destination QEMU has the guest: its incoming migration ``completed``, or a
    postcopy reached ``postcopy-active`` (RAM still arriving). The guest stays paused.

    :returns: that status.
    :raises MigrationError: the incoming migration failed or did not get there within ``timeout``
        seconds (None: no limit).
    """
    return await _await_migration(dst, MIGRATION_DONE | {"postcopy-active"}, timeout,
                                  "incoming migration did not complete", "incoming migration {status}")


async def resume_target(dst: QemuDriver, prepared: PreparedTarget | None, status: str, *,
                        resume: bool = True, timeout: float | None = 120.0,
                        after_resume: Callable[[], Awaitable[object]] | None = None) -> None:
    """Take over on the destination once :func:`await_incoming` returned ``status`` (and, across
    clusters, the source committed): stop the NBD server this run started, ``cont`` unless
    ``resume`` is false, await ``after_resume()``, and in postcopy wait for the rest of RAM.

    :raises MigrationError: a postcopy failed or did not finish within ``timeout`` seconds.
    :raises qmp_driver.DriverError: a QMP command failed.
    """
    if prepared is None or prepared.nbd_server:
        await dst.nbd_server_stop()
        if prepared is not None:
            prepared.nbd_server = False
            prepared.exports.clear()
    if resume:
        await dst.cont()
    if after_resume is not None:
        await after_resume()
    if status == "postcopy-active":
        # postcopy-paused: the stream broke; the guest runs here but lacks pages until recovered
        end = await _await_migration(dst, MIGRATION_DONE | {"postcopy-paused"}, timeout,
                                     "postcopy did not complete", "postcopy {status} on the destination")
        if end == "postcopy-paused":
            raise MigrationError("postcopy paused on the destination: the migration stream broke; the guest "
                                 "runs here and waits for the pages still on the source (postcopy recovery)")


async def finish_target(dst: QemuDriver, resume: bool = True, timeout: float | None = 120.0,
                        on_switchover: Callable[[str], object] | None = None,
                        prepared: PreparedTarget | None = None) -> None:
    """Wait for the incoming migration to finish, then stop the NBD server and ``cont``: for a
    caller that drives both sides itself (one host), so the source's completion is known.

    :func:`await_incoming` then :func:`resume_target`; ``on_switchover(status)`` is called in
    between, when the destination became authoritative (``completed`` or ``postcopy-active``).

    :raises MigrationError: the incoming migration failed or did not complete within ``timeout``
        seconds (None: no limit).
    :raises qmp_driver.DriverError: a QMP command failed.
    """
    status = await await_incoming(dst, timeout)
    if on_switchover is not None:
        on_switchover(status)
    await resume_target(dst, prepared, status, resume=resume, timeout=timeout)


async def _await_migration(dst: QemuDriver, stops: frozenset[str], timeout: float | None, late: str,
                           failed: str) -> str:
    """The migration status among *stops* that ``dst`` reached; raises MigrationError (*late*: no
    status within *timeout*; *failed*, formatted with the status: it failed or was cancelled)."""
    try:
        status = await dst.wait_migration(stops, timeout=timeout)
    except DriverError as exc:
        raise MigrationError(f"{late}: {exc}") from exc
    if status in ("failed", "cancelled"):
        info = await dst.query_migrate()
        raise MigrationError(f"{failed.format(status=status)}: {info.error_desc or 'no reason given'}")
    return status


async def abort_target(dst: QemuDriver, prepared: PreparedTarget | None = None) -> None:
    """Best-effort clean-up of a prepared destination: remove what ``prepared`` says this run
    set up (its exports, then its NBD server), nothing else; without ``prepared``, stop the NBD
    server. Never raises (a dead destination is fine); the destination QEMU itself is the
    caller's to stop, and it stays paused."""
    if prepared is not None and not prepared.nbd_server:
        for export in list(prepared.exports):
            with contextlib.suppress(DriverError):
                await dst.block_export_del(export)
            prepared.exports.remove(export)
        return
    with contextlib.suppress(DriverError):
        await dst.nbd_server_stop()
        log.info("destination NBD server stopped")
    if prepared is not None:
        prepared.nbd_server = False
        prepared.exports.clear()
