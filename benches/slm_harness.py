"""Harness of the storage live migration benchmark (``benches/test_bench_slm.py``).

Two parts, each on a real QEMU whose test guest writes its disk journal
(``dataplane.testing.agent``) as fast as the disk lets it (no RAM dirtier):

* :func:`slm_round`: one in-place storage live migration
  (:func:`dataplane.migration.slm.storage_migrate`, default options) of a guest
  whose 1 GiB raw data disk holds 512 MiB of data (text-like, random and
  written zeros, :data:`DATA_LAYOUT`), with its 16 MiB raw journal disk moved
  along in the same run, against ``qemu-img convert`` of the same image
  offline (before the guest starts), into files of the same directory. It
  measures the times, the allocated bytes (``st_blocks * 512``, as ``du``) of
  the source and the target, and the guest's journal write rate before and
  during the copy, and verifies the migration (the report, the journal on the
  new journal disk, the new data disk identical to the old one).
* :func:`converge_run`: a copy the guest outruns, on QEMU 7.2 (no
  ``block-job-change``): a 256 MiB raw journal disk, fully allocated, that the
  guest rewrites with 1 MiB records (~30 MiB/s under TCG here) while the copy
  is capped at :data:`OUTRUN_SPEED`. Ways to make it converge
  (:data:`OPTIONS`): ``write-blocking`` (``blockdev-mirror`` in the
  write-blocking copy mode from the start), ``restart`` (background, then on
  a stall cancel the job and start it again in write-blocking: the disk is
  copied again; driven here), ``throttle`` (``storage_migrate`` with
  ``restart_max_s=0``: background, then on a stall the guest's writes
  throttled with ``block_set_io_throttle``) and ``policy``
  (``storage_migrate``'s default: it starts over in write-blocking when
  copying the disk again takes at most ``restart_max_s``, 60 s). Stalls are
  judged the same way for all but the first
  (:class:`~dataplane.migration.slm.CopyMonitor`, :data:`STALL_WINDOW`). Each
  run ends with the pivot and the journal verified on the new disk.

The guest's journal write rate comes from its ``ACK <seq>`` console lines (one
per durable record): :class:`AckSampler` samples the highest acknowledged
sequence number every 0.1 s, and a rate is records per second over a window.

``python -m benches.slm_harness [--part slm|converge|both] [--options ...]``
runs a part outside pytest and prints the figures (QEMU and the test guest
needed; the converge part needs the QEMU 7.2 floor, ``scripts/qemu-floor.sh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataplane.testing.cclm import DiskLayout, write_disk
from dataplane.testing.journal import encode_header, encode_record, parse_serial, verify_journal
from dataplane.testing.vm import (
    Disk,
    QemuVM,
    VMSpec,
    allocated_bytes,
    images_identical,
    make_disk,
    run_async,
)

MiB = 1 << 20
GiB = 1 << 30

#: The data disk: 1 GiB holding 512 MiB of data (50 %): 224 MiB text-like, 192 MiB random and 96 MiB of
#: written zeros, in 10 MiB regions spread over the disk with holes between (``write_disk``).
DATA_LAYOUT = DiskLayout(size=1 * GiB, text=224 * MiB, random=192 * MiB, zero=96 * MiB)
JOURNAL_MIB = 16
#: The guest's journal write rate is measured over this many seconds right before the copy.
WINDOW_S = 5.0
#: ``dp.disk_rate`` far above what the guest reaches: the journal writes as fast as each record (written
#: O_DIRECT|O_DSYNC, then fdatasync) becomes durable, so its rate measures the guest's write latency.
UNPACED = 2000
#: The guest: heartbeat, the journal on /dev/vda (4 KiB records), no RAM dirtier (its checker would take the
#: vCPU from the journal under TCG).
SLM_GUEST = {"hb_ms": 100, "dirty_mib": 0, "disk": "/dev/vda", "disk_rate": UNPACED, "disk_rec": 4096}
SLM_TIMEOUT = 300.0

#: The copy the guest outruns: a 256 MiB journal disk rewritten with 1 MiB records, the copy capped at
#: 12 MiB/s (the guest writes ~30 MiB/s before the copy on this machine, see the printed figures).
OUTRUN_DISK = 256 * MiB
OUTRUN_REC = 1 * MiB
OUTRUN_SPEED = 12 * MiB
#: Seconds per stall window, for ``restart`` and ``throttle`` alike (``storage-migrate --stall-window``;
#: its default, 10, would make each run ~12 s longer: a stall shows at the end of the second window).
STALL_WINDOW = 4.0
STALL_MIN_SHRINK = 0.05  # the product's default (SlmOptions.stall_min_shrink)
OPTIONS = ("write-blocking", "restart", "throttle", "policy")
CONVERGE_TIMEOUT = 150.0
#: boot id of the "earlier boot" whose journal fills the disk before the guest starts (stale records, which
#: verify_journal accepts): the copy then starts with the whole disk allocated.
STALE_BOOT = 0x5EED_0000_0000_0001


class BenchError(AssertionError):
    """A migration of the benchmark failed or could not be verified (the message says why)."""


# --------------------------------------------------------------------------- the guest's write rate


class AckSampler:
    """The highest ``ACK <seq>`` of a guest's serial console, sampled every *period* s in a thread.

    Reads the console log incrementally (only complete lines are parsed).
    Use as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(self, vm: QemuVM, period: float = 0.1) -> None:
        self.path = vm.serial_path
        self.period = period
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), highest ACK)
        self._pos = 0
        self._rest = b""
        self._top = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ack-sampler", daemon=True)

    def _poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                chunk = f.read()
        except OSError:
            chunk = b""
        self._pos += len(chunk)
        data = self._rest + chunk
        cut = data.rfind(b"\n") + 1
        self._rest = data[cut:]
        if cut:
            acks = parse_serial(data[:cut].decode(errors="replace")).acks
            if acks:
                self._top = max(self._top, max(acks))
        self.samples.append((time.monotonic(), self._top))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.period)

    def start(self) -> AckSampler:
        self._poll()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def __enter__(self) -> AckSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def at(self, t: float) -> float:
        """The acknowledged count at monotonic time *t* (linear between samples). Raises ValueError
        outside the sampled span."""
        s = list(self.samples)
        if not s or t < s[0][0] - self.period or t > s[-1][0] + self.period:
            raise ValueError(f"time {t:.3f} is outside the sampled span")
        prev = s[0]
        for cur in s:
            if cur[0] >= t:
                if cur[0] == prev[0]:
                    return float(cur[1])
                return prev[1] + (cur[1] - prev[1]) * (t - prev[0]) / (cur[0] - prev[0])
            prev = cur
        return float(s[-1][1])

    def rate(self, t0: float, t1: float) -> float:
        """Records acknowledged per second over [*t0*, *t1*]."""
        if t1 <= t0:
            raise ValueError("empty window")
        return (self.at(t1) - self.at(t0)) / (t1 - t0)


