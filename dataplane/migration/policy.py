"""The convergence policy of RAM precopy: when to throttle, when to switch to postcopy, when to give up.

Sans-IO: :class:`ConvergenceMonitor` is fed one sample of ``query-migrate``
at a time (with the time it was taken) and answers with the
:class:`Decision` objects the orchestration must act on and report. Every
decision carries a human-readable reason; the orchestration logs it and
puts it in the event stream.

The automatic policy (every knob is a field of
:class:`~dataplane.migration.plan.MigrationOptions`):

* **downtime limit** — QEMU's ``downtime-limit``; QEMU switches over by
  itself once the remaining RAM can be sent within it.
* **auto-converge** — on by default (``auto``): QEMU then throttles the
  guest's vCPUs only when dirtying outruns the link. The monitor reports
  when throttling starts and when it rises, and on a stall raises the
  throttle increment.
* **stall detection** — precopy works in passes over RAM, each ending at
  a dirty-bitmap sync (QEMU's ``dirty-sync-count``); what a pass must send
  is what the guest dirtied during the previous one, the peak of the
  ``remaining`` sawtooth within the pass. After the first (bulk) pass, and
  once ``stall_window`` seconds have been observed, precopy is *stalled*
  when the latest completed pass's peak is not at least
  ``stall_min_shrink`` below the best earlier one: the remaining bytes do
  not shrink, and precopy cannot converge on its own.
* **postcopy** — with ``postcopy=auto`` (and no multifd: QEMU 7.2 cannot
  combine them) a stall switches to postcopy: the guest runs on the
  destination at once and the rest of RAM follows on demand.
* **completion timeout** — ``timeout_base + timeout_per_gib`` per GiB of
  RAM and disks; past it the migration fails and is rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 1 << 30

#: Decision kinds, in the order the orchestration acts on them.
SWITCH_POSTCOPY = "switch-postcopy"
RAISE_THROTTLE = "raise-throttle"
FAIL = "fail"
NOTE = "note"  # informational: nothing to do


@dataclass(frozen=True)
class Decision:
    """What the policy decided and why. ``params`` holds migration parameters to set (``raise-throttle``)."""

    action: str
    reason: str
    elapsed: float
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-compatible form (the ``decision`` event)."""
        out: dict[str, Any] = {"action": self.action, "reason": self.reason,
                               "elapsed": round(self.elapsed, 3)}
        if self.params:
            out["params"] = dict(self.params)
        return out


@dataclass(frozen=True)
class PolicySettings:
    """The knobs the monitor needs (taken from the migration options)."""

    auto_converge: bool
    postcopy: bool  # postcopy-ram was enabled: a switch is possible
    stall_window: float
    stall_min_shrink: float
    completion_timeout: float
    throttle_increment_on_stall: int = 20


def completion_timeout(base: float, per_gib: float, total_bytes: int) -> float:
    """``base + per_gib`` seconds for every GiB (or part of one) of ``total_bytes``."""
    return base + per_gib * max(1.0, total_bytes / GiB)


class ConvergenceMonitor:
    """Watches precopy samples and decides. Time comes from the caller (seconds, monotonic)."""

    def __init__(self, settings: PolicySettings, start: float) -> None:
        self.s = settings
        self.start = start
        self.pass_no = 0  # QEMU's dirty-sync-count: pass N runs between sync N and N+1
        self.pass_peak = 0
        self.peaks: list[tuple[float, int]] = []  # (end time, peak remaining) of passes after the bulk
        self.bulk_done_at: float | None = None
        self.throttle = 0
        self.stalled_since: float | None = None
        self.postcopy_requested = False
        self.raised_throttle = False
        self.failed = False

    def observe(self, now: float, remaining: int, dirty_sync_count: int, throttle_pct: int,
                dirty_rate: float = 0.0, send_rate: float = 0.0) -> list[Decision]:
        """One ``query-migrate`` sample of an active precopy; return the decisions it triggers."""
        out: list[Decision] = []
        elapsed = now - self.start
        if self.failed:
            return out
        if elapsed > self.s.completion_timeout:
            self.failed = True
            left = remaining / 2**20
            why = (f"precopy did not complete within the completion timeout of "
                   f"{self.s.completion_timeout:.0f} s ({left:.1f} MiB of RAM still to send)")
            out.append(Decision(FAIL, why, elapsed))
            return out
        if throttle_pct > self.throttle:
            first = self.throttle == 0
            self.throttle = throttle_pct
            what = "started" if first else "raised"
            out.append(Decision(NOTE, f"auto-converge {what}: guest vCPUs throttled to {throttle_pct} % "
                                      f"because dirtying outruns the link", elapsed))
        # A pass over RAM ends at each dirty-bitmap sync; what a pass must send is what was dirtied
        # during the previous one, so the peak of `remaining` within a pass is the working set.
        if dirty_sync_count != self.pass_no:
            if self.pass_no >= 2 and self.pass_peak:  # pass 1 is the bulk copy of all RAM
                self.peaks.append((now, self.pass_peak))
            if dirty_sync_count >= 2 and self.bulk_done_at is None:
                self.bulk_done_at = now
            self.pass_no, self.pass_peak = dirty_sync_count, 0
        self.pass_peak = max(self.pass_peak, remaining)
        if self.bulk_done_at is None or self.postcopy_requested or len(self.peaks) < 2:
            return out
        if now - self.bulk_done_at < self.s.stall_window:
            return out  # not a full window of observation yet
        latest = self.peaks[-1][1]
        best_before = min(p for _, p in self.peaks[:-1])
        shrink = (best_before - latest) / best_before if best_before else 1.0
        if shrink >= self.s.stall_min_shrink or remaining == 0:
            self.stalled_since = None
            return out
        if self.stalled_since is None:
            self.stalled_since = now
        why = (f"precopy stalled: {len(self.peaks) + 1} passes over RAM in "
               f"{now - self.start:.0f} s, and the last one still had {latest / 2**20:.1f} MiB to send "
               f"(best earlier pass {best_before / 2**20:.1f} MiB; need {self.s.stall_min_shrink * 100:g} % "
               f"less); dirtying {dirty_rate / 2**20:.1f} MiB/s, sending {send_rate / 2**20:.1f} MiB/s")
        if self.s.postcopy:
            self.postcopy_requested = True
            out.append(Decision(SWITCH_POSTCOPY, why + "; switching to postcopy", elapsed))
        elif self.s.auto_converge and not self.raised_throttle:
            self.raised_throttle = True
            inc = self.s.throttle_increment_on_stall
            out.append(Decision(RAISE_THROTTLE, why + f"; raising the auto-converge increment to {inc} %",
                                elapsed, {"cpu-throttle-increment": inc}))
        elif now - self.stalled_since >= self.s.stall_window and len(out) == 0:
            self.stalled_since = now  # report again after another window, not on every sample
            left = self.s.completion_timeout - elapsed
            out.append(Decision(NOTE, why + f"; no way to converge is allowed, failing in {left:.0f} s "
                                            f"unless it recovers", elapsed))
        return out
