"""The destination side: receive the disks over NBD and the VM state over the
migration stream.

::

    await prepare_target(dst, plan, "/run/dst/nbd.sock", "unix:/run/dst/mig.sock")
    ...                     # the source runs migrate_source()
    await finish_target(dst)            # nbd-server-stop, then cont
    # on failure of the source: await abort_target(dst)

The destination QEMU must run with ``-incoming defer`` (and normally ``-S``)
and hold a block node of the same name as each planned disk.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from qmp_driver import MIGRATION_DONE, CommandError, DriverError, QemuDriver

from .errors import MigrationError, PlanRefused
from .plan import MigrationOptions, MigrationPlan, memory_size, validate_target

log = logging.getLogger(__name__)


async def prepare_target(dst: QemuDriver, plan: MigrationPlan, nbd_socket: str | Mapping[str, Any],
                         migrate_uri: str) -> dict[str, bool]:
    """Make ``dst`` ready to receive ``plan``.

    Validates first (nothing is changed if that fails), then sets the
    ``late-block-activate`` and ``events`` capabilities, starts the NBD server
    on ``nbd_socket`` (a unix socket path or a QMP SocketAddress), exports each
    disk writable under its ``export_name`` and starts ``migrate-incoming`` on
    ``migrate_uri``. If a step fails, what was done is undone
    (:func:`abort_target`) before the error propagates. A destination that
    cannot enable ``postcopy-ram`` (an unprivileged QEMU without
    userfaultfd) is prepared without it.

    :returns: the migration capabilities set (``postcopy-ram`` says whether
        postcopy is possible; the source must not use it otherwise).

    :raises PlanRefused: the destination is not waiting for an incoming
        migration, its guest memory size differs, or :func:`validate_target`
        refuses its block nodes.
    :raises qmp_driver.DriverError: a QMP command failed.
    """
    status = await dst.query_status()
    if status.status != "inmigrate":
        raise PlanRefused(f"the destination is not waiting for an incoming migration (status "
                          f"{status.status!r}; start it with -incoming defer)")
    mem = await memory_size(dst)
    if mem != plan.memory_size:
        raise PlanRefused(f"guest memory differs: destination {mem} bytes, source {plan.memory_size} bytes")
    validate_target(plan, await dst.query_named_block_nodes())
    caps = target_capabilities(plan)
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
        await dst.nbd_server_start(nbd_socket)
        for disk in plan.disks:
            await dst.block_export_add(disk.export_name, disk.node_name, name=disk.export_name,
                                       writable=True)
        await dst.migrate_incoming(migrate_uri)
    except BaseException:
        await abort_target(dst)
        raise
    return caps


async def image_paths(dst: QemuDriver, plan: MigrationPlan) -> list[str]:
    """The local image files behind the planned disks of ``dst``, in plan order (absolute paths; other
    protocols, such as ``json:`` pseudo-filenames or network URLs, are left out).

    :raises qmp_driver.DriverError: ``query-named-block-nodes`` failed.
    """
    files = {n.node_name: n.filename for n in await dst.query_named_block_nodes()}
    return [f for f in (files.get(d.node_name, "") for d in plan.disks) if f.startswith("/")]


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


async def finish_target(dst: QemuDriver, resume: bool = True, timeout: float | None = 120.0,
                        on_switchover: Callable[[str], object] | None = None) -> None:
    """Wait for the incoming migration to finish, then stop the NBD server and ``cont``.

    The guest is resumed unless ``resume`` is false (it then stays paused on
    the destination). In postcopy the destination takes over while RAM is
    still arriving: at ``postcopy-active`` the NBD server is stopped and the
    guest resumed at once, then the rest of the migration is awaited.
    ``on_switchover(status)`` is called when the destination became
    authoritative (``completed`` or ``postcopy-active``).

    :raises MigrationError: the incoming migration failed or did not complete
        within ``timeout`` seconds (None: no limit).
    :raises qmp_driver.DriverError: a QMP command failed.
    """
    status = await _await_migration(dst, MIGRATION_DONE | {"postcopy-active"}, timeout,
                                    "incoming migration did not complete", "incoming migration {status}")
    if on_switchover is not None:
        on_switchover(status)
    await dst.nbd_server_stop()
    if resume:
        await dst.cont()
    if status == "postcopy-active":
        await _await_migration(dst, MIGRATION_DONE, timeout, "postcopy did not complete",
                               "postcopy {status} on the destination")


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


async def abort_target(dst: QemuDriver) -> None:
    """Best-effort clean-up of a prepared destination: stop the NBD server (which
    drops every export). Never raises (a dead destination is fine); the
    destination QEMU itself is the caller's to stop."""
    with contextlib.suppress(DriverError):
        await dst.nbd_server_stop()
        log.info("destination NBD server stopped")
