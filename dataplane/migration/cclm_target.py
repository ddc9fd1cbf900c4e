"""The destination's role in a cross-cluster migration (``dataplane receive``): :func:`run_target`.

See :mod:`dataplane.migration.cclm` for the two roles together and ``docs/migration.md`` for the
committed switchover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

from dataplane.aio import cancel_and_collect, first_done, task_exception
from dataplane.channel.addr import Endpoint
from dataplane.channel.relay import DestinationRelay
from dataplane.channel.session import Limits
from dataplane.channel.stream import ChannelStream
from dataplane.storage.writeback import EarlyWriteback
from qmp_driver import CommandError, DriverError, QemuDriver

from .cclm_common import ChannelFigures, EventCallback, TargetReport, emit, make_workdir, qemu_state
from .control import (
    CONTROL_STREAM,
    CONTROL_VERSION,
    MIGRATION_STREAM,
    NBD_STREAM,
    Abort,
    Commit,
    Done,
    Hello,
    Ready,
    Refused,
)
from .control_stream import ControlStream
from .errors import ControlLost, MigrationError, PeerAborted, PlanRefused
from .hooks import reached as hook_reached
from .plan import MigrationPlan
from .target import PreparedTarget, abort_target, await_incoming, image_paths, prepare_target, resume_target

log = logging.getLogger(__name__)

__all__ = ["run_target"]

#: Seconds the source may take to send its plan.
PLAN_TIMEOUT = 60.0
#: Seconds the destination waits, once its QEMU completed, for the source's ``commit``, beyond
#: the session's grace period (a link cut within it must not end the wait).
COMMIT_TIMEOUT = 60.0
#: Seconds a destination that gave up waits for the source to confirm that it runs the guest.
ACK_TIMEOUT = 15.0


class Listener(Protocol):
    """What the destination uses of its channel listener: a :class:`ChannelServer` of its own, or
    its place on a listener it shares (the node daemon's)."""

    limits: Limits

    async def start(self) -> tuple[str, int]: ...

    @property
    def address(self) -> tuple[str, int]: ...

    def stats(self) -> dict[str, Any]: ...

    async def close(self) -> bool: ...


#: ``server_factory(on_stream)``: the (not yet started) listener whose streams go to ``on_stream``.
ListenerFactory = Callable[[Callable[[ChannelStream], None]], Listener]


class _TargetSession:
    """Routes the streams of the one migrating session: control first, then NBD and migration."""

    def __init__(self, relay: DestinationRelay) -> None:
        self.relay = relay
        self.control: ControlStream | None = None
        self.session: str | None = None
        self.ready = False
        self.arrived: asyncio.Future[ControlStream] = asyncio.get_running_loop().create_future()

    def on_stream(self, stream: ChannelStream) -> None:
        if stream.name == CONTROL_STREAM or stream.name.startswith(f"{CONTROL_STREAM}@"):
            if self.control is not None:
                stream.refuse("this destination is already receiving a migration")
                return
            self.control = ControlStream()
            self.session = stream.session_id
            self.control.attach(stream)
            self.arrived.set_result(self.control)
            return
        if stream.session_id != self.session or not self.ready:
            stream.refuse("no migration is ready to receive this stream")
            return
        self.relay.on_stream(stream)


class _Ended(Exception):
    """A phase of the target ended the migration; ``report`` is the destination's final word."""

    def __init__(self, report: TargetReport) -> None:
        super().__init__(report.outcome)
        self.report = report


class _TargetRole:
    """The destination's side of one migration, one method per phase (see :func:`run_target`):
    :meth:`control` (a session and its plan), :meth:`prepare` (validate, export, ``ready``),
    :meth:`switchover` (until the destination QEMU takes over) and :meth:`finish` (``done``)."""

    def __init__(self, server_factory: ListenerFactory,
                 dst: QemuDriver, *, paused: bool, workdir: str | Path | None,
                 on_listening: Callable[[tuple[str, int]], object] | None, on_event: EventCallback | None,
                 interrupt: asyncio.Event | None, allowed: Collection[str] | None = None,
                 sparse: bool = True) -> None:
        self.dst = dst
        self.paused = paused
        self.on_listening = on_listening
        self.on_event = on_event
        self.t0 = time.monotonic()
        self.wd = make_workdir(workdir, "dpmig-dst-")
        self.nbd_sock, self.mig_sock = self.wd / "nbd.sock", self.wd / "mig.sock"
        self.relay = DestinationRelay({NBD_STREAM: Endpoint("unix", path=str(self.nbd_sock)),
                                       MIGRATION_STREAM: Endpoint("unix", path=str(self.mig_sock))})
        self.routing = _TargetSession(self.relay)
        self.server = server_factory(self.routing.on_stream)
        grace = float(getattr(getattr(self.server, "limits", None), "grace", 0.0))
        self.commit_timeout = COMMIT_TIMEOUT + grace
        self.cont_sent = False  # ``cont`` went to the destination QEMU (its outcome may be unknown)
        self.control: ControlStream | None = None
        self.allowed = allowed
        self.sparse = sparse
        self.prepared: PreparedTarget | None = None
        self.switched: list[str] = []  # the QEMU status at which the destination had the guest
        self.committed: Commit | None = None  # the source's commit
        self.resumed = False  # the guest was resumed here (from then on this side never aborts)
        self.postcopy = False
        self.writeback = EarlyWriteback([])
        self.interrupt = interrupt
        self.intr: asyncio.Future[Any] = asyncio.ensure_future(
            interrupt.wait() if interrupt is not None else asyncio.get_running_loop().create_future())

    def report(self, outcome: str, status: str | None, error: str | None = None) -> TargetReport:
        figures = ChannelFigures.from_stats(self.server.stats())
        rep = TargetReport(outcome, status, time.monotonic() - self.t0, error, self.postcopy, figures,
                           holes=dict(self.prepared.holes) if self.prepared else {})
        log.info("receive %s%s", outcome, f": {error}" if error else "")
        return rep

    async def run(self) -> TargetReport:
        """All the phases; the report of the first that ends the run. Raises OSError (cannot listen)
        or CancelledError (after telling the source to abort, unless the destination took over)."""
        try:
            await self.server.start()
        except BaseException:
            await self._close()
            raise
        try:
            if self.on_listening is not None:
                self.on_listening(self.server.address)
            control = await self.control_phase()
            plan = await self.plan_phase(control)
            await self.prepare(control, plan)
            await self.switchover(control, plan)
            return await self.finish(control, plan)
        except _Ended as ended:
            return ended.report
        except asyncio.CancelledError:
            if self.control is not None and not self.cont_sent:
                self.control.send(Abort("the destination was interrupted"))
                if self.prepared is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(abort_target(self.dst, self.prepared))
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.control.drain())
            raise
        except Exception as exc:  # a bug or an unexpected error: the guest stays paused here
            log.exception("receive failed unexpectedly")
            if self.control is not None and not self.cont_sent:
                self.control.send(Abort(f"the destination failed: {exc}"))
                if self.prepared is not None:
                    await abort_target(self.dst, self.prepared)
                await self.control.drain()
                return self.report("rolled-back" if not self.switched else "in-doubt",
                                   await self._guest_status(), f"{type(exc).__name__}: {exc}")
            raise
        finally:
            await self._close()

    async def _close(self) -> None:
        await self.writeback.stop()
        self.intr.cancel()
        await self.server.close()
        await self.relay.close()
        shutil.rmtree(self.wd, ignore_errors=True)

    # -- phases

    async def control_phase(self) -> ControlStream:
        """Wait for the migrating session's control stream. Ends the run if interrupted first."""
        await first_done(self.routing.arrived, self.intr)
        if not self.routing.arrived.done():
            raise _Ended(self.report("aborted", None, "interrupted before a migration arrived"))
        self.control = control = self.routing.arrived.result()
        emit(self.on_event, {"event": "phase", "phase": "connected", "session": self.routing.session})
        return control

    async def plan_phase(self, control: ControlStream) -> MigrationPlan:
        """Wait for the source's ``hello`` and read its plan. Ends the run if it does not come, is
        not this protocol's, or the destination is interrupted first."""
        hello_task = asyncio.ensure_future(control.recv(PLAN_TIMEOUT))
        await first_done(hello_task, self.intr)
        if not hello_task.done():
            await cancel_and_collect(hello_task)
            control.send(Abort("the destination was interrupted"))
            await control.drain()
            raise _Ended(self.report("aborted", None, "interrupted before the plan arrived"))
        try:
            hello = hello_task.result()
        except (TimeoutError, ControlLost) as exc:
            raise _Ended(self.report("failed", None, f"no plan from the source: {exc}")) from None
        try:
            if not isinstance(hello, Hello) or hello.version != CONTROL_VERSION:
                got = f"version {hello.version}" if isinstance(hello, Hello) else f"a {hello.type!r} message"
                raise PlanRefused(f"expected a hello of control version {CONTROL_VERSION}, got {got}")
            return MigrationPlan.from_dict(hello.plan)
        except PlanRefused as exc:
            raise await self._refused(control, exc.reason) from None

    async def _refused(self, control: ControlStream, reason: str) -> _Ended:
        """Tell the source its plan is refused; return the end of the run to raise."""
        log.warning("refusing the plan: %s", reason)
        control.send(Refused(reason))
        await control.drain()
        return _Ended(self.report("refused", None, reason))

    async def prepare(self, control: ControlStream, plan: MigrationPlan) -> None:
        """Validate the plan against the destination QEMU, export its disks, start the incoming
        migration and answer ``ready``; a refusal (nothing changed) ends the run."""
        try:
            self.prepared = await prepare_target(self.dst, plan, str(self.nbd_sock),
                                                 f"unix:{self.mig_sock}", allowed=self.allowed,
                                                 sparse=self.sparse)
            caps = self.prepared.capabilities
        except (PlanRefused, DriverError) as exc:
            reason = exc.reason if isinstance(exc, PlanRefused) else f"destination QEMU: {exc}"
            raise await self._refused(control, reason) from None
        emit(self.on_event, {"event": "phase", "phase": "ready", "disks": list(self.prepared.holes),
                             "holes": dict(self.prepared.holes)})
        self.routing.ready = True
        control.send(Ready(plan.options.multifd_channels, bool(caps.get("postcopy-ram"))))

    def _on_switchover(self, status: str) -> None:
        self.postcopy = status == "postcopy-active"
        self.switched.append(status)
        emit(self.on_event, {"event": "phase", "phase": "switched-over", "status": status})

    async def _give_up(self, control: ControlStream, why: str, *, tell: bool) -> _Ended:
        """Never resume: drop what this run exported, tell the source (``abort``: it may take the
        guest back) unless it already knows, and end the run rolled back."""
        if tell:
            control.send(Abort(why))
        await abort_target(self.dst, self.prepared)
        await control.drain()
        return _Ended(self.report("rolled-back", await self._guest_status(), why))

    async def _give_up_confirmed(self, control: ControlStream, why: str,
                                 answer: asyncio.Future[Commit] | None = None) -> _Ended:
        """The destination has the whole guest and gives up: ``abort`` to the source, and rolled back
        only once the source answers that it runs the guest (its own ``abort``); otherwise this
        side cannot know that anybody runs it: in doubt (the guest stays paused here). ``answer``,
        the task reading the source's messages, is stopped first (its ``abort`` counts too)."""
        if answer is not None:
            await cancel_and_collect(answer)
            said = task_exception(answer) if answer.done() else None
            if isinstance(said, PeerAborted):  # the source gave up already: it runs the guest
                await abort_target(self.dst, self.prepared)
                await control.drain()
                return _Ended(self.report("rolled-back", await self._guest_status(), f"{why}; {said}"))
        control.send(Abort(why))
        await abort_target(self.dst, self.prepared)
        try:
            while True:
                msg = await control.recv(ACK_TIMEOUT)
                if isinstance(msg, Abort):
                    await control.drain()
                    return _Ended(self.report("rolled-back", await self._guest_status(),
                                              f"{why}; the source runs the guest ({msg.reason})"))
                if isinstance(msg, Commit):  # crossed our abort: the source takes the guest back on it
                    continue
        except (TimeoutError, ControlLost) as exc:
            return _Ended(await self._in_doubt(f"{why}, and the source did not confirm that it runs the "
                                               f"guest ({exc})"))

    def _interrupted(self) -> bool:
        """Interrupted (also in the same loop turn as the signal, before ``intr`` saw it)."""
        return self.intr.done() or (self.interrupt is not None and self.interrupt.is_set())

    async def _guest_status(self) -> str | None:
        with contextlib.suppress(DriverError):
            return (await self.dst.query_status()).status
        return None

    async def switchover(self, control: ControlStream, plan: MigrationPlan) -> None:
        """Wait until the destination QEMU has the guest (paused) and the source committed; a
        failure or an ``abort`` before that ends the run rolled back (the source told, unless it
        told us), and losing the source once the QEMU has the guest but no commit came ends it in
        doubt (the guest stays paused here)."""
        # the mirror's READY flush then finds the images mostly written back already
        try:
            paths = await image_paths(self.dst, plan)
        except DriverError as exc:
            log.debug("no early writeback: %s", exc)
            paths = []
        self.writeback = EarlyWriteback(paths)  # stopped after ``done`` is sent (a call may block a while)
        self.writeback.start()
        arrived = asyncio.ensure_future(await_incoming(self.dst, timeout=None))
        answer = asyncio.ensure_future(_source_answer(control))
        try:
            # 1. until the destination QEMU has the whole guest (a commit may come first: no return path)
            await first_done(arrived, self.intr, answer)
            if not arrived.done() and answer.done() and task_exception(answer) is None:
                await first_done(arrived, self.intr)  # committed already: the rest is still arriving
            if not arrived.done():
                await cancel_and_collect(arrived)
                if self._interrupted():
                    raise await self._give_up(control, "the destination was interrupted", tell=True)
                why = task_exception(answer)
                raise await self._give_up(control, str(why), tell=not isinstance(why, PeerAborted))
            try:
                status = arrived.result()
            except (MigrationError, DriverError) as exc:
                # QEMU ends an incoming migration the source cancelled: did the source abort?
                await asyncio.wait([answer], timeout=1.0)
                why = task_exception(answer) if answer.done() else None
                if isinstance(why, PeerAborted):
                    why_text = f"{why} (destination QEMU: {exc})"
                    raise await self._give_up(control, why_text, tell=False) from None
                raise await self._give_up(control, f"the destination cannot take over: {exc}",
                                          tell=True) from None
            self._on_switchover(status)
            await hook_reached("destination-completed")
            # 2. the guest is here, paused: resume only on the source's commit
            if not answer.done():
                await first_done(answer, self.intr, timeout=self.commit_timeout)
            if answer.done() and task_exception(answer) is None:
                self.committed = answer.result()
                return
            why = task_exception(answer) if answer.done() else None
            if isinstance(why, PeerAborted):
                raise await self._give_up(control, str(why), tell=False)
            if status == "postcopy-active":  # the guest's state moves on: the source cannot take it back
                cause = why or "interrupted"
                raise _Ended(await self._in_doubt(f"a postcopy started and no commit came ({cause})"))
            if why is None:  # interrupted, or no commit in time: give up, if the source takes the guest back
                what = ("the destination was interrupted before the source committed" if self._interrupted()
                        else f"no commit from the source within {self.commit_timeout:g} s of the "
                             f"destination's completion")
                raise await self._give_up_confirmed(control, what, answer)
            # the source is gone without a word: it may have committed (in doubt) or rolled back
            raise _Ended(await self._in_doubt(f"the source went away before committing: {why}"))
        finally:
            await cancel_and_collect(arrived, answer)

    async def _in_doubt(self, why: str) -> TargetReport:
        state = await qemu_state(self.dst)
        error = (f"in doubt: {why}; the guest here is {state['status']} (migration "
                 f"{state['migration']}) until `dataplane resolve` decides")
        log.error("%s", error)
        return dataclasses.replace(self.report("in-doubt", state["status"], error), state=state)

    async def finish(self, control: ControlStream, plan: MigrationPlan) -> TargetReport:
        """The source committed: stop the NBD server, resume the guest (unless paused), tell the
        source (``done``) and end the conversation; in postcopy, wait for the rest of RAM."""
        status = "paused" if self.paused else "running"

        async def resumed() -> None:
            self.resumed = True
            await hook_reached("after-resume")
            control.send(Done(status))
            await control.drain()
            await self.writeback.stop()

        self.cont_sent = True  # from here a failure may hide a guest that runs: never abort blindly
        try:
            await resume_target(self.dst, self.prepared, self.switched[0], resume=not self.paused,
                                timeout=None, after_resume=resumed)
        except (MigrationError, DriverError) as exc:
            if self.resumed:
                return await self._in_doubt(f"after the destination resumed: {exc}")
            state = await qemu_state(self.dst)
            if isinstance(exc, CommandError) and state["status"] not in ("running", "unreachable"):
                # QEMU refused: the guest never ran here, the source may take it back
                why = f"the destination cannot resume: {exc}"
                raise await self._give_up_confirmed(control, why) from None
            if state["status"] == "running":  # it runs although the call failed: it took over
                await resumed()
                return self.report("completed", "running", f"resumed despite: {exc}")
            return await self._in_doubt(f"resuming the destination failed: {exc}")
        total = plan.memory_size + sum(d.size for d in plan.disks)
        log.info("migration of %.1f GiB received; guest %s", total / (1 << 30), status)
        return self.report("completed", status)


