"""The daemon's crash journal, and the reconciliation that reads it after a restart.

Every job that may change a QEMU writes ``<state-dir>/<job id>.journal`` (JSON lines, each
``fsync``'ed before the step it describes is taken):

* ``job``: the job's id, kind and parameters (first);
* ``qemu``: a QEMU the job connected to (``where``: its QMP socket or libvirt domain) and its run
  state then;
* ``qmp``: a command about to be sent to that QEMU (every command but the ``query-*`` ones: block
  nodes, mirror jobs, NBD exports, capabilities and parameters, ``migrate``, ``cont``...), with the
  values it replaces (``prior``) for capabilities and parameters;
* ``commit``: a cross-cluster migration's source is about to hand the guest over (from then on the
  destination may run it: the source must never resume by itself);
* ``end``: the job ended; the file is then removed.

A journal without ``end`` was left by a daemon that died (``kill -9``, a crash, the node's power).
:func:`reconcile` undoes what it recorded, newest first, with the QEMU's present state as the
guide: a migration cancelled, mirror jobs cancelled, exports and the NBD server stopped, added
nodes deleted, capabilities and parameters restored, and a source guest that was running resumed.
It never resumes a guest that may run elsewhere: after a ``commit`` (source) or a ``cont``
(destination) it only reports the job in doubt. What it did is the reconciled job's events.

The journal of the running job is a context variable (:data:`CURRENT`), set by the daemon around
each job's task; :func:`watch` attaches it to a QEMU driver, :func:`before_commit` writes a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmp_driver import ConnectFailed, DriverError, QemuDriver

if TYPE_CHECKING:
    from qmp_driver.libvirt_blockcopy import LibvirtDomainDisks

log = logging.getLogger(__name__)

__all__ = ["CURRENT", "JobJournal", "JournalError", "Reconciled", "StateDirBusy", "before_commit",
           "lock_state_dir", "pending", "reconcile", "watch"]

SUFFIX = ".journal"
#: Commands that take something back: sent even when the journal cannot be written (a full disk
#: must not stop a rollback).
UNDOING = frozenset({"cont", "migrate_cancel", "block-job-cancel", "blockdev-del", "block-export-del",
                     "nbd-server-remove", "nbd-server-stop", "migrate-set-capabilities",
                     "migrate-set-parameters", "block_set_io_throttle"})
#: Commands whose prior values a journal keeps, and the query that reads them.
PRIOR_QUERIES = {"migrate-set-capabilities": "query-migrate-capabilities",
                 "migrate-set-parameters": "query-migrate-parameters"}
#: Migration states in which ``migrate_cancel`` takes the guest back.
CANCELLABLE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})
#: Seconds reconciliation waits for a cancelled migration or block job to go.
SETTLE_S = 30.0

#: The journal of the job whose task is running (None outside jobs, or without a state directory).
CURRENT: contextvars.ContextVar[JobJournal | None] = contextvars.ContextVar("dataplane_journal", default=None)


class JournalError(DriverError):
    """A change to a QEMU was not made because the journal could not record it first."""


class JobJournal:
    """The journal file of one job (see the module)."""

    def __init__(self, path: Path, job_id: str, kind: str, params: Mapping[str, Any]) -> None:
        self.path = path
        self._qemus: dict[int, int] = {}  # id(driver) -> its number in this journal
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.write({"t": "job", "id": job_id, "kind": kind, "params": dict(params), "time": time.time()})

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` and make it durable before returning. :raises OSError: it cannot be."""
        os.write(self._fd, (json.dumps(record, default=str) + "\n").encode())
        os.fsync(self._fd)

    async def add_qemu(self, drv: QemuDriver, where: Mapping[str, Any]) -> None:
        status = "unknown"
        with contextlib.suppress(DriverError):
            status = (await drv.query_status()).status
        self._qemus[id(drv)] = n = len(self._qemus)
        self.write({"t": "qemu", "qemu": n, "where": dict(where), "status": status})

    async def before_change(self, drv: QemuDriver, command: str,
                            arguments: Mapping[str, Any] | None) -> None:
        record: dict[str, Any] = {"t": "qmp", "qemu": self._qemus.get(id(drv), -1), "cmd": command,
                                  "args": dict(arguments or {})}
        query = PRIOR_QUERIES.get(command)
        if query is not None:
            with contextlib.suppress(DriverError):
                record["prior"] = await drv.execute(query)
        try:
            self.write(record)
        except OSError as exc:
            if command in UNDOING:  # taking something back is never held up by the journal
                log.error("the journal %s cannot record %s (%s): sending it anyway", self.path, command, exc)
                return
            raise JournalError(f"{command} not sent: the crash journal {self.path} cannot record it "
                               f"({exc.strerror or exc})") from None

    def end(self, outcome: str) -> None:
        """The job ended: the journal is removed (nothing is left to reconcile)."""
        with contextlib.suppress(OSError):
            self.write({"t": "end", "outcome": outcome})
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def close(self) -> None:
        """Stop writing; the file stays (for :func:`reconcile`)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


async def watch(drv: QemuDriver, where: Mapping[str, Any]) -> None:
    """Journal every change the running job makes to the QEMU behind ``drv`` (``where``: how to
    reach it again: ``{"qmp": PATH}`` or ``{"libvirt": {"uri": ..., "domain": ...}}``). Nothing
    without a journal."""
    journal = CURRENT.get()
    if journal is None:
        return
    await journal.add_qemu(drv, where)
    drv.before_change = journal.before_change


async def watch_libvirt(disks: LibvirtDomainDisks, where: Mapping[str, Any]) -> None:
    """Journal every change the running job makes through libvirt's block copy API to the domain
    behind ``disks`` (``where``: ``{"libvirt": {"uri": ..., "domain": ...}}``). Nothing without a
    journal."""
    journal = CURRENT.get()
    if journal is None:
        return
    n = len(journal._qemus)
    journal._qemus[id(disks)] = n
    journal.write({"t": "qemu", "qemu": n, "where": dict(where), "status": "unknown", "via": "blockcopy"})

    async def before(call: str, target: str) -> None:
        record = {"t": "libvirt", "qemu": n, "call": call, "disk": target}
        try:
            journal.write(record)
        except OSError as exc:
            if call == "setBlockIoTune":  # lifting a limit is never held up by the journal
                log.error("the journal %s cannot record %s (%s): doing it anyway", journal.path, call, exc)
                return
            raise JournalError(f"{call} not done: the crash journal {journal.path} cannot record it "
                               f"({exc.strerror or exc})") from None

    disks.before_change = before


def before_commit(status: str) -> None:
    """The running job's source is about to hand the guest over (``status``).

    :raises JournalError: it cannot be recorded (then the commit must not be sent).
    """
    journal = CURRENT.get()
    if journal is not None:
        try:
            journal.write({"t": "commit", "status": status})
        except OSError as exc:
            raise JournalError(f"commit not sent: the crash journal {journal.path} cannot record it "
                               f"({exc.strerror or exc})") from None


# --------------------------------------------------------------------------- reconciliation


@dataclass
class Reconciled:
    """What reconciliation found and did for one journal: the job's ``id``, ``kind`` and ``params``,
    its ``outcome`` (``rolled-back``, ``in-doubt`` or ``failed``: a step did not work), one
    line per action, the problems."""

    id: str
    kind: str
    params: dict[str, Any]
    outcome: str = "rolled-back"
    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: the journal stays for the next start (a QEMU that did not answer)
    keep: bool = False
    #: a disk's copy had pivoted (the guest uses the new disk)
    pivoted: bool = False

    @property
    def error(self) -> str:
        head = "the daemon stopped without ending this job (killed or crashed); after its restart"
        if self.outcome == "in-doubt":
            return f"{head}: {'; '.join(self.problems)}"
        if self.problems:
            return f"{head} reconciliation could not: {'; '.join(self.problems)}"
        return f"{head} it was rolled back: the VM runs where it was, nothing of the job is left"


class StateDirBusy(OSError):
    """Another daemon uses the state directory."""


def lock_state_dir(state_dir: Path) -> int:
    """Create ``state_dir`` (mode 0700) if needed and hold its lock for this process's life (one
    daemon per state directory: two would reconcile each other's running jobs).

    :returns: the lock's file descriptor (closing it releases the lock).
    :raises StateDirBusy: another process holds it.
    :raises OSError: it cannot be created or opened.
    """
    import fcntl

    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirBusy(f"another daemon uses the state directory {state_dir}") from None
    return fd


def pending(state_dir: Path) -> list[Path]:
    """The journals in ``state_dir`` left by a daemon that died, oldest first (by name among those
    that went meanwhile)."""
    def when(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    return sorted(state_dir.glob(f"*{SUFFIX}"), key=when)


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # the last line of a daemon killed while writing it
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


async def reconcile(path: Path) -> Reconciled | None:
    """Undo what the journal at ``path`` recorded (see the module), remove it, and say what was
    done; None for a journal of a job that ended (removed as well). Never raises for a QEMU that
    is gone or refuses a step (a problem of the result)."""
    records = _records(path)
    head = records[0] if records and records[0].get("t") == "job" else None
    if head is None or any(r.get("t") == "end" for r in records):
        path.unlink(missing_ok=True)
        return None
    res = Reconciled(str(head.get("id")), str(head.get("kind")), dict(head.get("params") or {}))
    committed = any(r.get("t") == "commit" for r in records)
    for q in (r for r in records if r.get("t") == "qemu"):
        if q.get("via") == "blockcopy":
            calls = [r for r in records if r.get("t") == "libvirt" and r.get("qemu") == q.get("qemu")]
            await _reconcile_blockcopy(res, q, calls)
            continue
        cmds = [r for r in records if r.get("t") == "qmp" and r.get("qemu") == q.get("qemu")]
        await _reconcile_qemu(res, q, cmds, committed)
    if res.problems and res.outcome != "in-doubt":
        res.outcome = "failed"
    elif res.pivoted and res.outcome == "rolled-back":
        res.outcome = "partial"
    if not res.keep:
        path.unlink(missing_ok=True)
    log.warning("job %s (%s) reconciled: %s; %s", res.id, res.kind, res.outcome,
                "; ".join(res.actions + res.problems) or "nothing to do")
    return res


async def _connect(where: Mapping[str, Any]) -> QemuDriver:
    if "libvirt" in where:
        return await QemuDriver.connect_libvirt(where["libvirt"]["uri"], where["libvirt"]["domain"])
    return await QemuDriver.connect_socket(str(where["qmp"]))


async def _reconcile_qemu(res: Reconciled, q: Mapping[str, Any], cmds: list[dict[str, Any]],
                          committed: bool) -> None:
    where = q.get("where") or {}
    label = where.get("qmp") or f"domain {where.get('libvirt', {}).get('domain')!r}"
    names = {c["cmd"] for c in cmds}
    try:
        drv = await _connect(where)
    except (ConnectFailed, OSError) as exc:  # nothing listens there: the QEMU is gone
        res.actions.append(f"{label}: not reachable ({exc}): the QEMU is gone, nothing left in it")
        return
    except DriverError as exc:  # it is there but does not answer (busy, another client): try again later
        res.problems.append(f"{label} did not answer ({exc}); the journal is kept for the next start")
        res.keep = True
        return
    try:
        if res.kind == "migration" and committed:
            res.outcome = "in-doubt"
            res.problems.append(f"the guest was being handed over to the destination ({label} left as it "
                                f"is): settle it with `dataplane resolve`")
            return
        if res.kind == "receiver":
            status = str((await drv.execute("query-migrate")).get("status", "none"))
            if "cont" in names or status == "completed" or status.startswith("postcopy"):
                res.outcome = "in-doubt"
                res.problems.append(f"the guest had arrived here (incoming migration {status}; {label} left "
                                    f"as it is): settle it with `dataplane resolve`")
                return
        resume = res.kind == "migration" and "migrate" in names and q.get("status") == "running"
        await _undo(drv, res, label, cmds, resume=resume)
    finally:
        await drv.close()


async def _reconcile_blockcopy(res: Reconciled, q: Mapping[str, Any], calls: list[dict[str, Any]]) -> None:
    """A storage migration through libvirt's block copy API: a copy not yet pivoted is cancelled
    (the disk stays on its source, libvirt's domain XML with it), a write limit is lifted."""
    from qmp_driver.libvirt_blockcopy import LibvirtDomainDisks

    lv = (q.get("where") or {}).get("libvirt") or {}
    label = f"domain {lv.get('domain')!r}"
    try:
        disks = await LibvirtDomainDisks.open(str(lv.get("uri")), str(lv.get("domain")))
    except DriverError as exc:
        res.actions.append(f"{label}: not reachable ({exc}): the domain is gone, nothing left in it")
        return
    try:
        pivoted = {c["disk"] for c in calls if c.get("call") == "pivot"}
        for target in dict.fromkeys(c["disk"] for c in calls if c.get("call") == "blockCopy"):
            if target in pivoted:
                res.pivoted = True
                res.actions.append(f"{label}: disk {target}: its pivot was asked: libvirt's domain XML says "
                                   f"which file it uses now")
                continue
            if await disks.job(target) is not None:
                await _step(res, f"{label}: the block copy of disk {target} cancelled (it stays on its "
                                 f"source)", disks.cancel(target))
        for target in dict.fromkeys(c["disk"] for c in calls if c.get("call") == "setBlockIoTune"):
            await _step(res, f"{label}: the write limit of disk {target} lifted",
                        disks.throttle_writes(target, 0))
    finally:
        await disks.close()


async def _step(res: Reconciled, what: str, coro: Any) -> bool:
    try:
        await coro
    except DriverError as exc:
        res.problems.append(f"{what}: {exc}")
        return False
    res.actions.append(what)
    return True


async def _undo(drv: QemuDriver, res: Reconciled, label: str, cmds: list[dict[str, Any]], *,
                resume: bool) -> None:
    names = [c["cmd"] for c in cmds]
    if "migrate" in names:
        info = await drv.execute("query-migrate")
        status = str(info.get("status", "none"))
        if status.startswith("postcopy"):
            res.outcome = "in-doubt"
            res.problems.append(f"{label}: a postcopy was under way ({status}): settle it with "
                                f"`dataplane resolve`")
            return
        if status in CANCELLABLE:
            if await _step(res, f"{label}: migration ({status}) cancelled", drv.execute("migrate_cancel")):
                await _settle(drv, lambda i: str(i.get("status")) not in CANCELLABLE | {"cancelling"},
                              "query-migrate")
    jobs = [c["args"].get("job-id") for c in cmds if c["cmd"] in ("blockdev-mirror", "drive-mirror")]
    present = {j.get("device") for j in await drv.execute("query-block-jobs")}
    for job in (j for j in jobs if j in present):
        if await _step(res, f"{label}: block job {job} cancelled",
                       drv.execute("block-job-cancel", {"device": job, "force": True})):
            await _settle(drv, lambda js, job=job: all(j.get("device") != job for j in js),
                          "query-block-jobs")
    for c in reversed(cmds):
        if c["cmd"] == "block-export-add" and c["args"].get("id"):
            await _quiet_step(res, f"{label}: export {c['args']['id']} removed",
                              drv.execute("block-export-del", {"id": c["args"]["id"]}))
        elif c["cmd"] == "nbd-server-add" and c["args"].get("device"):
            await _quiet_step(res, f"{label}: export of {c['args']['device']} removed",
                              drv.execute("nbd-server-remove", {"name": c["args"].get("name") or
                                                                c["args"]["device"], "mode": "hard"}))
    if "nbd-server-start" in names:
        await _quiet_step(res, f"{label}: NBD server stopped", drv.execute("nbd-server-stop"))
    nodes = {n.get("node-name") for n in await drv.execute("query-named-block-nodes")}
    for c in reversed(cmds):
        node = c["args"].get("node-name") if c["cmd"] == "blockdev-add" else None
        if node and node in nodes:
            try:
                await drv.execute("blockdev-del", {"node-name": node})
            except DriverError as exc:
                if "in use" not in str(exc) and "busy" not in str(exc):
                    res.problems.append(f"{label}: block node {node} not deleted: {exc}")
                    continue
                res.actions.append(f"{label}: block node {node} kept: the guest uses it (its copy pivoted)")
                res.pivoted = True
                continue
            res.actions.append(f"{label}: block node {node} deleted")
    for dev in dict.fromkeys(c["args"].get("id") for c in cmds if c["cmd"] == "block_set_io_throttle"):
        if dev:  # the storage policy's cap on the guest's writes: lifted, as the job lifts it
            unlimited = {"id": dev, "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
            await _step(res, f"{label}: the write limit of {dev} lifted",
                        drv.execute("block_set_io_throttle", unlimited))
    for cmd, key in (("migrate-set-capabilities", "capabilities"), ("migrate-set-parameters", None)):
        first = next((c for c in cmds if c["cmd"] == cmd), None)
        if first is None:
            continue
        if "prior" not in first:
            res.problems.append(f"{label}: {cmd} was not restored: its prior values were not recorded")
            continue
        if key == "capabilities":
            prior = {p["capability"]: p["state"] for p in first["prior"]}
            touched = {x["capability"] for c in cmds if c["cmd"] == cmd for x in c["args"].get(key, [])}
            caps = [{"capability": k, "state": prior[k]} for k in sorted(touched) if k in prior]
            await _step(res, f"{label}: migration capabilities restored",
                        drv.execute(cmd, {"capabilities": caps}))
        else:
            touched = {k for c in cmds if c["cmd"] == cmd for k in c["args"]}
            params = {k: v for k, v in first["prior"].items() if k in touched}
            await _step(res, f"{label}: migration parameters restored", drv.execute(cmd, params))
    if resume:
        status = (await drv.query_status()).status
        if status in ("paused", "postmigrate", "finish-migrate"):
            await _step(res, f"{label}: the guest resumed (it was {status})", drv.cont())
        elif status != "running":
            res.problems.append(f"{label}: the guest is {status}: left as it is")


async def _quiet_step(res: Reconciled, what: str, coro: Any) -> None:
    """A step whose failure only means it was already undone (an export that went with its server)."""
    try:
        await coro
    except DriverError as exc:
        log.debug("%s: %s", what, exc)
        return
    res.actions.append(what)


async def _settle(drv: QemuDriver, done: Any, query: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        if done(await drv.execute(query)):
            return
        await asyncio.sleep(0.1)