def _wait_sampled(sampler: AckSampler, t: float) -> None:
    """Wait until *sampler* has a sample after monotonic time *t*."""
    deadline = time.monotonic() + 5
    while not sampler.samples or sampler.samples[-1][0] < t:
        if time.monotonic() > deadline:
            raise BenchError("the console sampler stopped sampling")
        time.sleep(sampler.period / 2)


# --------------------------------------------------------------------------- part 1: SLM vs qemu-img convert


@dataclass
class Convert:
    """``qemu-img convert`` of the data image: the command's time and the fsync of its output after it."""

    convert_s: float
    fsync_s: float
    allocated: int

    @property
    def total_s(self) -> float:
        return self.convert_s + self.fsync_s


def convert_offline(src: Path, dst: Path, fmt: str = "raw", out_fmt: str = "raw") -> Convert:
    """Time ``qemu-img convert -f fmt -O out_fmt src dst`` (its defaults: sparse, cache ``unsafe``, so
    the data may still sit in the page cache when it returns), then the fsync of *dst*. Raises BenchError."""
    dst.unlink(missing_ok=True)
    t = time.monotonic()
    out = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", out_fmt, str(src), str(dst)],
                         capture_output=True, text=True, check=False)
    convert_s = time.monotonic() - t
    if out.returncode != 0:
        raise BenchError(f"qemu-img convert failed ({out.returncode}): {out.stderr.strip()}")
    t = time.monotonic()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return Convert(convert_s, time.monotonic() - t, allocated_bytes(dst))


