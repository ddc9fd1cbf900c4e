"""The source's role in a cross-cluster migration (``dataplane migrate``): :func:`run_source`.

A thin function over :class:`_SourceRole`, one method per phase: the plan and the destination's
answer, the transfer (mirrors, RAM and the switchover, watched for the destination and the
operator), the commit, and the wait for the destination's ``done``. See
:mod:`dataplane.migration.cclm` for the two roles together and ``docs/migration.md`` for the
committed switchover.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dataplane.aio import cancel_and_collect, first_done, run_shielded, task_exception
from dataplane.channel.addr import Endpoint
from dataplane.channel.client import ChannelClient
from dataplane.channel.relay import SourceRelay
from qmp_driver import DriverError, QemuDriver

from .cclm_common import (
    CclmReport,
    ChannelFigures,
    EventCallback,
    emit,
    make_workdir,
    progress_event,
    qemu_state,
)
from .control import (
    CONTROL_VERSION,
    MIGRATION_STREAM,
    NBD_STREAM,
    Abort,
    Commit,
    Done,
    Hello,
    Message,
    Ready,
    Refused,
    control_stream_name,
)
from .control_stream import ControlStream
from .errors import ControlLost, Interrupted, MigrationError, PeerAborted, PlanRefused, RolledBack
from .hooks import reached as hook_reached
from .plan import MigrationOptions, MigrationPlan, discover_plan
from .policy import Decision
from .report import MigrationProgress, MigrationReport
from .source import MigrationControl, migrate_source
from .target import postcopy_enabled

log = logging.getLogger(__name__)

__all__ = ["run_source"]

#: Seconds the source waits for the destination's answer to the plan.
PLAN_TIMEOUT = 60.0
#: Seconds the source waits, after ``commit``, for the destination to confirm it resumed, beyond the
#: session's grace period.
DONE_TIMEOUT = 60.0


async def run_source(client: ChannelClient, src: QemuDriver, *, disks: Iterable[str] | None = None,
                     options: MigrationOptions | None = None, workdir: str | Path | None = None,
                     on_event: EventCallback | None = None,
                     interrupt: asyncio.Event | None = None,
                     disk_map: Mapping[str, str] | None = None,
                     control: MigrationControl | None = None,
                     before_commit: Callable[[str], None] | None = None,
                     receiver: str | None = None) -> CclmReport:
    """Migrate the VM behind ``src`` to the destination at the other end of ``client``'s session.

    ``client`` must be started (the session established: a wrong
    certificate fails there, before any QEMU command). The plan (``disks``
    by node name or device id, default every writable disk; ``disk_map``
    onto destination nodes of other names, see :func:`discover_plan`; ``options``) is
    sent on the control stream; once the destination answers ``ready``, the
    source relay's unix sockets (in a private directory under ``workdir``)
    carry the NBD and migration streams and :func:`migrate_source` runs the
    proven sequence. An ``abort`` from the destination, the control stream
    ending, the session failing after its grace period, or ``interrupt``
    being set (e.g. on SIGINT) stops the migration, which then rolls back.
    The switchover is a commit: once the source QEMU completed (or a
    postcopy started) ``commit`` goes to the destination, which resumes only
    then; before that any failure takes the guest back (``cont`` on a
    completed source), after it only the destination's ``abort`` does.
    ``on_event`` receives ``progress``, ``decision`` and ``phase`` events
    (dicts, see docs/cli.md). ``control`` changes the downtime limit live
    (:class:`~dataplane.migration.source.MigrationControl`). ``before_commit(status)`` is
    called right before ``commit`` is sent (a crash journal writes it down: from then on the
    source must never resume by itself); if it raises, the commit is not sent. ``receiver``
    names the receiver of a daemon's shared listener that must take the session (its job id).

    :returns: the report: outcome ``completed`` (the destination confirmed
        with ``done``) or ``in-doubt`` (``commit`` was sent and no answer
        came, or a postcopy failed after it: the source stays stopped; its
        state is in ``source_state``; see :mod:`dataplane.migration.resolve`).
    :raises PlanRefused: the destination refused the plan, or the source
        cannot be migrated; nothing was changed.
    :raises RolledBack: the migration failed and the guest runs on the source
        (``exc.report``); the destination was told to abort.
    :raises ControlLost: the destination went away before answering the plan.
    :raises asyncio.CancelledError: after the rollback and the abort message.
    """
    role = _SourceRole(client, src, disks, options or MigrationOptions(), workdir, on_event, interrupt,
                       disk_map, control, before_commit, receiver)
    return await role.run()


class _SourceRole:
    """The source's side of one migration (see :func:`run_source`): :meth:`plan_phase` (the plan
    and the destination's answer), :meth:`transfer` (the migration, watched), :meth:`stop_early`
    (the destination or the operator stopped it), :meth:`commit` and :meth:`abort`."""

    def __init__(self, client: ChannelClient, src: QemuDriver, disks: Iterable[str] | None,
                 options: MigrationOptions, workdir: str | Path | None, on_event: EventCallback | None,
                 interrupt: asyncio.Event | None, disk_map: Mapping[str, str] | None = None,
                 control: MigrationControl | None = None,
                 before_commit: Callable[[str], None] | None = None, receiver: str | None = None) -> None:
        self.client = client
        self.before_commit = before_commit
        self.receiver = receiver
        self.src = src
        self.disks = disks
        self.disk_map = dict(disk_map or {})
        self.options = options
        self.on_event = on_event
        self.interrupt = interrupt
        self.wd = make_workdir(workdir, "dpmig-src-")
        self.nbd_sock, self.mig_sock = self.wd / "nbd.sock", self.wd / "mig.sock"
        self.relay = SourceRelay(client, {NBD_STREAM: Endpoint("unix", path=str(self.nbd_sock)),
                                          MIGRATION_STREAM: Endpoint("unix", path=str(self.mig_sock))})
        self.control = ControlStream()
        self.final: list[MigrationReport] = []  # migrate_source's report, once it made one
        self.handed: list[str] = []  # the source QEMU status at which ``commit`` was sent
        self.live = control

    async def run(self) -> CclmReport:
        try:
            self.client.open_stream(control_stream_name(self.receiver), self.control)
            plan = await self.plan_phase()
            await self.relay.start()
            emit(self.on_event, {"event": "phase", "phase": "destination-ready"})
            return await self.transfer(plan)
        except BaseException as exc:
            await self.abort(exc)
            raise
        finally:
            await self.control.drain()
            await self.relay.close()
            shutil.rmtree(self.wd, ignore_errors=True)

    async def plan_phase(self) -> MigrationPlan:
        """Send the plan; the destination's ``ready`` (or :class:`PlanRefused`)."""
        status = await self.src.query_status()
        if status.status not in ("running", "paused"):
            raise PlanRefused(f"the source VM is {status.status!r}, not running or paused")
        plan = await discover_plan(self.src, self.disks, self.options, disk_map=self.disk_map)
        emit(self.on_event, {"event": "phase", "phase": "plan", "disks": [asdict(d) for d in plan.disks],
                             "memory_size": plan.memory_size})
        self.control.send(Hello(CONTROL_VERSION, plan.to_dict()))
        answer = await _await_answer(self.control, self.client)
        if isinstance(answer, Refused):
            raise PlanRefused(f"the destination says: {answer.reason}")
        if isinstance(answer, Abort):
            raise PlanRefused(f"the destination aborted: {answer.reason}")
        if not isinstance(answer, Ready):
            raise PlanRefused(f"unexpected answer to the plan: {answer.type!r}")
        if postcopy_enabled(self.options) and not answer.postcopy:
            why = "postcopy disabled: the destination QEMU cannot enable postcopy-ram"
            log.warning("%s", why)
            emit(self.on_event, {"event": "decision", "action": "note", "reason": why, "elapsed": 0.0})
            self.options = dataclasses.replace(self.options, postcopy="never")
        return plan

    def on_decision(self, d: Decision) -> None:
        emit(self.on_event, {"event": "decision", **d.as_dict()})

    def on_progress(self, p: MigrationProgress) -> None:
        emit(self.on_event, progress_event(p))

    async def handover(self, status: str) -> None:
        """``commit``: the source QEMU handed the guest over (``completed``, or a postcopy started)."""
        if self.before_commit is not None:
            self.before_commit(status)
        self.control.send(Commit(status))
        self.handed.append(status)
        emit(self.on_event, {"event": "phase", "phase": "committed", "status": status})

    async def transfer(self, plan: MigrationPlan) -> CclmReport:
        """Run :func:`migrate_source` through the relay, watched; then commit and wait for ``done``."""
        mig = asyncio.ensure_future(migrate_source(
            self.src, plan, lambda _disk: str(self.nbd_sock), f"unix:{self.mig_sock}", self.options,
            progress=self.on_progress, on_decision=self.on_decision, on_report=self.final.append,
            on_handover=self.handover, control=self.live))
        watch = asyncio.ensure_future(_watch_peer(self.control, self.client, self.interrupt))
        try:
            await first_done(mig, watch)
            if not mig.done() and self.handed:  # a postcopy handed the guest over: it can only go on
                cause = task_exception(watch)
                if isinstance(cause, Interrupted):
                    log.warning("interrupted after the guest was handed over: finishing the postcopy first")
                elif cause is not None:
                    log.warning("%s; the postcopy goes on as long as the migration stream does", cause)
                await first_done(mig)
            if not mig.done():
                return await self.stop_early(mig, task_exception(watch))
            try:
                report = mig.result()
            except RolledBack:
                raise
            except MigrationError as exc:
                if self.handed or (self.final and self.final[0].switched_over):  # postcopy failed after it
                    return await _in_doubt(self.client, self.src, self.final[0] if self.final else None,
                                           str(exc))
                raise
            if not self.handed:  # a precopy: the source QEMU completed and stays stopped until now
                await self.commit(report, watch)
            watch.cancel()
            return await _await_done(self.client, self.control, self.src, report, self.on_event,
                                     postcopy=self.handed[0] != "completed")
        finally:
            await cancel_and_collect(mig, watch)

    async def stop_early(self, mig: asyncio.Future[MigrationReport],
                         cause: BaseException | None) -> CclmReport:
        """The destination aborted or went away, or the operator interrupted: stop the migration.
        Raises RolledBack (the guest runs here) or MigrationError; returns an in-doubt report."""
        log.warning("stopping the migration: %s", cause)
        await cancel_and_collect(mig)
        if not self.final:  # stopped before this run's migration started: nothing to take back
            raise MigrationError(f"migration stopped: {cause}")
        report = self.final[0] = _with_cause(self.final[0], cause)
        if report.outcome == "completed" and not self.handed:
            # the source QEMU completed, but the guest was never handed over: take it back
            raise RolledBack(await run_shielded(_take_back(self.src, report)))
        if report.switched_over:
            return await _in_doubt(self.client, self.src, report, "the handover could not be confirmed")
        raise RolledBack(report) from cause

    async def commit(self, report: MigrationReport, watch: asyncio.Future[None]) -> None:
        """Send ``commit``, unless something already said not to (then take the guest back and
        raise RolledBack): from here the source never resumes unless the destination aborts."""
        await hook_reached("source-completed")
        cause = task_exception(watch) if watch.done() else None
        if cause is None and self.interrupt is not None and self.interrupt.is_set():
            cause = Interrupted("interrupted by the operator")
        if cause is None and (self.client.done.done() or self.control.lost.done()):
            cause = ControlLost("the channel session ended before the commit")
        if cause is not None:
            log.warning("not handing the guest over: %s", cause)
            raise RolledBack(await run_shielded(_take_back(self.src, _with_cause(report, cause))))
        watch.cancel()
        await self.handover("completed")

    async def abort(self, exc: BaseException) -> None:
        """The run ends with ``exc``: unless ``commit`` went out, tell the destination to abort (it
        must never resume), taking the guest back first if the source QEMU had completed."""
        if self.handed:
            return
        if self.final and self.final[0].outcome == "completed" and not isinstance(exc, RolledBack):
            self.final[0] = await run_shielded(_take_back(self.src, _with_cause(self.final[0], exc)))
        self.control.send(Abort(_reason(exc)))


