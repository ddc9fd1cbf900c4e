"""Cross-cluster live migration: the two roles joined by one channel session.

The source (:func:`run_source`, ``dataplane migrate``) dials the
destination's channel listener (:func:`run_target`, ``dataplane receive``).
Over that one session travel:

* the control stream (:mod:`dataplane.migration.control`): the plan,
  ``ready`` / ``refused``, ``abort`` either way, the source's ``commit``
  and the destination's ``done`` (the switchover is a commit: the
  destination resumes only on its QEMU's completion and ``commit``);
* one NBD stream per disk (QEMU's NBD client on the source connects to a
  local unix socket of the source relay; the destination relay connects the
  stream to the destination QEMU's NBD server);
* the migration stream, then the multifd streams, in the order the source
  QEMU opened them.

QEMU never speaks TCP across clusters: each QEMU only sees local unix
sockets. See ``docs/migration.md`` for the sequence, the policy and what
happens on each failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dataplane.aio import cancel_and_collect, first_done
from dataplane.channel.addr import Endpoint
from dataplane.channel.client import ChannelClient
from dataplane.channel.relay import DestinationRelay, SourceRelay
from dataplane.channel.server import ChannelServer
from dataplane.channel.stream import ChannelStream
from dataplane.storage.writeback import EarlyWriteback
from qmp_driver import CommandError, DriverError, QemuDriver

from .control import (
    CONTROL_STREAM,
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
)
from .control_stream import ControlStream
from .errors import (
    ControlLost,
    Interrupted,
    MigrationError,
    PeerAborted,
    PlanRefused,
    RolledBack,
)
from .hooks import reached as hook_reached
from .plan import MigrationOptions, MigrationPlan, discover_plan
from .policy import Decision
from .report import MigrationProgress, MigrationReport
from .source import migrate_source
from .target import (
    PreparedTarget,
    abort_target,
    await_incoming,
    image_paths,
    postcopy_enabled,
    prepare_target,
    resume_target,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds the source waits for the destination's answer to the plan.
PLAN_TIMEOUT = 60.0
#: Seconds the source waits, after ``commit``, for the destination to confirm it resumed, beyond the
#: session's grace period.
DONE_TIMEOUT = 60.0
#: Seconds the destination waits, once its QEMU completed, for the source's ``commit``, beyond
#: the session's grace period (a link cut within it must not end the wait).
COMMIT_TIMEOUT = 60.0
#: Seconds a destination that gave up waits for the source to confirm that it runs the guest.
ACK_TIMEOUT = 15.0


EventCallback = Callable[[dict[str, Any]], object]


# =============================================================================== reports


@dataclass(frozen=True)
class ChannelFigures:
    """What the channel carried for one migration (sending side's view, bytes)."""

    ram_raw: int = 0
    ram_wire: int = 0
    disk_raw: int = 0
    disk_wire: int = 0
    zero_pages: int = 0
    reconnects: int = 0
    replayed_bytes: int = 0
    rtt_ms: float | None = None

    @property
    def raw(self) -> int:
        return self.ram_raw + self.disk_raw

    @property
    def wire(self) -> int:
        return self.ram_wire + self.disk_wire

    @property
    def compression_ratio(self) -> float:
        return self.raw / self.wire if self.wire else 1.0

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> ChannelFigures:
        """Sum the per-stream counters of the (one) session in a channel endpoint's ``stats()``
        (see docs/channel.md); zeros when it has none."""
        sessions = stats.get("sessions") or []
        session = sessions[0] if sessions else None
        if not session:
            return cls()
        sums = {"ram_raw": 0, "ram_wire": 0, "disk_raw": 0, "disk_wire": 0, "zero_pages": 0}
        for st in session.get("streams", []):
            kind = {MIGRATION_STREAM: "ram", NBD_STREAM: "disk"}.get(str(st.get("name")))
            if kind is None:
                continue
            sums[f"{kind}_raw"] += int(st.get("bytes_sent", 0)) + int(st.get("bytes_received", 0))
            sums[f"{kind}_wire"] += int(st.get("wire_bytes_sent", 0)) + int(st.get("wire_bytes_received", 0))
            sums["zero_pages"] += int(st.get("zero_pages", 0))
        rtt = session.get("rtt")
        return cls(**sums, reconnects=int(session.get("reconnects", 0)),
                   replayed_bytes=int(session.get("replayed_bytes", 0)),
                   rtt_ms=float(rtt) * 1000 if rtt is not None else None)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(raw_bytes=self.raw, wire_bytes=self.wire, compression_ratio=round(self.compression_ratio, 3))
        return d


@dataclass(frozen=True)
class CclmReport:
    """The source's final word: the migration report plus the channel's figures and the destination's."""

    migration: MigrationReport
    channel: ChannelFigures = field(default_factory=ChannelFigures)
    destination: str | None = None  # "running" / "paused" once the destination confirmed; None otherwise
    source_state: dict[str, str] | None = None  # in doubt: the source QEMU's run state and migration status

    @property
    def outcome(self) -> str:
        return self.migration.outcome

    def as_dict(self) -> dict[str, Any]:
        """The ``report`` event (JSON-compatible)."""
        m = self.migration
        out: dict[str, Any] = {
            "event": "report", "outcome": m.outcome, "phase": m.phase,
            "switched_over": m.switched_over, "postcopy": m.postcopy,
            "total_time": round(m.total_time, 3), "downtime_ms": m.downtime_ms,
            "ram_bytes": m.ram_transferred, "disk_bytes": m.disk_bytes,
            "destination": self.destination, "error": m.error, "source_state": self.source_state,
            "decisions": [d.as_dict() for d in m.decisions],
        }
        out.update(self.channel.as_dict())
        return out


def progress_event(p: MigrationProgress) -> dict[str, Any]:
    """A progress sample as a ``progress`` event."""
    d = asdict(p)
    d["event"] = "progress"
    d["elapsed"] = round(p.elapsed, 3)
    return d


def _emit(on_event: EventCallback | None, event: dict[str, Any]) -> None:
    if on_event is None:
        return
    try:
        on_event(event)
    except Exception:  # an observer must not break a migration
        log.exception("event callback failed")


def _workdir(parent: str | Path | None, prefix: str) -> Path:
    # unix socket paths must stay short: a directory directly under /tmp (or the given parent)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


# =============================================================================== source


async def run_source(client: ChannelClient, src: QemuDriver, *, disks: Iterable[str] | None = None,
                     options: MigrationOptions | None = None, workdir: str | Path | None = None,
                     on_event: EventCallback | None = None,
                     interrupt: asyncio.Event | None = None) -> CclmReport:
    """Migrate the VM behind ``src`` to the destination at the other end of ``client``'s session.

    ``client`` must be started (the session established: a wrong
    certificate fails there, before any QEMU command). The plan (``disks``
    by node name or device id, default every writable disk; ``options``) is
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
    (dicts, see docs/cli.md).

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
    options = options or MigrationOptions()
    wd = _workdir(workdir, "dpmig-src-")
    nbd_sock, mig_sock = wd / "nbd.sock", wd / "mig.sock"
    relay = SourceRelay(client, {NBD_STREAM: Endpoint("unix", path=str(nbd_sock)),
                                 MIGRATION_STREAM: Endpoint("unix", path=str(mig_sock))})
    control = ControlStream()
    final: list[MigrationReport] = []
    handed: list[str] = []  # the source QEMU status at which ``commit`` was sent
    try:
        client.open_stream(CONTROL_STREAM, control)
        status = await src.query_status()
        if status.status not in ("running", "paused"):
            raise PlanRefused(f"the source VM is {status.status!r}, not running or paused")
        plan = await discover_plan(src, disks, options)
        _emit(on_event, {"event": "phase", "phase": "plan", "disks": [asdict(d) for d in plan.disks],
                         "memory_size": plan.memory_size})
        control.send(Hello(CONTROL_VERSION, plan.to_dict()))
        answer = await _await_answer(control, client)
        if isinstance(answer, Refused):
            raise PlanRefused(f"the destination says: {answer.reason}")
        if isinstance(answer, Abort):
            raise PlanRefused(f"the destination aborted: {answer.reason}")
        if not isinstance(answer, Ready):
            raise PlanRefused(f"unexpected answer to the plan: {answer.type!r}")
        if postcopy_enabled(options) and not answer.postcopy:
            why = "postcopy disabled: the destination QEMU cannot enable postcopy-ram"
            log.warning("%s", why)
            _emit(on_event, {"event": "decision", "action": "note", "reason": why, "elapsed": 0.0})
            options = dataclasses.replace(options, postcopy="never")
        await relay.start()
        _emit(on_event, {"event": "phase", "phase": "destination-ready"})

        def on_decision(d: Decision) -> None:
            _emit(on_event, {"event": "decision", **d.as_dict()})

        def on_progress(p: MigrationProgress) -> None:
            _emit(on_event, progress_event(p))


        async def handover(status: str) -> None:  # a postcopy handed the guest's state over
            control.send(Commit(status))
            handed.append(status)
            _emit(on_event, {"event": "phase", "phase": "committed", "status": status})

        mig = asyncio.ensure_future(migrate_source(
            src, plan, lambda _disk: str(nbd_sock), f"unix:{mig_sock}", options, progress=on_progress,
            on_decision=on_decision, on_report=final.append, on_handover=handover))
        watch = asyncio.ensure_future(_watch_peer(control, client, interrupt))
        try:
            await first_done(mig, watch)
            if not mig.done() and handed:  # a postcopy handed the guest over: it can only go on
                cause = _exception(watch)
                if isinstance(cause, Interrupted):
                    log.warning("interrupted after the guest was handed over: finishing the postcopy first")
                elif cause is not None:
                    log.warning("%s; the postcopy goes on as long as the migration stream does", cause)
                await first_done(mig)
            if not mig.done():
                cause = _exception(watch)
                log.warning("stopping the migration: %s", cause)
                await cancel_and_collect(mig)
                if not final:  # stopped before this run's migration started: nothing to take back
                    raise MigrationError(f"migration stopped: {cause}")
                report = final[0] = _with_cause(final[0], cause)
                if report.outcome == "completed" and not handed:
                    # the source QEMU completed, but the guest was never handed over: take it back
                    raise RolledBack(await _shielded(_take_back(src, report)))
                if report.switched_over:
                    return await _in_doubt(client, src, report, "the handover could not be confirmed")
                raise RolledBack(report) from cause
            try:
                report = mig.result()
            except RolledBack:
                raise
            except MigrationError as exc:
                if handed or (final and final[0].switched_over):  # a postcopy failed after the handover
                    return await _in_doubt(client, src, final[0] if final else None, str(exc))
                raise
            if not handed:  # a precopy: the source QEMU completed and stays stopped until this decides
                await hook_reached("source-completed")
                cause = _exception(watch) if watch.done() else None
                if cause is None and interrupt is not None and interrupt.is_set():
                    cause = Interrupted("interrupted by the operator")
                if cause is None and (client.done.done() or control.lost.done()):
                    cause = ControlLost("the channel session ended before the commit")
                if cause is not None:
                    log.warning("not handing the guest over: %s", cause)
                    raise RolledBack(await _shielded(_take_back(src, _with_cause(report, cause))))
                watch.cancel()
                control.send(Commit("completed"))
                handed.append("completed")
                _emit(on_event, {"event": "phase", "phase": "committed", "status": "completed"})
            else:
                watch.cancel()
            return await _await_done(client, control, src, report, on_event,
                                     postcopy=handed[0] != "completed")
        finally:
            await cancel_and_collect(mig, watch)
    except BaseException as exc:
        if not handed:  # no commit went out: the destination must never resume
            if final and final[0].outcome == "completed" and not isinstance(exc, RolledBack):
                # cancelled while the source QEMU had completed: take the guest back first
                final[0] = await _shielded(_take_back(src, _with_cause(final[0], exc)))
            control.send(Abort(_reason(exc)))
        raise
    finally:
        await control.drain()
        await relay.close()
        shutil.rmtree(wd, ignore_errors=True)


async def _shielded(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile (the cancellation is then
    delivered afterwards)."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        task.result()
        raise asyncio.CancelledError
    return task.result()


def _exception(task: asyncio.Future[Any]) -> BaseException | None:
    """The exception a finished task raised (None if it returned or was cancelled)."""
    return None if task.cancelled() else task.exception()


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


async def _qemu_state(drv: QemuDriver) -> dict[str, str]:
    """The run state and migration status of a QEMU, as far as it answers."""
    state = {"status": "unreachable", "migration": "unknown"}
    with contextlib.suppress(DriverError):
        state["status"] = (await drv.query_status()).status
        state["migration"] = (await drv.query_migrate()).status or "none"
    return state


async def _in_doubt(client: ChannelClient, src: QemuDriver, report: MigrationReport | None,
                    why: str) -> CclmReport:
    """The source's in-doubt report: the guest may have been handed over, and the destination did
    not say whether it resumed. The source stays stopped."""
    state = await _qemu_state(src)
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
    _emit(on_event, {"event": "phase", "phase": "waiting-for-destination"})
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
            taken = await _shielded(_take_back(src, dataclasses.replace(
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


# =============================================================================== target


@dataclass(frozen=True)
class TargetReport:
    """The destination's final word."""

    #: ``completed`` (the guest runs here), ``rolled-back`` (it never ran here and never will: the
    #: source keeps or takes it back), ``in-doubt`` (it is here, paused, and the source went away
    #: without a commit or an abort: see ``dataplane resolve``); before a migration started:
    #: ``refused`` (the plan, nothing changed) or ``aborted`` (interrupted before a plan came)
    outcome: str
    status: str | None  # the guest here: "running" / "paused" / QEMU's run state / None
    total_time: float
    error: str | None = None
    postcopy: bool = False
    channel: ChannelFigures = field(default_factory=ChannelFigures)
    state: dict[str, str] | None = None  # in doubt: this QEMU's run state and migration status

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "report", "outcome": self.outcome, "status": self.status,
                               "total_time": round(self.total_time, 3), "error": self.error,
                               "postcopy": self.postcopy, "destination_state": self.state}
        out.update(self.channel.as_dict())
        return out