@dataclass
class SlmRound:
    """One round of part 1: the reference convert, then the storage live migration of the running guest."""

    convert: Convert
    slm_s: float = 0.0
    src_alloc: int = 0
    dst_alloc: int = 0
    rate_before: float = 0.0  # journal records/s in the WINDOW_S before the copy
    rate_during: float = 0.0  # ... from the call of storage_migrate to its return
    report: dict[str, Any] = field(default_factory=dict)
    verified: list[str] = field(default_factory=list)
    qemu: str = ""

    @property
    def slowdown(self) -> float:
        return self.rate_during / self.rate_before if self.rate_before else 0.0

    def line(self) -> str:
        size = DATA_LAYOUT.size
        c = self.convert
        return (f"SLM {self.slm_s:.2f} s ({size / MiB / self.slm_s:.0f} MiB/s of virtual size); "
                f"qemu-img convert {c.convert_s:.2f} s + fsync {c.fsync_s:.2f} s = {c.total_s:.2f} s "
                f"({size / MiB / c.total_s:.0f} MiB/s; {size / MiB / c.convert_s:.0f} MiB/s without the "
                f"fsync); allocated: source {self.src_alloc / MiB:.0f} MiB, SLM target "
                f"{self.dst_alloc / MiB:.0f} MiB, convert target {c.allocated / MiB:.0f} MiB; guest journal "
                f"{self.rate_before:.0f} rec/s before, {self.rate_during:.0f} rec/s during the copy "
                f"(x{self.slowdown:.2f})")


def _guest_spec(disks: list[Disk], cmdline: dict[str, object], art: Any, name: str) -> VMSpec:
    return VMSpec(memory_mib=128, disks=disks, cmdline=cmdline, kernel=art.kernel, initrd=art.initrd,
                  name=name)