def _with_cause(report: MigrationReport, cause: BaseException | None) -> MigrationReport:
    """``report`` with ``cause`` first in its error (a rollback saw only the cancellation)."""
    if cause is None:
        return report
    error = report.error or ""
    rest = error.removeprefix("cancelled") if error.startswith("cancelled") else f"; {error}"
    return dataclasses.replace(report, error=f"{cause}{rest}" if error else str(cause))


async def _take_back(src: QemuDriver, report: MigrationReport) -> MigrationReport:
    """Resume a source whose QEMU completed but whose guest was never handed over (no ``commit``
    was sent, or the destination answered ``abort``: it never ran). Its disks were never
    written by the migration; ``cont`` reactivates them. The rolled-back report."""
    reason = report.error or "the guest was not handed over"
    try:
        await src.cont()
        status = await src.query_status()
        if not status.running:
            raise MigrationError(f"the source is {status.status!r} after cont")
    except (DriverError, MigrationError) as exc:
        log.error("cannot resume the source after taking the guest back: %s", exc)
        return dataclasses.replace(report, outcome="rolled-back", phase="switchover",
                                   error=f"{reason}; rollback: resume the source: {exc}",
                                   rollback_errors=(f"resume the source: {exc}",))
    log.warning("the source QEMU had completed; the guest was not handed over and runs on the source again")
    return dataclasses.replace(report, outcome="rolled-back", phase="switchover",
                               error=f"{reason} (the source QEMU had completed and was resumed)")


