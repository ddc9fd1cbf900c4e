"""Does every page of RAM arrive? The corruption study (:mod:`benches.ram_study`) in ``make bench``.

:data:`RUNS` migrations of a small guest per QEMU platform (the primary QEMU 10 and the QEMU 7.2
floor) and per path (ours; QEMU direct over TCP), text-like and random memory alternating, over a
1 Gbit/s link between the two namespaces. Each migration is verified by the guest's RAM checker and
the destination is watched for kernel faults. Nothing is retried.

* ``ram_corrupt_runs_product``: runs on the primary platform whose destination found a bad page or
  crashed, ours (goal 0)
* ``ram_corrupt_runs_qemu_direct``: the same for QEMU direct over TCP (reported: the goal ``>=0``
  only marks it as a figure without a target)
* ``ram_check_pass_s``: seconds for one full pass of the guest's checker over its 32 MiB area on
  the destination, the median of the verified runs (reported)

The floor's figures are printed beside them.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import pytest

from benches.ram_study import LINK_RATE, PLATFORMS, Tally, platform_binary, study
from benches.terminal import say

RUNS = 20
#: The study takes about 14 minutes; the suite's default per-test timeout (300 s) would cut it short.
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def tallies() -> Iterator[list[Tally]]:
    from dataplane.testing.cclm import Clusters
    from dataplane.testing.netns import netns_unavailable_reason

    reason = netns_unavailable_reason()
    missing = [p for p in PLATFORMS if platform_binary(p) is None]
    if reason is None and missing:
        reason = f"no QEMU for the {', '.join(missing)} platform(s): run scripts/setup.sh"
    if reason is not None:
        pytest.skip(reason)
    with Clusters(LINK_RATE) as clusters:
        yield study(clusters, RUNS)


def _get(tallies: list[Tally], platform: str, path: str) -> Tally:
    return next(t for t in tallies if t.platform == platform and t.path == path)


def test_ram_corrupt_runs_product(ratio, tallies: list[Tally], capsys: Any) -> None:
    lines = [t.line() for t in tallies]
    for t in tallies:
        lines += [f"    corrupt ({t.qemu}, {t.path}): {c}" for c in t.corrupt]
        lines += [f"    failed ({t.qemu}, {t.path}): {c}" for c in t.failed]
    say(capsys, f"RAM corruption study: {RUNS} migrations per QEMU and path, {LINK_RATE} link:", *lines)
    ours = _get(tallies, "primary", "ours")
    ratio("ram_corrupt_runs_product", len(ours.corrupt), "<=0",
          note=f"QEMU {ours.qemu}: {len(ours.corrupt)} of {ours.runs} runs; "
               f"{len(ours.failed)} failed otherwise")
    assert not ours.failed, f"migrations that failed without a guest fault: {ours.failed}"


def test_ram_corrupt_runs_qemu_direct(ratio, tallies: list[Tally]) -> None:
    direct = _get(tallies, "primary", "direct")
    floor = [t for t in tallies if t.platform == "floor"]
    ratio("ram_corrupt_runs_qemu_direct", len(direct.corrupt), ">=0",
          note=f"QEMU {direct.qemu}: {len(direct.corrupt)} of {direct.runs}; floor: "
               + ", ".join(f"{t.path} {len(t.corrupt)} of {t.runs}" for t in floor))


def test_ram_check_pass_s(ratio, tallies: list[Tally]) -> None:
    ms = [m for t in tallies if t.platform == "primary" for m in t.pass_ms]
    assert ms, "no verified run reported a checker pass"
    ratio("ram_check_pass_s", statistics.median(ms) / 1000, ">=0",
          note=f"32 MiB at 128 MiB/s; {min(ms)}-{max(ms)} ms over {len(ms)} runs")