def slm_round(workdir: Path, art: Any, *, qemu: str | None = None,
              log: Callable[[str], None] | None = None, target_dir: Path | None = None,
              bandwidth: int = 0) -> SlmRound:
    """Part 1, once (see the module): write the data image, convert it offline (timed), boot the guest on
    it, measure its journal rate for WINDOW_S, move both disks with ``storage_migrate``, verify.

    *target_dir*: where the new disks go (default *workdir*: the same file system as the old ones).
    *bandwidth*: the copy's cap per disk in bytes/s (``storage-migrate --bandwidth``; 0, the default,
    copies as fast as QEMU can: what the benchmark measures).
    *art* is the built test guest (``dataplane.testing.guest.build()``). Raises BenchError when the
    migration fails or does not verify, VMError / TimeoutError when the guest cannot be run.
    """
    from dataplane.migration.slm import DiskMove, SlmFailed, SlmOptions, storage_migrate
    from dataplane.storage.targets import parse_target
    from qmp_driver import QemuDriver

    say = log or (lambda msg: None)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    src = write_disk(workdir / "data.raw", DATA_LAYOUT)
    os.sync()
    conv = convert_offline(src, workdir / "convert.raw")
    (workdir / "convert.raw").unlink()
    jrnl = make_disk(workdir / "jrnl.raw", JOURNAL_MIB * MiB)
    where = workdir if target_dir is None else target_dir
    where.mkdir(parents=True, exist_ok=True)
    new_jrnl, new_data = where / "new-jrnl.raw", where / "new-data.raw"
    for old in (new_jrnl, new_data):
        old.unlink(missing_ok=True)
    os.sync()
    result = SlmRound(conv, src_alloc=allocated_bytes(src))
    vm = QemuVM(_guest_spec([Disk(jrnl, "raw", node_name="jrnl"), Disk(src, "raw", node_name="data")],
                            SLM_GUEST, art, "slm-bench"), workdir / "vm", qemu=qemu)
    vm.start()
    try:
        result.qemu = vm.qemu_version()
        vm.wait_acks(20, 60)
        with AckSampler(vm) as acks:
            t_before = time.monotonic()
            time.sleep(WINDOW_S)

            async def migrate() -> tuple[Any, float, float]:
                async with await QemuDriver.connect_socket(str(vm.qmp_path)) as drv:
                    t0 = time.monotonic()
                    rep = await storage_migrate(drv, [DiskMove("jrnl", parse_target(str(new_jrnl), "raw")),
                                                      DiskMove("data", parse_target(str(new_data), "raw"))],
                                                SlmOptions(bandwidth=bandwidth))
                    return rep, t0, time.monotonic()

            try:
                report, t0, t1 = run_async(migrate, SLM_TIMEOUT)
            except SlmFailed as exc:
                raise BenchError(f"the storage migration failed: {exc}") from exc
            _wait_sampled(acks, t1)
        result.slm_s = t1 - t0
        result.rate_before = acks.rate(t_before, t0)
        result.rate_during = acks.rate(t0, t1)
        result.report = report.as_dict()
        say(f"storage_migrate: {report.outcome} in {report.total_time:.2f} s, {report.copied / MiB:.0f} MiB "
            f"copied")
        if report.outcome != "completed" or not all(d.pivoted for d in report.disks):
            raise BenchError(f"the storage migration did not complete: {result.report}")
        files = [d.file for d in report.disks]
        if files != [str(new_jrnl), str(new_data)]:
            raise BenchError(f"the guest's disks are {files}, not the targets")
        result.verified.append(f"both disks pivoted to their targets ({report.copied / MiB:.0f} MiB copied)")
        n = vm.serial().max_ack
        vm.wait_acks(n + 10, 60)  # the journal goes on, on the new disk
    finally:
        vm.stop()
    acked = vm.serial().max_ack
    jr = verify_journal(str(new_jrnl), "raw", acked_upto=acked)
    result.verified.append(f"journal verifies on the new disk ({jr.records} records up to #{jr.last_seq}, "
                           f"acknowledged #{acked})")
    if not images_identical(src, new_data, "raw", "raw"):
        raise BenchError(f"the new data disk {new_data} differs from the old one {src}")
    result.verified.append("new data disk identical to the old one (qemu-img compare)")
    result.dst_alloc = allocated_bytes(new_data)
    result.src_alloc = allocated_bytes(src)
    for p in (src, new_data, new_jrnl, jrnl):
        p.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------- part 2: a copy the guest outruns


@dataclass
class ConvergeRun:
    """One way of making a copy the guest outruns converge, as it went."""

    option: str
    qemu: str = ""
    total_s: float = 0.0  # copy start to pivot done
    copied: int = 0  # bytes the mirror job(s) copied (job offsets, summed over jobs)
    jobs: int = 0
    step_s: float | None = None  # when the convergence step was taken, from the copy start
    rate_before: float = 0.0  # journal records/s in the WINDOW_S before the copy
    rate_during: float = 0.0  # ... over the whole copy
    rate_step: float | None = None  # ... from the step to the pivot
    decisions: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)

    def line(self) -> str:
        rec = OUTRUN_REC / MiB
        step = ""
        if self.step_s is not None and self.rate_step is not None:
            step = (f"; step at {self.step_s:.1f} s, then {self.rate_step:.1f} rec/s "
                    f"(x{self.rate_step / self.rate_before:.2f})")
        return (f"{self.option}: total {self.total_s:.1f} s, copied {self.copied / MiB:.0f} MiB "
                f"({self.copied / OUTRUN_DISK:.2f}x the disk, {self.jobs} job(s)); guest journal "
                f"{self.rate_before:.1f} rec/s ({self.rate_before * rec:.1f} MiB/s) before, "
                f"{self.rate_during:.1f} rec/s during the copy (x{self.rate_during / self.rate_before:.2f})"
                f"{step}")