async def _in_doubt(client: ChannelClient, src: QemuDriver, report: MigrationReport | None,
                    why: str) -> CclmReport:
    """The source's in-doubt report: the guest may have been handed over, and the destination did
    not say whether it resumed. The source stays stopped."""
    state = await qemu_state(src)
    error = (f"in doubt: {why}; the source stays stopped ({state['status']}, migration "
             f"{state['migration']}) until `dataplane resolve` decides")
    log.error("%s", error)
    base = report or MigrationReport("in-doubt", "switchover", 0.0, None, 0, 0)
    rep = dataclasses.replace(base, outcome="in-doubt", error=error)
    return CclmReport(rep, ChannelFigures.from_stats(client.stats()), None, state)


async def _await_done(client: ChannelClient, control: ControlStream, src: QemuDriver,
                      report: MigrationReport, on_event: EventCallback | None, *,
                      postcopy: bool) -> CclmReport:
    """After ``commit``: the destination's ``done`` (completed), its ``abort`` (it never ran: the
    source is taken back, unless a postcopy moved the guest's state), or nothing (in doubt)."""
    emit(on_event, {"event": "phase", "phase": "waiting-for-destination"})
    deadline = time.monotonic() + DONE_TIMEOUT + float(getattr(getattr(client, "limits", None), "grace", 0.0))
    while True:
        try:
            msg = await control.recv(max(0.01, deadline - time.monotonic()))
        except (TimeoutError, ControlLost) as exc:
            return await _in_doubt(client, src, report,
                                   f"the destination did not confirm the handover: {exc}")
        if isinstance(msg, Done):
            return CclmReport(report, ChannelFigures.from_stats(client.stats()), msg.status)
        if isinstance(msg, Abort):
            if postcopy:
                return await _in_doubt(client, src, report, f"the destination aborted after a postcopy "
                                                            f"handover: {msg.reason}")
            log.warning("the destination refused the handover: %s", msg.reason)
            taken = await run_shielded(_take_back(src, dataclasses.replace(
                report, error=f"the destination aborted after the commit: {msg.reason}")))
            control.send(Abort("the source took the guest back"))  # the destination waits for this
            raise RolledBack(taken)
        log.warning("control: ignoring an unexpected %r message", msg.type)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "the source was interrupted"
    if isinstance(exc, RolledBack):
        return f"the source rolled back: {exc.report.error}"
    return f"{type(exc).__name__}: {exc}"


