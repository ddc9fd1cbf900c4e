"""The node daemon: an HTTP/JSON API on a unix socket (aiohttp on the running loop, uvloop under
``dataplane serve``) over the jobs of :mod:`dataplane.daemon.jobs`.

::

    daemon = Daemon(max_storage=2)
    runner = await daemon.serve("/run/dataplane/api.sock")
    ...
    await daemon.shutdown()        # running jobs roll back unless past their pivot
    await runner.cleanup()

Every request body is validated against the served OpenAPI document (:mod:`.openapi`); a refusal
is a 4xx with a JSON ``{"error": ..., "details": [...]}``, never a 500. Each job has its own
interrupt: cancelling one (``DELETE``) never touches another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from dataplane.channel.addr import parse_hostport
from dataplane.migration import MigrationControl
from dataplane.migration.policy import NOTE, RAISE_THROTTLE, SWITCH_POSTCOPY
from dataplane.migration.slm import WRITE_BLOCKING, SlmControl

from . import journal
from .cclm_jobs import JobRefused, check_plaintext, run_migration, run_receiver
from .jobs import Job, JobEnd, JobTable, UnknownJob
from .listener import SharedListener
from .metrics import CONTENT_TYPE, Metrics
from .openapi import DOCUMENT, BadRequest, validate_body
from .storage_jobs import run_storage_migration

log = logging.getLogger(__name__)

__all__ = ["Daemon", "SocketBusy"]

STORAGE = "storage-migration"
MIGRATION = "migration"
RECEIVER = "receiver"
#: The convergence steps a storage migration takes (SlmRun.decide), and a migration's.
SLM_ACTIONS = (WRITE_BLOCKING, "throttle", NOTE)
CCLM_ACTIONS = (RAISE_THROTTLE, SWITCH_POSTCOPY, NOTE)


@dataclass(frozen=True)
class Resource:
    """One kind of job in the API: ``/v1/<name>``, its request and live-change schemas."""

    name: str
    kind: str
    request: str
    change: str | None
    title: str


RESOURCES = {r.name: r for r in (
    Resource("storage-migrations", STORAGE, "StorageMigrationRequest", "StorageMigrationChange",
             "storage migration"),
    Resource("migrations", MIGRATION, "MigrationRequest", "MigrationChange", "migration"),
    Resource("receivers", RECEIVER, "ReceiverRequest", None, "receiver"),
)}
#: An event id as the API takes it: ASCII digits only (str.isdigit() takes '²', which int() refuses).
_EVENT_ID = re.compile(r"[0-9]{1,18}")
#: Seconds a server-sent event stream waits between keep-alive comments.
KEEPALIVE = 15.0

Runner = Callable[[dict[str, Any], Callable[[dict[str, Any]], None], asyncio.Event, Any], Awaitable[JobEnd]]


class SocketBusy(OSError):
    """Another process serves the API socket already."""


def _error(status: int, message: str, details: list[str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if details:
        body["details"] = details
    return web.json_response(body, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, a body too large) as JSON; anything unexpected as a logged 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _error(exc.status, exc.reason if exc.text is None or exc.text.startswith(str(exc.status))
                      else exc.text)
        if "Allow" in exc.headers:  # a 405 says which methods the resource takes (RFC 9110)
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except BadRequest as exc:
        return _error(400, exc.message, exc.details)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error (see the daemon's log)")


class Daemon:
    """The jobs, their tasks and interrupts, the metrics, and the aiohttp application."""

    def __init__(self, *, max_storage: int = 2, max_migrations: int = 2, max_receivers: int = 8,
                 bandwidth_budget: int = 0, runners: dict[str, Runner] | None = None,
                 state_dir: str | os.PathLike[str] | None = None,
                 listener: SharedListener | None = None) -> None:
        self.table = JobTable({STORAGE: max_storage, MIGRATION: max_migrations, RECEIVER: max_receivers})
        self.metrics = Metrics()
        self.metrics.declare(STORAGE, SLM_ACTIONS)
        self.metrics.declare(MIGRATION, CCLM_ACTIONS)
        self.metrics.declare(RECEIVER)
        self.metrics.declare_channel()
        #: the channel listener receivers share (``serve --listen``), None without
        self.listener = listener
        #: bytes/s all running migrations share on this node (0: no budget)
        self.bandwidth_budget = bandwidth_budget
        self.runners: dict[str, Runner] = {STORAGE: run_storage_migration, MIGRATION: run_migration,
                                           RECEIVER: run_receiver, **(runners or {})}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.interrupts: dict[str, asyncio.Event] = {}
        self.controls: dict[str, Any] = {}
        self.news: dict[str, asyncio.Event] = {}
        self.stopping = False
        #: where the jobs' crash journals go (None: not journaled; see :mod:`.journal`)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        #: the journals a previous run left, listed before any job of this run can write one
        self.leftovers = (journal.pending(self.state_dir)
                          if self.state_dir is not None and self.state_dir.is_dir() else [])
        self.reconciling = bool(self.leftovers)
        self.app = self._make_app()

    # ------------------------------------------------------------------ jobs

    def submit(self, kind: str, params: dict[str, Any]) -> Job:
        job = self.table.create(kind, params)
        known = {j.id for j in self.table.jobs()}  # the table forgets its oldest ended jobs
        for gone in [i for i in self.news if i not in known]:
            del self.news[gone]
            self.controls.pop(gone, None)
        self.news[job.id] = asyncio.Event()
        self.controls[job.id] = (SlmControl() if kind == STORAGE else MigrationControl() if kind == MIGRATION
                                 else self.listener.slot(job.id) if self.listener is not None else None)
        log.info("job %s: %s queued", job.id, kind)
        self._schedule()
        return job

    def _schedule(self) -> None:
        for job in self.table.startable():
            job.start()
            self.interrupts[job.id] = asyncio.Event()
            self.tasks[job.id] = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self._share_budget()
        self._gauges()

    def _share_budget(self) -> None:
        """Give each running migration its share of the node's bandwidth budget (an equal share, or
        its own cap if lower); without a budget, its own cap."""
        running = [j for j in self.table.jobs(MIGRATION) if j.state == "running"]
        share = self.bandwidth_budget // len(running) if self.bandwidth_budget and running else 0
        for job in running:
            own = int(job.params.get("bandwidth", 0))
            rate = min(r for r in (own, share) if r) if (own or share) else 0
            control = self.controls.get(job.id)
            if control is not None and control.bandwidth != rate:
                control.set_bandwidth(rate)

    def _gauges(self) -> None:
        for kind in self.table.limits:
            jobs = self.table.jobs(kind)
            self.metrics.set_active(kind, sum(j.state == "queued" for j in jobs),
                                    sum(j.state == "running" for j in jobs))

    def _emit(self, job: Job, event: dict[str, Any]) -> None:
        job.add_event(event)
        self.metrics.on_event(job.kind, event)
        self._wake(job)

    def _wake(self, job: Job) -> None:
        news = self.news.get(job.id)
        if news is not None:
            news.set()
            self.news[job.id] = asyncio.Event()

    def _end(self, job: Job, end: JobEnd) -> None:
        report = end.report if end.report is not None else {"event": "report", "outcome": end.outcome,
                                                             "error": end.error}
        job.add_event(report)
        job.finish(end.outcome, end.report, end.error)
        self.metrics.on_end(job.kind, end.outcome, end.report)
        log.info("job %s: %s%s", job.id, end.outcome, f": {end.error}" if end.error else "")
        self._wake(job)

    async def _run(self, job: Job) -> None:
        log.info("job %s: %s started", job.id, job.kind)
        end = JobEnd("failed", None, "the job stopped unexpectedly (see the daemon's log)")
        jour: journal.JobJournal | None = None
        returned = failed = False
        try:
            if self.state_dir is not None:
                jour = journal.JobJournal(self.state_dir / f"{job.id}{journal.SUFFIX}", job.id, job.kind,
                                          job.params)
                journal.CURRENT.set(jour)  # this task's context: the runner's QEMU drivers write to it
            runner = self.runners[job.kind]
            end = await runner(job.params, lambda e: self._emit(job, e), self.interrupts[job.id],
                               self.controls[job.id])
            returned = True
        except asyncio.CancelledError:
            end = JobEnd("failed", None, "the daemon stopped the job")
            raise
        except Exception as exc:  # a bug of ours: the job fails, the daemon goes on
            log.exception("job %s failed", job.id)
            end = JobEnd("failed", None, f"{type(exc).__name__}: {exc}")
            failed = True
        finally:
            res = None
            if jour is not None and returned:
                jour.end(end.outcome)
            elif jour is not None:  # the runner did not finish its rollback: its journal says what is left
                jour.close()
                if failed:
                    with contextlib.suppress(Exception):
                        res = await journal.reconcile(jour.path)
            if res is not None:
                job.add_event({"event": "reconcile", "action": f"the job failed ({end.error}): reconciled"})
                self._reconciled(res, job)
            else:
                self._end(job, end)
            self.tasks.pop(job.id, None)
            self.interrupts.pop(job.id, None)
            self.controls.pop(job.id, None)
            self._schedule()

    def change(self, job: Job, change: dict[str, Any]) -> None:
        """Change ``job`` live: ``bandwidth`` (a storage migration's copy, a migration's channel: its
        own cap, within the node's budget) and ``downtime_ms`` (a migration's). A queued job starts
        with it, a running one takes it within a progress interval.

        :raises ValueError: it already ended, or a value it cannot take.
        """
        if not job.active:
            raise ValueError(f"job {job.id} already ended ({job.state})")
        control = self.controls[job.id]
        if "downtime_ms" in change:
            control.set_downtime(change["downtime_ms"])
            job.params["downtime_ms"] = change["downtime_ms"]
        if "bandwidth" in change:
            job.params["bandwidth"] = change["bandwidth"]
            if job.kind == MIGRATION:  # a queued one gets its share when it starts
                self._share_budget()
            else:
                control.set_bandwidth(change["bandwidth"])

    def set_bandwidth(self, job: Job, rate: int) -> None:
        """Change the bandwidth of ``job`` (see :meth:`change`). :raises ValueError: it already ended."""
        self.change(job, {"bandwidth": rate})

    def cancel(self, job: Job) -> None:
        """Ask ``job`` to stop: a queued one ends ``cancelled``; a running one rolls back unless past
        its pivot. :raises ValueError: it already ended."""
        if not job.active:
            raise ValueError(f"job {job.id} already ended ({job.state})")
        job.cancel_requested = True
        if job.state == "queued":
            self._end(job, JobEnd("cancelled", None, "cancelled before it started"))
            self._gauges()
        else:
            self.interrupts[job.id].set()
            self._wake(job)

    async def shutdown(self) -> None:
        """Stop taking jobs, cancel the queued ones, interrupt the running ones (each rolls back
        unless past its pivot, then finishes) and wait for them."""
        self.stopping = True
        for job in self.table.jobs():
            if job.active:
                self.cancel(job)
        tasks = list(self.tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def reconcile(self) -> list[Job]:
        """Undo what the journals of the state directory say a previous run of the daemon left
        behind (see :mod:`.journal`); each becomes an ended job of the same id, whose events say
        what was done. New jobs are taken meanwhile (their QEMUs are others).

        :returns: those jobs.
        """
        out: list[Job] = []
        try:
            for path in self.leftovers:
                try:
                    res = await journal.reconcile(path)
                except Exception:  # a bug of ours: keep the journal for the next start, go on
                    log.exception("reconciling %s failed", path)
                    continue
                if res is not None:
                    out.append(self._reconciled(res))
        finally:
            self.leftovers = []
            self.reconciling = False
        return out

    def _reconciled(self, res: journal.Reconciled, job: Job | None = None) -> Job:
        """The job of a reconciled journal (a new entry of its id, or ``job`` itself), ended."""
        if job is None:
            try:
                job = self.table.adopt(res.id, res.kind, res.params)
            except ValueError:  # its id is taken (by a job of this run): under a new one
                job = self.table.adopt(f"{res.id}-reconciled", res.kind, res.params)
        for action in res.actions:
            job.add_event({"event": "reconcile", "action": action})
        for problem in res.problems:
            job.add_event({"event": "reconcile", "problem": problem})
        self._end(job, JobEnd(res.outcome, {"event": "report", "outcome": res.outcome, "reconciled": True,
                                            "actions": res.actions, "problems": res.problems,
                                            "error": res.error}, res.error))
        return job

    # ------------------------------------------------------------------ HTTP

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors], client_max_size=1 << 20)
        kinds = "|".join(RESOURCES)
        changeable = "|".join(r.name for r in RESOURCES.values() if r.change is not None)
        app.add_routes([
            web.get("/healthz", self._healthz), web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics), web.get("/openapi.json", self._openapi),
            web.get(f"/v1/{{resource:{kinds}}}", self._list),
            web.post(f"/v1/{{resource:{kinds}}}", self._create),
            web.get(f"/v1/{{resource:{kinds}}}/{{id}}", self._get),
            web.delete(f"/v1/{{resource:{kinds}}}/{{id}}", self._cancel),
            web.patch(f"/v1/{{resource:{changeable}}}/{{id}}", self._patch),
            web.get(f"/v1/{{resource:{kinds}}}/{{id}}/events", self._events),
        ])
        return app

    @staticmethod
    def _resource(request: web.Request) -> Resource:
        return RESOURCES[request.match_info["resource"]]

    def _job(self, request: web.Request) -> Job:
        res = self._resource(request)
        try:
            job = self.table.get(request.match_info["id"])
        except UnknownJob:
            job = None
        if job is None or job.kind != res.kind:
            raise web.HTTPNotFound(text=f"no {res.title} {request.match_info['id']!r}")
        return job

    def _view(self, job: Job) -> dict[str, Any]:
        out = job.summary()
        out["queue_position"] = self.table.position(job)
        return out

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self.stopping:
            return _error(503, "shutting down")
        if self.reconciling:
            return _error(503, "reconciling what a previous run of the daemon left behind")
        return web.json_response({"status": "ready"})

    async def _metrics(self, _request: web.Request) -> web.Response:
        self._gauges()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(DOCUMENT)

    async def _list(self, request: web.Request) -> web.Response:
        kind = self._resource(request).kind
        return web.json_response({"items": [self._view(j) for j in self.table.jobs(kind)]})

    async def _create(self, request: web.Request) -> web.Response:
        res = self._resource(request)
        if self.stopping:
            return _error(503, "shutting down: no new jobs")
        if self.reconciling:  # a new job could meet a QEMU the reconciliation is still taking back
            return _error(503, "reconciling what a previous run of the daemon left behind: try again shortly")
        params = await self._body(request, res.request)
        _check_addresses(params)
        job = self.submit(res.kind, params)
        return web.json_response(self._view(job), status=201,
                                 headers={"Location": f"/v1/{res.name}/{job.id}"})

    async def _body(self, request: web.Request, schema: str) -> dict[str, Any]:
        """The request's JSON body, validated. :raises web.HTTPException / BadRequest: a 4xx."""
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(
                text=f"the body must be application/json, not {request.content_type!r}")
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise BadRequest(f"malformed JSON: {exc}") from None
        return validate_body(schema, body)

    async def _patch(self, request: web.Request) -> web.Response:
        res = self._resource(request)
        assert res.change is not None  # the route takes only the resources that have one
        job = self._job(request)
        change = await self._body(request, res.change)
        try:
            self.change(job, change)
        except ValueError as exc:
            return _error(409, str(exc))
        return web.json_response(self._view(job))

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(self._view(self._job(request)))

    async def _cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        try:
            self.cancel(job)
        except ValueError as exc:
            return _error(409, str(exc))
        return web.json_response(self._view(job), status=202)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        header, query = request.headers.get("Last-Event-ID"), request.query.get("after")
        given = [t for t in (header, query) if t is not None]
        for text in given:  # both checked; the header wins (an EventSource resends it on reconnecting)
            if not _EVENT_ID.fullmatch(text):
                return _error(400, f"a bad event id {text!r}: give the number of the last event seen")
        last = int(given[0]) if given else 0
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await self._stream(job, last, resp)
        except ConnectionError:  # the client went away: nothing to answer
            log.debug("job %s: an event stream client went away", job.id)
        return resp

    async def _stream(self, job: Job, last: int, resp: web.StreamResponse) -> None:
        while True:
            news = self.news[job.id]
            ended = not job.active  # read first: the report is added before the job ends
            for n, event in job.events_after(last):
                data = json.dumps(event, default=str)
                kind = event.get("event", "message")
                await resp.write(f"id: {n}\nevent: {kind}\ndata: {data}\n\n".encode())
                last = n
            if ended:
                break
            try:
                await asyncio.wait_for(news.wait(), KEEPALIVE)
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
        await resp.write_eof()

    async def serve(self, path: str) -> web.AppRunner:
        """Listen on unix socket ``path`` (mode 0660; a stale socket is replaced; the runner's
        ``cleanup()`` removes it).

        :raises SocketBusy: another process listens there.
        :raises OSError: it cannot be created.
        """
        _clear_stale(path)

        async def remove_socket(_app: web.Application) -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        self.app.on_cleanup.append(remove_socket)
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.UnixSite(runner, path)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        os.chmod(path, 0o660)
        return runner

    @staticmethod
    async def serve_tcp(runner: web.AppRunner, host: str, port: int, tls: ssl.SSLContext) -> tuple[str, int]:
        """Also serve the API on TCP ``host:port`` (0: any free port) with ``tls``, a server context
        that requires the client's certificate (mutual TLS; see
        :func:`dataplane.channel.tls.server_context`).

        :returns: the address it listens on.
        :raises OSError: it cannot listen there.
        """
        before = {str(a) for a in runner.addresses}
        site = web.TCPSite(runner, host or None, port, ssl_context=tls)
        await site.start()
        new = [a for a in runner.addresses if isinstance(a, tuple) and str(a) not in before]
        return (str(new[0][0]), int(new[0][1])) if new else (host, port)


def _check_addresses(params: dict[str, Any]) -> None:
    """:raises BadRequest: a ``to`` or ``listen`` address that cannot be parsed."""
    for key, listen in (("to", False), ("listen", True)):
        if key in params:
            try:
                host, _port = parse_hostport(params[key], allow_zero=listen, allow_empty_host=listen)
            except ValueError as exc:
                raise BadRequest(f"{key}: {exc}") from None
            if params["tls"].get("plaintext"):  # a disallowed peer is refused when asked, not as a job
                try:
                    check_plaintext(params, host, None)
                except JobRefused as exc:
                    raise web.HTTPForbidden(text=f"{key}: {exc}") from None


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody listens on; raise SocketBusy if somebody does."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise
    finally:
        probe.close()
    raise SocketBusy(errno.EADDRINUSE, f"another process serves {path}")