def prefill_journal(path: Path, size: int, rec: int, boot_id: int = STALE_BOOT) -> Path:
    """A raw image of *size* bytes holding a complete journal of an earlier boot (every slot written):
    the guest's own journal then overwrites it, and :func:`verify_journal` counts what is left as stale."""
    nslots = (size - 4096) // rec
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(encode_header(boot_id, rec, nslots, size))
        for seq in range(1, nslots + 1):
            f.write(encode_record(boot_id, seq, rec, nslots))
        f.flush()
        os.fsync(f.fileno())
    return path


async def _open_target(drv: Any, path: Path, node: str, size: int) -> None:
    """Create *path* sparse and open it as raw node *node*, as ``storage_migrate`` opens a file target."""
    with open(path, "xb") as f:
        f.truncate(size)
    await drv.blockdev_add({"driver": "file", "node-name": f"{node}-file", "filename": str(path),
                            "discard": "unmap"})
    await drv.blockdev_add({"driver": "raw", "node-name": node, "file": f"{node}-file", "discard": "unmap",
                            "detect-zeroes": "unmap"})


async def _mirror(drv: Any, job: str, source: str, target: str, mode: str,
                  stall: Callable[[int, int], bool] | None = None) -> tuple[str, int]:
    """Run one ``blockdev-mirror`` (sync full, *mode*, capped at OUTRUN_SPEED) until it is READY, or,
    with *stall*, until ``stall(offset, len)`` says it does not converge (then it is force-cancelled).
    Returns (``ready`` or ``cancelled``, bytes the job copied). Raises BenchError if the job fails."""
    from qmp_driver import DriverTimeout, match

    ended = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
    with drv.expect(match(("BLOCK_JOB_READY", *ended, "BLOCK_JOB_ERROR"), device=job)) as sub:
        await drv.blockdev_mirror(job, source, target, sync="full", copy_mode=mode, speed=OUTRUN_SPEED,
                                  auto_finalize=True, auto_dismiss=True)
        while True:
            try:
                ev = await sub.wait(0.5)
            except DriverTimeout:
                ev = None
            if ev is not None and ev.name == "BLOCK_JOB_READY":
                return "ready", int(ev.data.get("offset", 0))
            if ev is not None and ev.name in ended:
                raise BenchError(f"mirror {job} ended before READY: {ev.name} {ev.data}")
            if stall is None:
                continue
            for j in await drv.query_block_jobs():
                if j.device == job and not j.ready and stall(j.offset, j.length):
                    await drv.block_job_cancel(job, force=True)
                    while True:
                        ev = await sub.wait(30)
                        if ev.name in ended:
                            return "cancelled", int(ev.data.get("offset", 0))


async def _pivot(drv: Any, job: str) -> None:
    from qmp_driver import match

    with drv.expect(match(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), device=job)) as sub:
        await drv.job_complete(job)
        ev = await sub.wait(60)
    if ev.name != "BLOCK_JOB_COMPLETED" or ev.data.get("error"):
        raise BenchError(f"the pivot of {job} failed: {ev.name} {ev.data}")