async def _await_answer(control: ControlStream, client: ChannelClient) -> Message:
    recv = asyncio.ensure_future(control.recv(PLAN_TIMEOUT))
    try:
        await first_done(recv, client.done)
        if recv.done():
            return recv.result()
        err = client.done.result()
        raise ControlLost(f"the session ended before the destination answered: {err or 'closed'}")
    finally:
        await cancel_and_collect(recv)


async def _watch_peer(control: ControlStream, client: ChannelClient, interrupt: asyncio.Event | None) -> None:
    """Raise when the destination aborts or goes away, or on ``interrupt`` (returns never otherwise)."""
    intr = asyncio.ensure_future(interrupt.wait() if interrupt is not None else asyncio.Future())
    try:
        while True:
            msg = await _next_message(control, client, intr)
            if isinstance(msg, Abort):
                raise PeerAborted(f"the destination aborted: {msg.reason}")
            if isinstance(msg, Done):  # after a postcopy's commit: kept for the wait for done
                control.unread(msg)
                await intr
                raise Interrupted("interrupted")
            log.warning("control: ignoring an unexpected %r message", msg.type)
    finally:
        intr.cancel()


async def _next_message(control: ControlStream, client: ChannelClient,
                        intr: asyncio.Future[Any]) -> Message:
    while (msg := control.poll()) is None:
        done = await first_done(control.wait(), client.done, intr)
        if done - {client.done, intr}:
            continue  # a message (or the end of the stream) is there: poll() takes it
        if intr.done():
            raise Interrupted("interrupted by the operator")
        err = client.done.result()
        raise ControlLost(f"the channel session ended: {err.reason if err else 'closed'}")
    return msg
