"""The RAM corruption study (``benches/test_bench_ram.py``): does every page of RAM arrive?

Many migrations of a small guest, on each QEMU the project supports and along two paths, each run
verified by the guest itself: its RAM checker walks every page it dirties (index, generation and a
keyed checksum per page) and the host watches the destination's console for a bad page or a kernel
BUG / Oops / panic for :data:`WATCH_S` seconds after the checker's passes (see
``docs/test-guest.md``).

* platforms: ``primary`` (the installed QEMU, 10 on the project's machines) and ``floor`` (QEMU 7.2,
  unpacked by ``scripts/qemu-floor.sh``);
* paths: ``ours`` (``dataplane migrate`` / ``dataplane receive``) and ``direct`` (QEMU driven the
  libvirt way, plain TCP between the two QEMUs: no code of ours on the data path);
* workloads: text-like and random memory pages, alternating run by run, over a 1 Gbit/s link.

A run counts as *corrupt* when the migrated guest found a bad page, its kernel faulted, or its QEMU
died after the switchover; a run that fails for another reason is counted apart (*failed*), never
retried. ``python -m benches.ram_study [--runs N] [--platforms primary,floor] [--paths ours,direct]``
runs it outside pytest (root, QEMU and the test guest needed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dataplane.testing.cclm import Clusters, DiskLayout, GuestRecipe, MigrationRun, Scenario
from dataplane.testing.vm import QEMU_ENV, binary_version, floor_qemu_binary, qemu_binary

MiB = 1 << 20
LINK_RATE = "1gbit"
#: Seconds the destination is watched after its checker's two passes (the kernel faults the issue
#: reported came "a few seconds after resuming").
WATCH_S = 5.0
PLATFORMS = ("primary", "floor")
PATHS = ("ours", "direct")


def recipe(pattern: str) -> GuestRecipe:
    """The study's small guest: 128 MiB of RAM, 32 MiB of it rewritten at 16 MiB/s, a 64 MiB disk."""
    return GuestRecipe(memory_mib=128, dirty_mib=32, dirty_rate=16, pattern=pattern, journal_mib=16,
                       journal_rate=10, disk=DiskLayout(size=64 * MiB, text=8 * MiB, random=4 * MiB,
                                                        zero=4 * MiB))


@dataclass
class Tally:
    """What N migrations of one platform and path gave."""

    platform: str
    qemu: str
    path: str
    runs: int = 0
    corrupt: list[str] = field(default_factory=list)  # what each corrupt run's guest said
    failed: list[str] = field(default_factory=list)  # runs that failed for another reason
    pass_ms: list[int] = field(default_factory=list)  # the checker's last full pass, per verified run

    def line(self) -> str:
        """One line for the terminal."""
        ms = f", checker pass median {statistics.median(self.pass_ms):.0f} ms" if self.pass_ms else ""
        return (f"QEMU {self.qemu} ({self.platform}), {self.path}: {len(self.corrupt)} of {self.runs} runs "
                f"corrupt, {len(self.failed)} failed otherwise{ms}")


def platform_binary(platform: str) -> str | None:
    """The QEMU binary of *platform* (``primary`` or ``floor``), None if it is not here."""
    return floor_qemu_binary() if platform == "floor" else qemu_binary()


@contextlib.contextmanager
def _using(binary: str) -> Iterator[None]:
    old = os.environ.get(QEMU_ENV)
    os.environ[QEMU_ENV] = binary
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(QEMU_ENV, None)
        else:
            os.environ[QEMU_ENV] = old


def classify(tally: Tally, run: MigrationRun) -> None:
    """Count *run* into *tally*."""
    tally.runs += 1
    if run.guest_fault is not None:
        tally.corrupt.append(run.guest_fault.splitlines()[0] if run.guest_fault else "?")
    elif not run.ok:
        tally.failed.append((run.error or "?").splitlines()[0])
    elif run.ram_check_ms is not None:
        tally.pass_ms.append(run.ram_check_ms)


def study(clusters: Clusters, runs: int, platforms: Sequence[str] = PLATFORMS,
          paths: Sequence[str] = PATHS) -> list[Tally]:
    """Migrate *runs* times per platform and path (workloads alternate text / random); return the tallies.

    Raises ValueError for an unknown platform or path, FileNotFoundError if a platform's QEMU is
    missing.
    """
    out: list[Tally] = []
    for platform in platforms:
        if platform not in PLATFORMS:
            raise ValueError(f"unknown platform {platform!r}: one of {PLATFORMS}")
        binary = platform_binary(platform)
        if binary is None:
            raise FileNotFoundError(f"no QEMU for the {platform} platform (scripts/setup.sh installs both)")
        qemu = binary_version(binary)
        tallies = {p: Tally(platform, qemu, p) for p in paths}
        with _using(binary):
            scenarios = {pat: Scenario(clusters, recipe(pat), clusters.workdir / f"ram-{platform}-{pat}",
                                       watch_s=WATCH_S) for pat in ("text", "random")}
            try:
                for i in range(runs):
                    sc = scenarios["text" if i % 2 == 0 else "random"]
                    order = list(paths) if i % 2 == 0 else list(reversed(paths))
                    for p in order:
                        classify(tallies[p], sc.run(p, timeout=120))
            finally:
                for sc in scenarios.values():
                    sc.close()
        out += tallies.values()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.ram_study", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="migrations per platform and path (default 20)")
    parser.add_argument("--platforms", default=",".join(PLATFORMS), help="comma-separated: primary,floor")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated: ours,direct")
    args = parser.parse_args(argv)
    with Clusters(LINK_RATE) as clusters:
        tallies = study(clusters, args.runs, [p for p in args.platforms.split(",") if p],
                        [p for p in args.paths.split(",") if p])
    for t in tallies:
        print(t.line())
        for what in t.corrupt:
            print(f"    corrupt: {what}")
        for what in t.failed:
            print(f"    failed: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