async def _converge_qmp(drv: Any, option: str, target: Path, run: ConvergeRun) -> tuple[float, float | None]:
    """Options ``write-blocking`` and ``restart``, driven over QMP here. Returns (copy start, step time)."""
    from dataplane.migration.slm import CopyMonitor

    node = "bench-tgt"
    await _open_target(drv, target, node, OUTRUN_DISK)
    t0 = time.monotonic()
    step: float | None = None
    if option == "write-blocking":
        _, copied = await _mirror(drv, "bench-wb", "jrnl", node, "write-blocking")
        run.copied, run.jobs, job = copied, 1, "bench-wb"
    else:
        monitor = CopyMonitor(STALL_WINDOW, STALL_MIN_SHRINK, time.monotonic())

        def stalled(offset: int, length: int) -> bool:
            return monitor.stalled(time.monotonic(), length - offset)

        how, first = await _mirror(drv, "bench-bg", "jrnl", node, "background", stalled)
        run.copied, run.jobs, job = first, 1, "bench-bg"
        if how == "cancelled":
            step = time.monotonic()
            run.decisions.append(f"stall after {step - t0:.1f} s: background job cancelled at "
                                 f"{first / MiB:.0f} MiB copied, restarted in write-blocking")
            _, second = await _mirror(drv, "bench-wb", "jrnl", node, "write-blocking")
            run.copied, run.jobs, job = first + second, 2, "bench-wb"
    await _pivot(drv, job)
    return t0, step


async def _converge_policy(drv: Any, target: Path, run: ConvergeRun, *, restart: bool
                           ) -> tuple[float, float | None]:
    """Options ``policy`` (``restart``: storage_migrate's default) and ``throttle`` (never start over):
    ``storage_migrate`` itself. Returns (copy start, time of its first step)."""
    from dataplane.migration.slm import DiskMove, SlmOptions, storage_migrate
    from dataplane.storage.targets import parse_target

    steps: list[float] = []
    ends: list[int] = []
    drv.on_event(lambda ev: ends.append(int(ev.data.get("offset", 0)))
                 if ev.name == "BLOCK_JOB_COMPLETED" else None)

    def on_event(e: dict[str, Any]) -> None:
        if e.get("event") == "decision":
            steps.append(time.monotonic())
            at = float(e.get("elapsed") or 0)
            run.decisions.append(f"{e.get('action')} at {at:.1f} s: {e.get('reason')}")

    opts = SlmOptions(bandwidth=OUTRUN_SPEED, stall_window=STALL_WINDOW, stall_min_shrink=STALL_MIN_SHRINK,
                      timeout=CONVERGE_TIMEOUT)
    if not restart:
        opts = dataclasses.replace(opts, restart_max_s=0)
    t0 = time.monotonic()
    report = await storage_migrate(drv, [DiskMove("jrnl", parse_target(str(target), "raw"))], opts,
                                   on_event=on_event)
    if report.outcome != "completed":
        raise BenchError(f"storage_migrate: {report.as_dict()}")
    again = sum(d.copied_again for d in report.disks)  # what a job that started over had copied
    run.copied = (ends[-1] if ends else report.copied - again) + again
    run.jobs = 2 if again else 1
    return t0, steps[0] if steps else None


