"""Resolve a migration that ended *in doubt*: exactly one copy of the guest runs afterwards, or none.

A migration ends in doubt when the two sides lost each other around the commit (see
docs/migration.md): the source QEMU stopped and may have handed the guest over, the destination
has it paused, and neither knows what the other did. ``dataplane resolve`` runs on both sides,
over a channel session like the migration's: each side reads its own QEMU's state
(:func:`side_state`), the two exchange them (``state`` messages on the ``cclm-resolve`` stream),
both compute the same :func:`decide`, the side that stays stopped confirms (``agree``), and only
then the other side acts (:func:`apply`). Without a peer (its QEMU is gone for good) one side may
resolve alone with ``peer_destroyed``: the operator vouches that the other copy can never run.

The decision (sans-IO, :func:`decide`):

========================================================== ========== ===========================
states                                                      action     what is done
========================================================== ========== ===========================
both run                                                    refuse     nothing: a person must pick
the destination runs                                        none       (committed already)
the source runs                                             none       (rolled back already)
the source QEMU is in postcopy (its state moved on)         commit     the destination resumes
both QEMUs ``completed``                                    commit     the destination resumes
either QEMU does not answer                                 refuse     nothing (``--peer-destroyed``)
otherwise                                                   abort      the source resumes
========================================================== ========== ===========================

A commit needs a destination that holds the whole guest (its incoming migration ``completed`` or in
postcopy); an abort needs a source that can run (reachable, not handed over in postcopy). A
decision a side cannot carry out is refused and nothing is changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from dataplane.aio import cancel_and_collect, first_done
from dataplane.channel.client import ChannelClient
from dataplane.channel.stream import ChannelStream
from qmp_driver import DriverError, QemuDriver

from .cclm_common import qemu_state
from .control import RESOLVE_STREAM, Agree, State
from .control_stream import ControlStream
from .errors import ControlLost, MigrationError
from .source import MIRROR_JOB_PREFIX, NBD_NODE_PREFIX

log = logging.getLogger(__name__)

SOURCE, DESTINATION = "source", "destination"
COMMIT, ABORT, NONE, REFUSE = "commit", "abort", "none", "refuse"
#: Seconds each side waits for the other's messages.
RESOLVE_TIMEOUT = 60.0
#: The capabilities a migration sets on the source that an abort turns off again.
_SOURCE_CAPS_OFF = {"pause-before-switchover": False, "postcopy-ram": False, "multifd": False}
_ACTIVE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling"})


class ResolveError(MigrationError):
    """The in-doubt migration cannot be resolved safely (nothing was changed), or the peer failed."""


@dataclass(frozen=True)
class SideState:
    """One side as its QEMU reports it: ``status`` the run state (``unreachable`` if QEMU does not
    answer), ``migration`` the migration status (``none`` if there never was one)."""

    role: str
    status: str
    migration: str

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class Resolution:
    """What :func:`decide` chose: ``action`` (commit, abort, none, refuse), the ``outcome`` the
    pair ends in (completed, rolled-back, or in-doubt when refused) and why."""

    action: str
    outcome: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(source: SideState, destination: SideState) -> Resolution:
    """The one safe decision for these two states (see the module's table)."""
    if source.running and destination.running:
        return Resolution(REFUSE, "in-doubt", "both copies run: stop one of them by hand (this should "
                                              "never happen; please report it)")
    if destination.running:
        return Resolution(NONE, "completed", "the destination runs already; the source stays stopped")
    if source.running:
        return Resolution(NONE, "rolled-back", "the source runs already; the destination stays paused")
    if destination.status == "unreachable" or destination.migration == "unknown":
        return Resolution(REFUSE, "in-doubt", "the destination QEMU does not answer: it may run; if it is "
                                              "gone for good, resolve on the source alone with "
                                              "--peer-destroyed")
    dst_has_guest = destination.migration == "completed" or destination.migration.startswith("postcopy")
    if source.migration.startswith("postcopy"):
        if dst_has_guest and destination.status != "unreachable":
            return Resolution(COMMIT, "completed", "the source handed the guest over in postcopy: the "
                                                   "destination resumes")
        return Resolution(REFUSE, "in-doubt", f"the source handed the guest over in postcopy, but the "
                                              f"destination is {destination.status} (migration "
                                              f"{destination.migration}): it cannot resume")
    if source.migration == "completed" and dst_has_guest and destination.status != "unreachable":
        return Resolution(COMMIT, "completed", "both QEMUs completed the migration: the destination resumes")
    if source.status == "unreachable":
        return Resolution(REFUSE, "in-doubt", "the source QEMU does not answer: it cannot resume, and it "
                                              "may still: if it is gone for good, resolve on the "
                                              "destination alone with --peer-destroyed")
    return Resolution(ABORT, "rolled-back", f"the destination does not hold a completed migration "
                                            f"(migration {destination.migration}): the source resumes")


def decide_alone(me: SideState) -> Resolution:
    """The decision when the peer is destroyed (the operator vouches that it can never run)."""
    if me.role == SOURCE:
        # the destination is gone: the source resumes unless a postcopy moved its state on
        if me.running:
            return Resolution(NONE, "rolled-back", "the source runs already")
        if me.status == "unreachable":
            return Resolution(REFUSE, "in-doubt", "the source QEMU does not answer")
        if me.migration.startswith("postcopy"):
            return Resolution(REFUSE, "in-doubt", "the source handed the guest over in postcopy: its "
                                                  "memory is no longer whole here")
        return Resolution(ABORT, "rolled-back", "the destination is destroyed: the source resumes")
    # the source is gone: the destination resumes if it holds the whole guest, whatever the source did
    if me.running:
        return Resolution(NONE, "completed", "the destination runs already")
    if me.migration == "completed" or me.migration.startswith("postcopy"):
        return Resolution(COMMIT, "completed", "the source is destroyed and the destination holds the guest")
    return Resolution(REFUSE, "in-doubt", f"the destination does not hold a completed migration (migration "
                                          f"{me.migration}); the guest cannot resume here")


async def side_state(drv: QemuDriver, role: str) -> SideState:
    """The state of the QEMU behind ``drv`` (``unreachable`` when it does not answer). Never raises."""
    state = await qemu_state(drv)
    return SideState(role, state["status"], state["migration"])


def acts(role: str, resolution: Resolution) -> bool:
    """Whether the side in ``role`` is the one that changes something for ``resolution``."""
    return ((resolution.action == COMMIT and role == DESTINATION)
            or (resolution.action == ABORT and role == SOURCE))


async def apply(drv: QemuDriver, role: str, resolution: Resolution) -> None:
    """Carry out this side's part: the destination resumes on a commit (its NBD server, if any, is
    stopped first); the source on an abort (a migration still active is cancelled, the migration's
    mirror jobs and NBD nodes removed, its capabilities turned off, then ``cont``). Nothing for
    the other cases.

    :raises ResolveError: a step failed (what was done is logged).
    """
    if not acts(role, resolution):
        return
    try:
        if role == DESTINATION:
            with contextlib.suppress(DriverError):  # none may run (the receive process cleaned up)
                await drv.nbd_server_stop()
            await drv.cont()
        else:
            await _clean_source(drv)
            if not (await drv.query_status()).running:
                await drv.cont()
        status = await drv.query_status()
    except DriverError as exc:
        raise ResolveError(f"{resolution.action} on the {role}: {exc}") from exc
    if not status.running:
        raise ResolveError(f"{resolution.action} on the {role}: the guest is {status.status!r} after cont")
    log.info("resolved: %s; the guest runs on the %s", resolution.action, role)


async def _clean_source(drv: QemuDriver) -> None:
    if (await drv.query_migrate()).status in _ACTIVE:
        await drv.migrate_cancel()
        await drv.wait_migration({"cancelled", "failed", "completed"}, timeout=30)
    for job in await drv.query_jobs():
        if job.id.startswith(MIRROR_JOB_PREFIX):
            await drv.block_job_cancel(job.id, force=True)
            await drv.wait_job_status(job.id, "null", timeout=30)
    for node in await drv.query_named_block_nodes():
        if node.node_name.startswith(NBD_NODE_PREFIX):
            await drv.blockdev_del(node.node_name)
    await drv.migrate_set_capabilities(_SOURCE_CAPS_OFF)


async def resolve_alone(drv: QemuDriver, role: str) -> tuple[Resolution, SideState]:
    """Resolve without the peer (``--peer-destroyed``).

    :raises ResolveError: the decision is refused or a step failed.
    """
    me = await side_state(drv, role)
    resolution = decide_alone(me)
    log.info("resolve alone (%s: %s, migration %s): %s: %s", role, me.status, me.migration,
             resolution.action, resolution.reason)
    if resolution.action == REFUSE:
        raise ResolveError(resolution.reason)
    await apply(drv, role, resolution)
    return resolution, me


async def resolve_with_peer(drv: QemuDriver, role: str, control: ControlStream,
                            timeout: float = RESOLVE_TIMEOUT) -> tuple[Resolution, SideState, SideState]:
    """Resolve together with the peer over ``control`` (a started
    :class:`~dataplane.migration.cclm.ControlStream` on the ``cclm-resolve`` stream).

    :returns: the resolution, this side's state and the peer's.
    :raises ResolveError: refused, the peer disagreed, or a step failed.
    :raises ControlLost: the peer went away (nothing was changed here unless it had agreed).
    :raises TimeoutError: the peer did not answer within ``timeout`` seconds.
    """
    me = await side_state(drv, role)
    control.send(State(me.role, me.status, me.migration))
    msg = await control.recv(timeout)
    if not isinstance(msg, State) or msg.role == role or msg.role not in (SOURCE, DESTINATION):
        raise ResolveError(f"the peer is not the other side of a migration (it sent {msg!r})")
    peer = SideState(msg.role, msg.status, msg.migration)
    src, dst = (me, peer) if role == SOURCE else (peer, me)
    resolution = decide(src, dst)
    log.info("resolve: source %s (migration %s), destination %s (migration %s): %s: %s", src.status,
             src.migration, dst.status, dst.migration, resolution.action, resolution.reason)
    if resolution.action == REFUSE:
        raise ResolveError(resolution.reason)
    if resolution.action == NONE:
        return resolution, me, peer
    if acts(role, resolution):
        agree = await control.recv(timeout)
        if not isinstance(agree, Agree) or agree.action != resolution.action:
            raise ResolveError(f"the peer did not agree to {resolution.action} (it sent {agree!r})")
        await apply(drv, role, resolution)
    else:
        # this side stays stopped: check again right before promising it (only a QEMU that answers
        # with a state other than running can promise that)
        now = await side_state(drv, role)
        if now.running or now.status == "unreachable":
            raise ResolveError(f"the {role} is {now.status} now; nothing was agreed")
        control.send(Agree(resolution.action))
    return resolution, me, peer


async def serve_resolve(arrived: asyncio.Future[ControlStream], drv: QemuDriver,
                        timeout: float | None = None) -> tuple[Resolution, SideState, SideState]:
    """The destination's side: wait (at most ``timeout`` s) for the source's resolve stream (a
    started server whose ``on_stream`` is :func:`accept_resolve_stream` fulfils ``arrived``), then
    :func:`resolve_with_peer`.

    :raises TimeoutError: no source came.
    """
    done = await first_done(arrived, timeout=timeout)
    if not done:
        raise TimeoutError(f"no source resolve within {timeout:g} s")
    return await resolve_with_peer(drv, DESTINATION, arrived.result())


async def dial_resolve(client: ChannelClient, control: ControlStream,
                       drv: QemuDriver) -> tuple[Resolution, SideState, SideState]:
    """The source's side: open the resolve stream on a started ``client`` and
    :func:`resolve_with_peer`."""
    client.open_stream(RESOLVE_STREAM, control)
    task = asyncio.ensure_future(resolve_with_peer(drv, SOURCE, control))
    try:
        await first_done(task, client.done)
        if not task.done():
            raise ControlLost("the channel session ended during the resolve")
        return task.result()
    finally:
        await cancel_and_collect(task)


def accept_resolve_stream(arrived: asyncio.Future[ControlStream]) -> Callable[[ChannelStream], None]:
    """An ``on_stream`` callback for the destination's server: the first ``cclm-resolve`` stream
    becomes the control stream that fulfils ``arrived``; anything else is refused."""

    def on_stream(stream: ChannelStream) -> None:
        if stream.name != RESOLVE_STREAM or arrived.done():
            stream.refuse("this side only takes one resolve")
            return
        control = ControlStream()
        control.attach(stream)
        arrived.set_result(control)

    return on_stream
