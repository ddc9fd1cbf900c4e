"""The node daemon's API contract (#15), checked by schemathesis against the OpenAPI document the
daemon itself serves at /openapi.json: no operation answers 5xx, every response has a status code
the document lists for its operation and a body of the documented schema, negative input
(malformed JSON, unknown fields, absurd values, a wrong content type, an undeclared method) is
refused with a 4xx that says why, and schema-valid input is taken.

A real :class:`Daemon` serves on 127.0.0.1 (an ephemeral port: schemathesis's transport speaks TCP,
not unix sockets) on an event loop of its own thread. Schemathesis's engine (what ``st run`` runs:
its probing, coverage, fuzzing and stateful phases and every built-in check, plus
:func:`refusal_says_why`) runs once per module, with a fixed seed and deterministic generation;
each test below judges one group of its checks. Then a few pinned absurd inputs, which random
generation reaches only by luck, go through the same checks.

Any failure fails its test. (The first run found eight mismatches, a 500 among them; all are fixed.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
from aiohttp import web
from schemathesis import Case, CheckContext, CheckFunction, Response
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import StopReason, events, from_schema
from schemathesis.errors import FailureGroup
from schemathesis.schemas import BaseSchema

from dataplane.daemon.cclm_jobs import run_migration, run_receiver
from dataplane.daemon.jobs import ACTIVE, JobEnd
from dataplane.daemon.server import MIGRATION, RECEIVER, STORAGE, Daemon, Runner
from dataplane.daemon.storage_jobs import run_storage_migration

T = TypeVar("T")

#: Fixed seed, deterministic generation, no example database: the same requests on every run.
SEED = 15
#: Fuzzed cases per operation (the coverage and stateful phases add their own, bounded, cases).
MAX_EXAMPLES = 60
#: Operations whose request bodies the coverage phase skips (see _config).
SLOW_COVERAGE = ("/v1/migrations", "/v1/receivers")
#: Seconds a request may take (an event stream ends with its job, at once here).
REQUEST_TIMEOUT = 10
#: Seconds every job has to end (they end refused at once).
JOBS_END_WITHIN = 15.0
#: A QMP socket path that names nothing.
NO_QMP = "/nonexistent/dataplane-contract/qmp.sock"

pytestmark = pytest.mark.timeout(180)


# ------------------------------------------------------------------------ the served daemon


def _stub_refusal(error: str) -> JobEnd:
    return JobEnd("refused", {"event": "report", "outcome": "refused", "error": error}, error)


def _guarded(kind: str, real: Runner) -> Runner:
    """``real``, the daemon's own runner of ``kind``, except where running it would reach outside
    this test; there a STUB ends the job ``refused`` at once:

    - a request naming a libvirt domain: the real runner hands libvirt the URI schemathesis made
      up, which may autostart a session daemon or reach the host's libvirtd, and blocks a thread as
      long as libvirt likes;
    - a (source-side) migration: the real runner dials the destination schemathesis made up (any
      host name or address on the network) before it looks at the VM.

    Everything else (a storage migration or a receiver of a QMP socket) runs for real: the socket
    paths schemathesis makes up name nothing, so the job ends ``refused`` ("cannot reach") at once,
    without touching a VM, a disk or the network.
    """

    async def run(params: dict[str, Any], on_event: Callable[[dict[str, Any]], None],
                  interrupt: asyncio.Event, control: Any) -> JobEnd:
        if "libvirt" in params:
            return _stub_refusal("stub (contract test): a libvirt request is not run")
        if kind == MIGRATION:
            return _stub_refusal("stub (contract test): a migration does not dial its destination")
        return await real(params, on_event, interrupt, control)

    return run


class ServedDaemon:
    """A :class:`Daemon` on 127.0.0.1:<ephemeral port>, on an event loop of its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="contract-daemon", daemon=True)
        self.thread.start()
        real: dict[str, Runner] = {STORAGE: run_storage_migration, MIGRATION: run_migration,
                                   RECEIVER: run_receiver}
        self.daemon = Daemon(runners={kind: _guarded(kind, run) for kind, run in real.items()})
        self.daemon.table.keep_ended = 1 << 20  # remember every job the run makes, to judge how each ended
        self.runner = web.AppRunner(self.daemon.app, handle_signals=False, access_log=None)
        self.url = f"http://127.0.0.1:{self.call(self._start())}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the daemon's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> int:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return int(self.runner.addresses[0][1])

    async def _ended(self) -> list[tuple[str, str, str, str | None]]:
        deadline = time.monotonic() + JOBS_END_WITHIN
        while any(j.state in ACTIVE for j in self.daemon.table.jobs()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return [(j.kind, j.id, j.state, j.error) for j in self.daemon.table.jobs()]

    def jobs(self) -> list[tuple[str, str, str, str | None]]:
        """(kind, id, state, error) of every job the daemon remembers, once they all ended (or
        JOBS_END_WITHIN ran out)."""
        return self.call(self._ended(), JOBS_END_WITHIN + 5)

    def close(self) -> None:
        try:
            self.call(self.daemon.shutdown())
            self.call(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


# ------------------------------------------------------------------------ the schemathesis run


@schemathesis.check
def refusal_says_why(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A 4xx of the daemon is JSON ``{"error": <what is wrong>, ...}``, whatever the operation or
    status (documented or not: a 405 or a 413 too)."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON: {response.content[:200]!r}"
                             ) from None
    if not (isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"].strip()):
        raise AssertionError(f"a {response.status_code} without an error message: {body!r:.200}")
    return True


@dataclass(frozen=True)
class Found:
    """One failure of one check, as schemathesis reported it."""

    check: str
    operation: str
    title: str
    message: str
    curl: str
    status: int | None
    body: str

    def __str__(self) -> str:
        return (f"[{self.check}] {self.operation}: {self.title}: {self.message.strip()}\n"
                f"    {self.curl}\n    -> {self.status} {self.body}")


@dataclass
class ContractRun:
    """What one schemathesis run against the daemon found."""

    found: list[Found] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checks: Counter[str] = field(default_factory=Counter)
    #: (operation, generation mode, status) of every response
    responses: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    #: the body of every 4xx response
    refusals: set[str] = field(default_factory=set)
    operations: set[str] = field(default_factory=set)
    stop_reason: StopReason | None = None
    seconds: float = 0.0

    def failures(self, *checks: str) -> list[Found]:
        return [f for f in self.found if f.check in checks]

    def _scenario(self, event: events.ScenarioFinished) -> None:
        rec = event.recorder
        for case_id, node in rec.cases.items():
            interaction = rec.interactions.get(case_id)
            if interaction is not None and interaction.response is not None:
                meta = node.value.meta
                mode = meta.generation.mode.value if meta is not None else "?"
                status = interaction.response.status_code
                self.responses[(node.value.operation.label, mode, status)] += 1
                if 400 <= status < 500:
                    self.refusals.add(interaction.response.content[:2000].decode(errors="replace"))
        seen = {(f.check, f.operation, f.title, f.message) for f in self.found}
        for case_id, nodes in rec.checks.items():
            for node in nodes:
                self.checks[node.name] += 1
                if node.failure_info is None:
                    continue
                failure = node.failure_info.failure
                key = (node.name, failure.operation or rec.label, failure.title, failure.message)
                if key in seen:
                    continue
                seen.add(key)
                response = rec.find_response(case_id=case_id)
                self.found.append(Found(
                    *key, curl=node.failure_info.code_sample,
                    status=response.status_code if response is not None else None,
                    body=response.content[:300].decode(errors="replace") if response is not None else ""))

    @classmethod
    def execute(cls, schema: BaseSchema) -> ContractRun:
        out = cls(operations={op.ok().label for op in schema.get_all_operations()})
        start = time.monotonic()
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                out._scenario(event)
            elif isinstance(event, events.NonFatalError):
                out.errors.append(f"{event.label}: {event.info.title}: {event.value!r:.300}")
            elif isinstance(event, events.FatalError):
                out.errors.append(f"fatal: {event.exception!r}")
            elif isinstance(event, events.EngineFinished):
                out.stop_reason = event.stop_reason
        out.seconds = time.monotonic() - start
        return out


def _config(url: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({
        "seed": SEED,
        "base-url": url,
        "request-timeout": REQUEST_TIMEOUT,
        "continue-on-failure": True,  # one finding must not hide the next one of its operation
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        # schemathesis's coverage phase spends ~25 s apiece building the boundary cases of these two
        # bodies (the `oneOf` of their `Tls`), most of this test's time: they get the fuzzing and
        # stateful phases only
        "operations": [{"include-path": list(SLOW_COVERAGE), "include-method": "POST",
                        "phases": {"coverage": {"enabled": False}}}],
    })


@pytest.fixture(scope="module")
def served() -> Iterator[ServedDaemon]:
    daemon = ServedDaemon()
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture(scope="module")
def api_schema(served: ServedDaemon) -> BaseSchema:
    # the contract is the document the daemon serves, not the module it is built from
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json", config=_config(served.url))


@pytest.fixture(scope="module")
def run(api_schema: BaseSchema) -> ContractRun:
    return ContractRun.execute(api_schema)


# ------------------------------------------------------------------------ known findings


def _judge(found: list[Found]) -> None:
    """Fail on any failure of the checks (each with what schemathesis saw)."""
    assert not found, "\n".join(map(str, found))


def _judge_jobs(jobs: list[tuple[str, str, str, str | None]]) -> None:
    """Every job ended, ``refused`` or ``cancelled``: fail on any other end."""
    left = [j for j in jobs if j[2] in ACTIVE]
    assert not left, f"jobs still active {JOBS_END_WITHIN}s after: {left[:5]}"
    bad = [j for j in jobs if j[2] not in ("refused", "cancelled")]
    assert not bad, f"{len(bad)} of {len(jobs)} jobs did not end refused: {bad[:5]}"


# ------------------------------------------------------------------------ the run's tests

#: The checks each test below judges; every other check schemathesis runs goes to the last one.
SERVER_ERRORS = ("not_a_server_error",)
DOCUMENTED = ("status_code_conformance", "content_type_conformance", "response_schema_conformance",
              "response_headers_conformance")
REFUSALS = ("negative_data_rejection", "missing_required_header", "refusal_says_why")
ACCEPTANCE = ("positive_data_acceptance",)
METHODS = ("unsupported_method", "allow_header_conformance")
GROUPED = {*SERVER_ERRORS, *DOCUMENTED, *REFUSALS, *ACCEPTANCE, *METHODS}


def test_the_run_completed_and_reached_every_operation(run: ContractRun) -> None:
    assert run.stop_reason == StopReason.COMPLETED, run.stop_reason
    assert not run.errors, "\n".join(run.errors)
    answered = {op for op, _mode, _status in run.responses}
    assert run.operations and run.operations <= answered, run.operations - answered
    for check in (*SERVER_ERRORS, *DOCUMENTED, "negative_data_rejection", "refusal_says_why", *ACCEPTANCE,
                  "unsupported_method"):
        assert run.checks[check] > 0, f"schemathesis never ran {check}"
    # the negative cases reached the validation of the request bodies: refused with a 400 (a PATCH's
    # only where its id was a job's, a made-up one being a 404 first: see test_bad_changes_are_a_4xx)
    posts = {op for op in run.operations if op.startswith("POST ")}
    refused = {op for op, mode, status in run.responses if mode == "negative" and status == 400}
    assert posts and posts <= refused, posts - refused
    assert any("malformed JSON" in body for body in run.refusals)


def test_schema_valid_bodies_create_jobs(run: ContractRun) -> None:
    posts = {op for op in run.operations if op.startswith("POST ")}
    created = {op for op, mode, status in run.responses if mode == "positive" and status == 201}
    assert "POST /v1/storage-migrations" in created
    assert posts <= created, posts - created


def test_no_operation_answers_a_server_error(run: ContractRun) -> None:
    _judge(run.failures(*SERVER_ERRORS))


def test_responses_are_documented_statuses_and_bodies(run: ContractRun) -> None:
    _judge(run.failures(*DOCUMENTED))


def test_negative_input_is_refused_with_a_4xx_that_says_why(run: ContractRun) -> None:
    _judge(run.failures(*REFUSALS))


def test_schema_valid_input_is_accepted(run: ContractRun) -> None:
    _judge(run.failures(*ACCEPTANCE))


def test_undeclared_methods_get_a_405_with_allow(run: ContractRun) -> None:
    _judge(run.failures(*METHODS))


def test_every_other_check_passes(run: ContractRun) -> None:
    """The stateful checks (use_after_free, ensure_resource_availability, ...) and any check a
    later schemathesis adds."""
    _judge([f for f in run.found if f.check not in GROUPED])


def test_the_jobs_the_run_created_ended_refused(run: ContractRun, served: ServedDaemon) -> None:
    """Each schema-valid request became a job that ended at once: ``refused`` (nothing at the
    paths schemathesis made up, or the stub) or ``cancelled``; never ``failed`` (an error of the
    daemon itself), and none left running."""
    jobs = served.jobs()
    assert jobs, "the run created no job"
    _judge_jobs(jobs)


# ------------------------------------------------------------------------ pinned absurd inputs


def _call(schema: BaseSchema, label: str, *, want: set[int] | None = None, base_url: str | None = None,
          excluded: tuple[CheckFunction, ...] = (), **parts: Any) -> Response:
    """Send one hand-made case of operation ``label`` (to ``base_url``, default the schema's) and run
    schemathesis's checks but ``excluded`` on its response; a failure (or a status outside ``want``)
    is judged by :func:`_judge`."""
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"the served document has no {label}"
    case = operation.Case(**parts)
    response = case.call(base_url=base_url)
    found: list[Found] = []
    curl = case.as_curl_command(base_url=base_url)
    body = response.content[:300].decode(errors="replace")
    try:
        case.validate_response(response, excluded_checks=list(excluded))
    except FailureGroup as group:
        found += [Found((type(f).checks or ("custom",))[0], label, f.title, f.message, curl,
                        response.status_code, body) for f in group.exceptions]
    if want is not None and response.status_code not in want:
        found.append(Found("pinned", label, f"a {response.status_code}, not one of {sorted(want)}", "", curl,
                           response.status_code, body))
    _judge(found)
    return response


#: A request that names nothing that exists: taken, it makes a job that ends refused.
ABSENT = {"qmp": NO_QMP, "disks": [{"disk": "vda", "target": "/nonexistent/dataplane-contract/target"}]}


@pytest.fixture(scope="module")
def ended_job(api_schema: BaseSchema, served: ServedDaemon) -> str:
    """The id of a storage migration that ended (refused: nothing at its QMP socket path)."""
    response = _call(api_schema, "POST /v1/storage-migrations", want={201}, media_type="application/json",
                     body=ABSENT)
    job_id = str(response.json()["id"])
    assert [j[2] for j in served.jobs() if j[1] == job_id] == ["refused"]
    return job_id


@pytest.mark.parametrize(("parts", "want", "says"), [
    pytest.param({"body": b"{not json"}, 400, "malformed JSON", id="malformed-json"),
    pytest.param({"body": {**ABSENT, "turbo": True}}, 400, "Additional properties are not allowed ('turbo'",
                 id="an-unknown-field"),
    pytest.param({"body": {**ABSENT, "bandwidth": 1 << 50}}, 400, "is greater than the maximum",
                 id="an-absurd-bandwidth"),
    pytest.param({"body": {**ABSENT, "timeout": -1}}, 400, "less than or equal to the minimum",
                 id="a-negative-timeout"),
    pytest.param({"body": {**ABSENT, "disks": [{"disk": "vda", "target": "/x", "format": "vmdk"}]}}, 400,
                 "'vmdk' is not one of", id="an-unknown-format"),
    pytest.param({"body": {**ABSENT, "timeout": "soon"}}, 400, "is not of type 'number'", id="a-wrong-type"),
    pytest.param({"body": [ABSENT]}, 400, "is not of type 'object'", id="not-an-object"),
    pytest.param({"body": {"disks": ABSENT["disks"]}}, 400, "is not valid under any", id="no-vm"),
    pytest.param({"body": "qmp=/x", "media_type": "text/plain"}, 415, "must be application/json",
                 id="not-json"),
    pytest.param({"body": b" " * (2 << 20)}, 413, "size", id="over-the-size-limit"),
])
def test_bad_bodies_are_a_4xx_that_says_why(api_schema: BaseSchema, parts: dict[str, Any], want: int,
                                            says: str) -> None:
    response = _call(api_schema, "POST /v1/storage-migrations", want={want},
                     **{"media_type": "application/json", **parts})
    refusal = response.json()
    assert says in " ".join([refusal["error"], *refusal.get("details", [])]), refusal


@pytest.mark.parametrize(("body", "want", "says"), [
    pytest.param({"bandwidth": -1}, 400, "is less than the minimum", id="a-negative-bandwidth"),
    pytest.param({"bandwidth": 1, "speed": 2}, 400, "Additional properties are not allowed ('speed'",
                 id="an-unknown-field"),
    pytest.param({}, 400, "'bandwidth' is a required property", id="nothing"),
    pytest.param({"bandwidth": 1}, 409, "already ended", id="a-job-that-ended"),
])
def test_bad_changes_are_a_4xx_that_says_why(api_schema: BaseSchema, ended_job: str, body: dict[str, Any],
                                             want: int, says: str) -> None:
    response = _call(api_schema, "PATCH /v1/storage-migrations/{id}", want={want},
                     path_parameters={"id": ended_job}, media_type="application/json", body=body)
    refusal = response.json()
    assert says in " ".join([refusal["error"], *refusal.get("details", [])]), refusal


def test_unknown_and_ended_jobs_are_a_4xx(api_schema: BaseSchema, ended_job: str) -> None:
    response = _call(api_schema, "GET /v1/storage-migrations/{id}", want={404},
                     path_parameters={"id": "sto-000000000000"})
    assert "no storage migration 'sto-000000000000'" in response.json()["error"]
    response = _call(api_schema, "DELETE /v1/storage-migrations/{id}", want={409},
                     path_parameters={"id": ended_job})
    assert "already ended (refused)" in response.json()["error"]


def test_a_daemon_shutting_down_refuses_new_jobs(api_schema: BaseSchema) -> None:
    """A 503 that says so (on a daemon of its own, since it does not come back): the one 5xx meant,
    so not_a_server_error is not asked."""
    other = ServedDaemon()
    try:
        other.call(other.daemon.shutdown())
        response = _call(api_schema, "POST /v1/storage-migrations", want={503}, base_url=other.url,
                         excluded=(schemathesis.checks.not_a_server_error,), media_type="application/json",
                         body=ABSENT)
        assert "shutting down" in response.json()["error"]
    finally:
        other.close()


@pytest.mark.parametrize(("query", "headers"), [
    pytest.param({"after": "²"}, {}, id="after-a-unicode-digit"),  # '²'.isdigit(), but int('²') raises
    pytest.param({"after": "1" * 19}, {}, id="after-19-digits"),
    pytest.param({"after": "-1"}, {"Last-Event-ID": "1"}, id="after-negative-beside-last-event-id"),
    pytest.param({}, {"Last-Event-ID": "1e3"}, id="last-event-id-not-a-number"),
])
def test_absurd_event_ids_are_a_400(api_schema: BaseSchema, ended_job: str, query: dict[str, str],
                                    headers: dict[str, str]) -> None:
    _call(api_schema, "GET /v1/storage-migrations/{id}/events", want={400},
          path_parameters={"id": ended_job}, query=query, headers=headers)


@pytest.mark.parametrize("target", [
    pytest.param("{tmp}/a-nul-byte\x00", id="a-nul-byte"),
    pytest.param("{tmp}/" + "n" * 300, id="a-name-too-long"),
    pytest.param("{tmp}/a-file/under-it", id="under-a-file"),
])
def test_absurd_targets_are_refused(api_schema: BaseSchema, served: ServedDaemon, tmp_path: Path,
                                    target: str) -> None:
    """A 400, or a job that ends ``refused``; never one that ``failed``."""
    (tmp_path / "a-file").write_bytes(b"")
    body = {"qmp": NO_QMP, "disks": [{"disk": "vda", "target": target.format(tmp=tmp_path)}]}
    response = _call(api_schema, "POST /v1/storage-migrations", want={201, 400},
                     media_type="application/json", body=body)
    if response.status_code == 201:
        job_id = response.json()["id"]
        _judge_jobs([j for j in served.jobs() if j[1] == job_id])


def test_a_disallowed_peer_is_a_4xx(api_schema: BaseSchema) -> None:
    """Plaintext to an address other hosts may reach (TEST-NET-1, routed nowhere), the network not
    said to be isolated: refused when asked, with the reason."""
    response = _call(api_schema, "POST /v1/migrations", want={400, 403, 422}, media_type="application/json",
                     body={"qmp": NO_QMP, "to": "192.0.2.1:4444", "tls": {"plaintext": True}})
    assert "plaintext" in response.json()["error"]
