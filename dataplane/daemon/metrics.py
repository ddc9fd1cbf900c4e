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
#: The stream classes of a cross-cluster migration's channel (the reports' ``<class>_raw`` / ``_wire``).
STREAM_CLASSES = ("ram", "disk", "control")


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
        self.in_doubt = Counter("dataplane_in_doubt", "Migrations that ended in doubt, by kind", ["kind"],
                                registry=r)
        self.downtime = Histogram("dataplane_downtime_seconds",
                                  "The guest's pause at the switchover (the source QEMU's figure)",
                                  buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10), registry=r)
        self.stream_bytes = Counter("dataplane_stream_bytes",
                                    "Bytes a cross-cluster migration's channel carried, by stream class "
                                    "(ram, disk, control) and form (raw: what was written into the stream; "
                                    "wire: after compression and zero elision)", ["stream", "form"],
                                    registry=r)
        self.zero_pages = Counter("dataplane_zero_pages", "Zero pages elided on the channel", registry=r)
        self.reconnects = Counter("dataplane_reconnects", "Channel connections re-established", registry=r)
        self.replayed = Counter("dataplane_replayed_bytes", "Bytes sent again after a reconnect", registry=r)

    def declare(self, kind: str, actions: tuple[str, ...] = ()) -> None:
        """Make the series of ``kind`` (and of its policy ``actions``) exist at zero before the
        first migration, so that dashboards and alerts see them."""
        self.rollbacks.labels(kind)
        self.in_doubt.labels(kind)
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
            self._channel(report)
        if outcome == "in-doubt":
            self.in_doubt.labels(kind).inc()

    def declare_channel(self) -> None:
        """Make the channel's series exist at zero (a daemon that runs cross-cluster migrations)."""
        for stream in STREAM_CLASSES:
            for form in ("raw", "wire"):
                self.stream_bytes.labels(stream, form)

    def _channel(self, report: Mapping[str, Any]) -> None:
        """The figures of a cross-cluster migration's report (the source's, which has them)."""
        for stream in STREAM_CLASSES:
            for form in ("raw", "wire"):
                n = report.get(f"{stream}_{form}")
                if isinstance(n, int) and n > 0:
                    self.stream_bytes.labels(stream, form).inc(n)
        for key, counter in (("zero_pages", self.zero_pages), ("reconnects", self.reconnects),
                             ("replayed_bytes", self.replayed)):
            n = report.get(key)
            if isinstance(n, int) and n > 0:
                counter.inc(n)
        downtime = report.get("downtime_ms")
        if isinstance(downtime, int | float) and report.get("switched_over"):
            self.downtime.observe(float(downtime) / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
