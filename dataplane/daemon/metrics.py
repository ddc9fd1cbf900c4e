"""The daemon's Prometheus metrics (prefix ``dataplane_``), in a registry of its own.

Fed from the jobs' events and reports (:meth:`Metrics.on_event`, :meth:`Metrics.on_end`), so a
series always matches what the report of the same migration says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The series; ``render()`` gives the text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.migrations = Counter("dataplane_migrations", "Migrations that ended, by kind and outcome",
                                  ["kind", "outcome"], registry=r)
        self.active = Gauge("dataplane_migrations_active", "Migrations by kind and state (queued, running)",
                            ["kind", "state"], registry=r)
        self.phases = Counter("dataplane_migration_phases", "Phases entered, by kind and phase",
                              ["kind", "phase"], registry=r)
        self.decisions = Counter("dataplane_policy_decisions", "Convergence policy steps, by kind and action",
                                 ["kind", "action"], registry=r)
        self.disk_bytes = Counter("dataplane_disk_copied_bytes", "Disk bytes copied, by kind",
                                  ["kind"], registry=r)
        self.duration = Histogram("dataplane_migration_duration_seconds",
                                  "Total time of the migrations that ended, by kind", ["kind"],
                                  buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.rollbacks = Counter("dataplane_rollbacks", "Migrations rolled back, by kind", ["kind"],
                                 registry=r)

    def declare(self, kind: str, actions: tuple[str, ...] = ()) -> None:
        """Make the series of ``kind`` (and of its policy ``actions``) exist at zero before the
        first migration, so that dashboards and alerts see them."""
        self.rollbacks.labels(kind)
        self.disk_bytes.labels(kind)
        self.set_active(kind, 0, 0)
        for action in actions:
            self.decisions.labels(kind, action)

    def set_active(self, kind: str, queued: int, running: int) -> None:
        self.active.labels(kind, "queued").set(queued)
        self.active.labels(kind, "running").set(running)

    def on_event(self, kind: str, event: Mapping[str, Any]) -> None:
        what = event.get("event")
        if what == "phase" and isinstance(event.get("phase"), str):
            self.phases.labels(kind, event["phase"]).inc()
        elif what == "decision" and isinstance(event.get("action"), str):
            self.decisions.labels(kind, event["action"]).inc()

    def on_end(self, kind: str, outcome: str, report: Mapping[str, Any] | None) -> None:
        self.migrations.labels(kind, outcome).inc()
        if outcome in ("rolled-back", "partial"):
            self.rollbacks.labels(kind).inc()
        if report:
            copied = report.get("bytes_copied")
            if isinstance(copied, int) and copied > 0:
                self.disk_bytes.labels(kind).inc(copied)
            total = report.get("total_time")
            if isinstance(total, int | float) and total >= 0:
                self.duration.labels(kind).observe(float(total))

    def render(self) -> bytes:
        return generate_latest(self.registry)
