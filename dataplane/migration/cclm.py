"""Cross-cluster live migration: the two roles joined by one channel session.

The source (:func:`run_source`, ``dataplane migrate``) dials the
destination's channel listener (:func:`run_target`, ``dataplane receive``).
Over that one session travel:

* the control stream (:mod:`dataplane.migration.control`): the plan,
  ``ready`` / ``refused``, ``abort`` either way, and the destination's
  ``done``;
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
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataplane.aio import cancel_and_collect, first_done
from dataplane.channel.addr import Endpoint
from dataplane.channel.client import ChannelClient
from dataplane.channel.errors import ChannelError
from dataplane.channel.frames import Buffer
from dataplane.channel.relay import DestinationRelay, SourceRelay
from dataplane.channel.server import ChannelServer
from dataplane.channel.stream import ChannelStream, StreamHandler
from dataplane.storage.writeback import EarlyWriteback
from qmp_driver import DriverError, QemuDriver

from .control import (
    CONTROL_STREAM,
    CONTROL_VERSION,
    MIGRATION_STREAM,
    NBD_STREAM,
    Abort,
    ControlDecoder,
    Done,
    Hello,
    Message,
    Ready,
    Refused,
    encode,
)
from .errors import (
    ControlError,
    ControlLost,
    Interrupted,
    MigrationError,
    PeerAborted,
    PlanRefused,
    RolledBack,
)
from .plan import MigrationOptions, MigrationPlan, discover_plan
from .policy import Decision
from .report import MigrationProgress, MigrationReport
from .source import migrate_source
from .target import abort_target, finish_target, image_paths, postcopy_enabled, prepare_target

log = logging.getLogger(__name__)

#: Seconds the source waits for the destination's answer to the plan.
PLAN_TIMEOUT = 60.0
#: Seconds the source waits, after completion, for the destination to confirm it resumed.
DONE_TIMEOUT = 30.0

EventCallback = Callable[[dict[str, Any]], object]


# =============================================================================== control stream


class ControlStream(StreamHandler):
    """The control stream as an asyncio message queue (either side).

    Outgoing messages are buffered until the stream is open and while it
    has no credit; incoming ones are decoded (bounded) and queued. A message
    leaves the queue only in the same step as it is handed to a caller, so
    cancelling a waiter never loses one.
    """

    def __init__(self) -> None:
        self.stream: ChannelStream | None = None
        self.decoder = ControlDecoder()
        self._inbox: deque[Message] = deque()
        self._arrived = asyncio.Event()  # set while a message is queued or the stream is lost
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._out = bytearray()
        self._closed = False

    # -- application side

    def send(self, msg: Message) -> None:
        """Queue one message (sent as soon as the stream allows). Never raises for a dead stream."""
        self._out += encode(msg)
        self._flush()

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until a message is queued or the stream is lost; cancelling it consumes nothing.

        :raises TimeoutError: neither within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no control message within {timeout:g} s") from None

    def poll(self) -> Message | None:
        """The next queued message, or None when none is queued yet.

        :raises ControlLost: none is queued and the stream ended.
        """
        if self._inbox:
            msg = self._inbox.popleft()
            if not self._inbox and not self.lost.done():
                self._arrived.clear()
            return msg
        if self.lost.done():
            raise ControlLost(f"control stream lost: {self.lost.result()}")
        return None

    def unread(self, msg: Message) -> None:
        """Put ``msg`` back at the head of the queue (for the next :meth:`recv`)."""
        self._inbox.appendleft(msg)
        self._arrived.set()

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message.

        :raises ControlLost: the stream ended before one arrived.
        :raises TimeoutError: none within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while (msg := self.poll()) is None:
            await self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return msg

    async def drain(self, timeout: float = 3.0) -> None:
        """End the conversation: hand every queued message to the channel, half-close, and wait for
        the peer to close its half (so that closing the session cannot drop the last message).
        Bounded by ``timeout`` seconds; never raises."""
        deadline = time.monotonic() + timeout
        while self._out and not self.lost.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.stream is not None and not self._closed:
            self._closed = True
            with contextlib.suppress(ChannelError):  # already reset: nothing to close
                self.stream.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), max(0.0, deadline - time.monotonic()))

    def reset(self, reason: str) -> None:
        """Abort the stream (e.g. on garbage from the peer)."""
        if self.stream is not None:
            self.stream.reset(reason)
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        self._arrived.set()

    def _flush(self) -> None:
        if self.stream is None or not self._out or self.lost.done():
            return
        try:
            n = self.stream.send(bytes(self._out))
        except ChannelError as exc:
            self._lose(f"cannot send: {exc}")
            return
        del self._out[:n]

    # -- StreamHandler

    def on_accepted(self, stream: ChannelStream) -> None:
        self.stream = stream
        self._flush()

    def attach(self, stream: ChannelStream) -> None:
        """Accept a control stream the peer opened."""
        self.stream = stream
        stream.accept(self)
        self._flush()

    def on_refused(self, stream: ChannelStream, code: int, reason: str) -> None:
        self._lose(f"refused by the destination: {reason}")

    def on_data(self, stream: ChannelStream, data: Buffer) -> None:
        n = len(memoryview(data))
        try:
            msgs = self.decoder.feed(data)
        except ControlError as exc:
            log.warning("control stream: %s; closing it", exc)
            self.reset(str(exc))
            return
        stream.consumed(n)
        if msgs:
            self._inbox.extend(msgs)
            self._arrived.set()

    def on_eof(self, stream: ChannelStream) -> None:
        self._lose("the peer closed the control stream")

    def on_writable(self, stream: ChannelStream) -> None:
        self._flush()

    def on_reset(self, stream: ChannelStream, code: int, reason: str, remote: bool) -> None:
        self._lose(reason or "reset")

    def on_closed(self, stream: ChannelStream, stats: Any) -> None:
        self._lose("closed")


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
            "destination": self.destination, "error": m.error,
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
    being set (e.g. on SIGINT) stops the migration, which then rolls back
    unless the switchover happened.
    ``on_event`` receives ``progress``, ``decision`` and ``phase`` events
    (dicts, see docs/cli.md).

    :returns: the report (outcome ``completed`` or, for a failure after a
        postcopy switchover, ``failed-after-switchover``).
    :raises PlanRefused: the destination refused the plan, or the source
        cannot be migrated; nothing was changed.
    :raises RolledBack: the migration failed before the switchover and was
        rolled back (``exc.report``); the destination was told to abort.
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
    try:
        client.open_stream(CONTROL_STREAM, control)
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

        mig = asyncio.ensure_future(migrate_source(
            src, plan, lambda _disk: str(nbd_sock), f"unix:{mig_sock}", options, progress=on_progress,
            on_decision=on_decision, on_report=final.append))
        watch = asyncio.ensure_future(_watch_peer(control, client, interrupt))
        try:
            await first_done(mig, watch)
            if not mig.done():
                cause = watch.exception() if not watch.cancelled() else None
                log.warning("stopping the migration: %s", cause)
                await cancel_and_collect(mig)
                report = final[0] if final else None
                if report is not None and report.outcome == "completed":
                    return await _completed(client, control, report, on_event)
                if report is None:
                    raise MigrationError(f"migration stopped: {cause}")
                # the rollback saw a cancellation: its cause comes first, then what else it noted
                error = report.error or ""
                rest = error.removeprefix("cancelled") if error.startswith("cancelled") else f"; {error}"
                report = dataclasses.replace(report, error=f"{cause}{rest}" if error else str(cause))
                final[0] = report
                if report.switched_over:
                    raise MigrationError(f"migration failed after the switchover: {report.error}") from cause
                raise RolledBack(report) from cause
            watch.cancel()
            report = mig.result()  # raises RolledBack / MigrationError
            return await _completed(client, control, report, on_event)
        finally:
            await cancel_and_collect(mig, watch)
    except BaseException as exc:
        if not (final and final[0].switched_over):
            control.send(Abort(_reason(exc)))
        raise
    finally:
        await control.drain()
        await relay.close()
        shutil.rmtree(wd, ignore_errors=True)


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
            if isinstance(msg, Done):
                control.unread(msg)  # for _completed
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


async def _completed(client: ChannelClient, control: ControlStream, report: MigrationReport,
                     on_event: EventCallback | None) -> CclmReport:
    _emit(on_event, {"event": "phase", "phase": "waiting-for-destination"})
    destination = None
    deadline = time.monotonic() + DONE_TIMEOUT
    while destination is None:
        try:
            msg = await control.recv(max(0.01, deadline - time.monotonic()))
        except (TimeoutError, ControlLost) as exc:
            log.warning("the destination did not confirm that it took over: %s", exc)
            break
        if isinstance(msg, Done):
            destination = msg.status
        elif isinstance(msg, Abort):
            log.error("the destination reports a failure after the switchover: %s", msg.reason)
            break
    figures = ChannelFigures.from_stats(client.stats())
    return CclmReport(report, figures, destination)


# =============================================================================== target


@dataclass(frozen=True)
class TargetReport:
    """The destination's final word."""

    outcome: str  # "completed", "refused", "aborted", "failed"
    status: str | None  # the guest: "running" / "paused" / None
    total_time: float
    error: str | None = None
    postcopy: bool = False
    channel: ChannelFigures = field(default_factory=ChannelFigures)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "report", "outcome": self.outcome, "status": self.status,
                               "total_time": round(self.total_time, 3), "error": self.error,
                               "postcopy": self.postcopy}
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
                 interrupt: asyncio.Event | None) -> None:
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
        self.control: ControlStream | None = None
        self.switched: list[str] = []  # the QEMU status at which the destination took over
        self.postcopy = False
        self.writeback = EarlyWriteback([])
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
            if self.control is not None and not self.switched:
                self.control.send(Abort("the destination was interrupted"))
                with contextlib.suppress(Exception):
                    await asyncio.shield(abort_target(self.dst))
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.control.drain())
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
            caps = await prepare_target(self.dst, plan, str(self.nbd_sock), f"unix:{self.mig_sock}")
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

    async def switchover(self, control: ControlStream, plan: MigrationPlan) -> None:
        """Wait until the destination QEMU took over and the guest resumed (unless paused). An abort
        from the source, the session ending, an interrupt or the destination QEMU failing before
        the switchover ends the run: the exports are dropped and the source told."""
        # the mirror's READY flush then finds the images mostly written back already
        try:
            paths = await image_paths(self.dst, plan)
        except DriverError as exc:
            log.debug("no early writeback: %s", exc)
            paths = []
        self.writeback = EarlyWriteback(paths)  # stopped after ``done`` is sent (a call may block a while)
        self.writeback.start()
        finish = asyncio.ensure_future(finish_target(self.dst, resume=not self.paused, timeout=None,
                                                     on_switchover=self._on_switchover))
        watch = asyncio.ensure_future(_watch_source(control))
        try:
            await first_done(finish, watch, self.intr)
            if not finish.done() and not self.switched:
                if self.intr.done():
                    why: BaseException | None = MigrationError("the destination was interrupted")
                    control.send(Abort(str(why)))
                else:
                    why = watch.exception() if not watch.cancelled() else None
                await cancel_and_collect(finish)
                await abort_target(self.dst)
                await control.drain()
                outcome = "aborted" if isinstance(why, PeerAborted) or self.intr.done() else "failed"
                raise _Ended(self.report(outcome, None, str(why)))
            if self.intr.done() and not finish.done():
                log.warning("interrupted after the switchover: the destination is authoritative; "
                            "finishing first")
            try:
                await finish
            except (MigrationError, DriverError) as exc:
                if self.switched:
                    raise _Ended(self.report("failed", None, f"after the switchover: {exc}")) from None
                # QEMU ends an incoming migration the source cancelled: did the source abort?
                await asyncio.wait([watch], timeout=1.0)
                await abort_target(self.dst)
                if watch.done() and isinstance(watch.exception(), PeerAborted):
                    await control.drain()
                    raise _Ended(self.report("aborted", None,
                                             f"{watch.exception()} (destination QEMU: {exc})")) from None
                control.send(Abort(f"destination failed: {exc}"))
                await control.drain()
                raise _Ended(self.report("failed", None, str(exc))) from None
        finally:
            await cancel_and_collect(finish, watch)

    async def finish(self, control: ControlStream, plan: MigrationPlan) -> TargetReport:
        """Tell the source the destination took over (``done``) and end the conversation."""
        status = "paused" if self.paused else "running"
        control.send(Done(status))
        await control.drain()
        await self.writeback.stop()
        total = plan.memory_size + sum(d.size for d in plan.disks)
        log.info("migration of %.1f GiB received; guest %s", total / (1 << 30), status)
        return self.report("completed", status)


