"""Harness of the cross-cluster live migration benchmark (``benches/test_bench_cclm.py``).

The scenario itself (two namespaces joined by a shaped veth, certificates
from two CAs, the guest, the three migration paths and their measurements)
is :mod:`dataplane.testing.cclm`; this module adds what a benchmark needs on
top of it:

* :data:`TEXT_RECIPE` / :data:`RANDOM_RECIPE`: the guest of the issue (512 MiB
  of RAM, a 1 GiB disk holding ~300 MiB of data, 20 MiB/s of memory dirtying)
  with text-like or random memory and disk data;
* :func:`compare`: runs several paths in interleaved rounds on one scenario
  (the order alternates from round to round) and insists that every
  migration succeeded and was verified (:class:`BenchError` otherwise, with
  the reason and the log tails);
* :func:`best` and :func:`describe`: the figures that go into RATIO lines and
  onto the terminal.

``python -m benches.cclm_harness [--paths direct,kubevirt-like,ours]
[--pattern text|random] [--rounds N] [--rate 1gbit]`` runs a comparison
outside pytest and prints the figures (root, QEMU and the test guest needed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from dataplane.testing.cclm import (
    PATHS,
    Clusters,
    DiskLayout,
    GuestRecipe,
    MigrationRun,
    Scenario,
    cli_has,
    stunnel_binary,
)

MiB = 1 << 20
GiB = 1 << 30
LINK_RATE = "1gbit"

#: The issue's guest: 512 MiB RAM, 128 MiB of it rewritten at 20 MiB/s with text-like pages; a 1 GiB data
#: disk holding 150 MiB of text, 90 MiB of random data and 60 MiB of written zeros; a 16 MiB journal disk.
#: Its RAM checker walks the 128 MiB at 32 MiB/s (a pass in 4 s, a few percent of the vCPU): at the
#: agent's default pace (128 MiB/s) the TCG vCPU took enough of the 2 host cores to slow the
#: CPU-bound path (ours) by about 0.3 s and not the link-bound references. Every page is still
#: verified after each migration (three passes on the destination).
TEXT_RECIPE = GuestRecipe(memory_mib=512, dirty_mib=128, dirty_rate=20, pattern="text", check_rate=32,
                          disk=DiskLayout(size=1 * GiB, text=150 * MiB, random=90 * MiB, zero=60 * MiB))
#: The same guest with incompressible data: random memory pages and 300 MiB of random data on the disk.
RANDOM_RECIPE = GuestRecipe(memory_mib=512, dirty_mib=128, dirty_rate=20, pattern="random", check_rate=32,
                            disk=DiskLayout.random_only(size=1 * GiB, data=300 * MiB))


class BenchError(AssertionError):
    """A migration of the benchmark failed or could not be verified (the message says why)."""


def unavailable_reason(paths: Sequence[str]) -> str | None:
    """Why *paths* cannot be benchmarked here (stunnel or ``dataplane migrate`` missing), or None."""
    if "kubevirt-like" in paths and stunnel_binary() is None:
        return "stunnel is not installed (apt-get install stunnel4)"
    if "ours" in paths and not (cli_has("migrate") and cli_has("receive")):
        return "`dataplane migrate` / `dataplane receive` are not available"
    return None


def checked(run: MigrationRun) -> MigrationRun:
    """*run*, if the migration completed and was verified. Raises BenchError otherwise."""
    if not run.ok:
        raise BenchError(f"the {run.path} migration failed: {run.error}")
    if not run.verified:
        raise BenchError(f"the {run.path} migration was not verified")
    return run


def compare(scenario: Scenario, paths: Sequence[str], rounds: int = 1,
            extra_args: Sequence[str] = ()) -> dict[str, list[MigrationRun]]:
    """Migrate along each of *paths* once per round; odd rounds go in reverse order.

    Each migration boots a fresh VM pair from the same recipe, in :func:`run_dir`. ``extra_args``
    go to ``dataplane migrate``. Raises BenchError at the first migration that
    fails or cannot be verified; ScenarioError / VMError if a run cannot be
    set up.
    """
    for p in paths:
        if p not in PATHS:
            raise ValueError(f"unknown path {p!r}: one of {PATHS}")
    out: dict[str, list[MigrationRun]] = {p: [] for p in paths}
    for rnd in range(rounds):
        order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
        for p in order:
            out[p].append(checked(scenario.run(p, extra_args=extra_args if p == "ours" else (),
                                               rundir=run_dir(scenario.workdir, p, rnd))))
    return out


def run_dir(workdir: Path, path: str, rnd: int) -> Path:
    """The directory of :func:`compare`'s migration along *path* in round *rnd* (0-based) of a scenario
    whose work directory is *workdir*: its VMs' files and disks (``src-data.raw``, ``dst-data.raw``, ...)
    stay there after the run."""
    return workdir / f"round{rnd + 1}-{path}"


def best(runs: Sequence[MigrationRun], key: str) -> float:
    """The smallest value of *key* (``total_time``, ``downtime_ms`` or ``wire_bytes``) over *runs*.

    The machine's cores are shared with other work, which only ever slows a
    run down, so the best run is the fairest figure. Raises ValueError if no
    run has the value.
    """
    values = [float(getattr(r, key)) for r in runs if getattr(r, key) is not None]
    if not values:
        raise ValueError(f"no run has {key}")
    return min(values)


def describe(path: str, runs: Sequence[MigrationRun]) -> list[str]:
    """Lines for the terminal: every run's figures, the median, and what ours reported."""
    lines = []
    for i, r in enumerate(runs):
        rep = r.report
        extra = ""
        if path == "ours" and rep:
            extra = (f"; report: ram {rep.get('ram_bytes', 0) / MiB:.0f} MiB, disk "
                     f"{rep.get('disk_bytes', 0) / MiB:.0f} MiB, "
                     f"raw {rep.get('raw_bytes', 0) / MiB:.0f} MiB -> "
                     f"wire {rep.get('wire_bytes', 0) / MiB:.0f} MiB (x{rep.get('compression_ratio', 0)}), "
                     f"zero pages {rep.get('zero_pages', 0)}, decisions {len(rep.get('decisions') or [])}")
        elif rep:
            extra = (f"; QEMU: ram {rep.get('ram_transferred', 0) / MiB:.0f} MiB, "
                     f"mirror {rep.get('disk_bytes', 0) / MiB:.0f} MiB")
        lines.append(f"{path} #{i + 1}: {r.summary()}{extra}")
    if len(runs) > 1:
        lines.append(f"{path} median: total {statistics.median(r.total_time for r in runs):.2f} s, downtime "
                     f"{statistics.median(r.downtime_ms or 0 for r in runs):.0f} ms, wire "
                     f"{statistics.median(r.wire_bytes for r in runs) / MiB:.1f} MiB")
    if runs and runs[0].info:
        lines.append(f"{path}: {runs[0].info}")
    if runs and runs[0].verified:
        lines.append(f"{path} verified: {'; '.join(runs[0].verified)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.cclm_harness",
                                     description="run the CCLM comparison and print the figures")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated, of " + ", ".join(PATHS))
    parser.add_argument("--pattern", choices=("text", "random"), default="text")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rate", default=LINK_RATE, help="link rate (tc syntax, e.g. 1gbit, 100mbit)")
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    reason = unavailable_reason(paths)
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    recipe = TEXT_RECIPE if args.pattern == "text" else RANDOM_RECIPE
    with Clusters(args.rate) as clusters, Scenario(clusters, recipe) as sc:
        runs = compare(sc, paths, args.rounds)
    for p, rs in runs.items():
        for line in describe(p, rs):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