class _TargetSession:
    """Routes the streams of the one migrating session: control first, then NBD and migration."""

    def __init__(self, relay: DestinationRelay) -> None:
        self.relay = relay
        self.control: ControlStream | None = None
        self.session: str | None = None
        self.ready = False
        self.arrived: asyncio.Future[ControlStream] = asyncio.get_running_loop().create_future()

    def on_stream(self, stream: ChannelStream) -> None:
        if stream.name == CONTROL_STREAM:
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

    def __init__(self, server_factory: Callable[[Callable[[ChannelStream], None]], ChannelServer],
                 dst: QemuDriver, *, paused: bool, workdir: str | Path | None,
                 on_listening: Callable[[tuple[str, int]], object] | None, on_event: EventCallback | None,
                 interrupt: asyncio.Event | None, allowed: Collection[str] | None = None) -> None:
        self.dst = dst
        self.paused = paused
        self.on_listening = on_listening
        self.on_event = on_event
        self.t0 = time.monotonic()
        self.wd = _workdir(workdir, "dpmig-dst-")
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
        rep = TargetReport(outcome, status, time.monotonic() - self.t0, error, self.postcopy, figures)
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
        _emit(self.on_event, {"event": "phase", "phase": "connected", "session": self.routing.session})
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
                                                 f"unix:{self.mig_sock}", allowed=self.allowed)
            caps = self.prepared.capabilities
        except (PlanRefused, DriverError) as exc:
            reason = exc.reason if isinstance(exc, PlanRefused) else f"destination QEMU: {exc}"
            raise await self._refused(control, reason) from None
        _emit(self.on_event, {"event": "phase", "phase": "ready", "disks": [d.node_name for d in plan.disks]})
        self.routing.ready = True
        control.send(Ready(plan.options.multifd_channels, bool(caps.get("postcopy-ram"))))

    def _on_switchover(self, status: str) -> None:
        self.postcopy = status == "postcopy-active"
        self.switched.append(status)
        _emit(self.on_event, {"event": "phase", "phase": "switched-over", "status": status})

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
            said = _exception(answer) if answer.done() else None
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
            if not arrived.done() and answer.done() and _exception(answer) is None:
                await first_done(arrived, self.intr)  # committed already: the rest is still arriving
            if not arrived.done():
                await cancel_and_collect(arrived)
                if self._interrupted():
                    raise await self._give_up(control, "the destination was interrupted", tell=True)
                why = _exception(answer)
                raise await self._give_up(control, str(why), tell=not isinstance(why, PeerAborted))
            try:
                status = arrived.result()
            except (MigrationError, DriverError) as exc:
                # QEMU ends an incoming migration the source cancelled: did the source abort?
                await asyncio.wait([answer], timeout=1.0)
                why = _exception(answer) if answer.done() else None
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
            if answer.done() and _exception(answer) is None:
                self.committed = answer.result()
                return
            why = _exception(answer) if answer.done() else None
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
        state = await _qemu_state(self.dst)
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
            state = await _qemu_state(self.dst)
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


async def run_target(server_factory: Callable[[Callable[[ChannelStream], None]], ChannelServer],
                     dst: QemuDriver, *, paused: bool = False, workdir: str | Path | None = None,
                     on_listening: Callable[[tuple[str, int]], object] | None = None,
                     on_event: EventCallback | None = None,
                     interrupt: asyncio.Event | None = None,
                     allowed: Collection[str] | None = None) -> TargetReport:
    """Receive one migration into the destination QEMU behind ``dst``.

    ``server_factory(on_stream)`` makes the (not yet started)
    :class:`ChannelServer`; it is started here and ``on_listening(address)``
    is called once it listens. The first control stream is the migration;
    its plan is validated (``allowed``: the node names or device ids the
    source may write to, default every guest disk) and the destination
    prepared (:func:`prepare_target`; the NBD server and ``migrate-incoming``
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
                       on_event=on_event, interrupt=interrupt, allowed=allowed)
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


__all__ = ["CclmReport", "ChannelFigures", "ControlStream", "TargetReport", "progress_event", "run_source",
           "run_target"]