async def run_target(server_factory: Callable[[Callable[[ChannelStream], None]], ChannelServer],
                     dst: QemuDriver, *, paused: bool = False, workdir: str | Path | None = None,
                     on_listening: Callable[[tuple[str, int]], object] | None = None,
                     on_event: EventCallback | None = None,
                     interrupt: asyncio.Event | None = None) -> TargetReport:
    """Receive one migration into the destination QEMU behind ``dst``.

    ``server_factory(on_stream)`` makes the (not yet started)
    :class:`ChannelServer`; it is started here and ``on_listening(address)``
    is called once it listens. The first control stream is the migration;
    its plan is validated and the destination prepared
    (:func:`prepare_target`; the NBD server and ``migrate-incoming`` on unix
    sockets in a private directory under ``workdir``). Then this waits for the
    destination QEMU to take over (``completed``, or ``postcopy-active``),
    stops the NBD server and resumes the guest unless ``paused``. An abort
    from the source, the session failing, or the destination QEMU failing
    before the switchover ends the wait: the NBD server is stopped and the
    source told. The destination QEMU itself is its owner's to stop.
    ``interrupt`` (e.g. set on SIGINT) does the same before the switchover;
    after it, the destination is authoritative and the interrupt only takes
    effect once the guest was resumed.

    :returns: the report; its outcome says whether the migration completed,
        was refused (nothing changed), aborted by the source, or failed.
    :raises OSError: the listener cannot listen.
    :raises asyncio.CancelledError: cancelled (the source is told to abort
        unless the destination had taken over).
    """
    role = _TargetRole(server_factory, dst, paused=paused, workdir=workdir, on_listening=on_listening,
                       on_event=on_event, interrupt=interrupt)
    return await role.run()


async def _watch_source(control: ControlStream) -> None:
    """Raise when the source aborts or the control stream ends."""
    while True:
        msg = await control.recv()
        if isinstance(msg, Abort):
            raise PeerAborted(f"the source aborted: {msg.reason}")
        log.warning("control: ignoring an unexpected %r message", msg.type)


__all__ = ["CclmReport", "ChannelFigures", "ControlStream", "TargetReport", "progress_event", "run_source",
           "run_target"]