def converge_run(option: str, workdir: Path, art: Any, qemu: str | None) -> ConvergeRun:
    """Part 2, one option (see the module). *qemu* is the emulator (the 7.2 floor). Raises BenchError
    when the copy does not complete or the journal does not verify on the new disk."""
    from qmp_driver import QemuDriver

    if option not in OPTIONS:
        raise ValueError(f"unknown option {option!r}: one of {OPTIONS}")
    rundir = workdir / f"converge-{option}"
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    disk = prefill_journal(rundir / "jrnl.raw", OUTRUN_DISK, OUTRUN_REC)
    target = rundir / "new-jrnl.raw"
    run = ConvergeRun(option)
    cmdline = {"hb_ms": 100, "dirty_mib": 0, "disk": "/dev/vda", "disk_rate": UNPACED, "disk_rec": OUTRUN_REC}
    os.sync()
    vm = QemuVM(_guest_spec([Disk(disk, "raw", node_name="jrnl")], cmdline, art, f"converge-{option}"),
                rundir / "vm", qemu=qemu)
    vm.start()
    try:
        run.qemu = vm.qemu_version()
        vm.wait_acks(10, 60)
        with AckSampler(vm) as acks:
            t_before = time.monotonic()
            time.sleep(WINDOW_S)

            async def go() -> tuple[float, float | None, float]:
                async with await QemuDriver.connect_socket(str(vm.qmp_path)) as drv:
                    if option in ("throttle", "policy"):
                        t0, step = await _converge_policy(drv, target, run, restart=option == "policy")
                    else:
                        t0, step = await _converge_qmp(drv, option, target, run)
                    return t0, step, time.monotonic()

            try:
                t0, step, t1 = run_async(go, CONVERGE_TIMEOUT + 30)
            except BenchError:
                raise
            except Exception as exc:
                raise BenchError(f"{option}: {type(exc).__name__}: {exc}") from exc
            _wait_sampled(acks, t1)
        run.total_s = t1 - t0
        run.rate_before = acks.rate(t_before, t0)
        run.rate_during = acks.rate(t0, t1)
        if step is not None:
            run.step_s = step - t0
            run.rate_step = acks.rate(step, t1)
        files = {n["node-name"]: n.get("file") for n in vm.qmp("query-named-block-nodes")}
        dev = [b for b in vm.qmp("query-block") if b.get("inserted")][0]["inserted"]
        if dev.get("file") != str(target):
            raise BenchError(f"{option}: the guest's disk is {dev.get('file')}, not {target} ({files})")
        n = vm.serial().max_ack
        vm.wait_acks(n + 5, 60)
    finally:
        vm.stop()
    acked = vm.serial().max_ack
    jr = verify_journal(str(target), "raw", acked_upto=acked)
    run.verified.append(f"journal verifies on the new disk ({jr.records} records up to #{jr.last_seq}, "
                        f"acknowledged #{acked}, {jr.stale_records} stale)")
    shutil.rmtree(rundir, ignore_errors=True)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    from dataplane.testing.guest import build
    from dataplane.testing.vm import floor_qemu_binary

    parser = argparse.ArgumentParser(prog="python -m benches.slm_harness", description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("slm", "converge", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the SLM part")
    parser.add_argument("--options", default=",".join(OPTIONS),
                        help="comma-separated, of " + ", ".join(OPTIONS))
    parser.add_argument("--workdir", default="/tmp/dp-slm-bench")
    parser.add_argument("--target-dir", default=None,
                        help="where the SLM's new disks go (default: beside the old ones, in --workdir)")
    parser.add_argument("--bandwidth", type=int, default=0, metavar="MIB_S",
                        help="cap each disk's copy at this many MiB/s in the SLM part (default 0: no cap); "
                             "shows what the guest's write rate gains for the copy's speed")
    args = parser.parse_args(argv)
    art = build()
    work = Path(args.workdir)
    if args.part in ("slm", "both"):
        for i in range(args.rounds):
            r = slm_round(work / f"slm{i}", art, log=print,
                          target_dir=Path(args.target_dir) if args.target_dir else None,
                          bandwidth=args.bandwidth * MiB)
            print(f"round {i + 1} (QEMU {r.qemu}): {r.line()}")
            for v in r.verified:
                print(f"  verified: {v}")
    if args.part in ("converge", "both"):
        floor = floor_qemu_binary()
        if floor is None:
            print("the QEMU 7.2 floor is not unpacked: run scripts/qemu-floor.sh", file=sys.stderr)
            return 1
        for opt in [o for o in args.options.split(",") if o]:
            c = converge_run(opt, work, art, floor)
            print(f"QEMU {c.qemu}, {c.line()}")
            for d in c.decisions:
                print(f"  decision: {d}")
            for v in c.verified:
                print(f"  verified: {v}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