async def run_target(server_factory: ListenerFactory,
                     dst: QemuDriver, *, paused: bool = False, workdir: str | Path | None = None,
                     on_listening: Callable[[tuple[str, int]], object] | None = None,
                     on_event: EventCallback | None = None,
                     interrupt: asyncio.Event | None = None,
                     allowed: Collection[str] | None = None, sparse: bool = True) -> TargetReport:
    """Receive one migration into the destination QEMU behind ``dst``.

    ``server_factory(on_stream)`` makes the (not yet started)
    :class:`ChannelServer`; it is started here and ``on_listening(address)``
    is called once it listens. The first control stream is the migration;
    its plan is validated (``allowed``: the node names or device ids the
    source may write to, default every guest disk) and the destination
    prepared (:func:`prepare_target`: with ``sparse`` the disks keep the
    source's holes unallocated; the NBD server and ``migrate-incoming``
    on unix sockets in a private directory under ``workdir``; the guest
    cannot start by itself). Then this waits until the destination QEMU has
    the guest (``completed``, or ``postcopy-active``) *and* the source sent
    ``commit``; only then it stops the NBD server, resumes the guest unless
    ``paused`` and answers ``done``. An abort from the source, the session
    failing or the destination QEMU failing before that ends the run rolled
    back: this run's exports are dropped, the guest never runs here, and the
    source is told (``abort``). Losing the source after the QEMU has the
    guest but before a commit ends it in doubt, the guest paused here.
    ``interrupt`` (e.g. set on SIGINT) aborts until the guest resumed here;
    after that it only takes effect at the end. The destination QEMU itself
    is its owner's to stop.

    :returns: the report: ``completed``, ``rolled-back`` or ``in-doubt``
        (``refused`` / ``aborted`` when no migration started).
    :raises OSError: the listener cannot listen.
    :raises asyncio.CancelledError: cancelled (the source is told to abort
        unless the guest was resumed here).
    """
    role = _TargetRole(server_factory, dst, paused=paused, workdir=workdir, on_listening=on_listening,
                       on_event=on_event, interrupt=interrupt, allowed=allowed, sparse=sparse)
    return await role.run()


async def _source_answer(control: ControlStream) -> Commit:
    """The source's ``commit``; raises PeerAborted on its ``abort``, ControlLost when the control
    stream ends first."""
    while True:
        msg = await control.recv()
        if isinstance(msg, Commit):
            return msg
        if isinstance(msg, Abort):
            raise PeerAborted(f"the source aborted: {msg.reason}")
        log.warning("control: ignoring an unexpected %r message", msg.type)
