"""What the two roles of a cross-cluster migration share: their reports, their events, and how
they read a QEMU's state.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qmp_driver import DriverError, QemuDriver

from .control import CONTROL_STREAM, MIGRATION_STREAM, NBD_STREAM
from .report import MigrationProgress, MigrationReport

log = logging.getLogger(__name__)

__all__ = ["CclmReport", "ChannelFigures", "EventCallback", "TargetReport", "emit", "make_workdir",
           "progress_event", "qemu_state"]

EventCallback = Callable[[dict[str, Any]], object]

@dataclass(frozen=True)
class ChannelFigures:
    """What the channel carried for one migration (sending side's view, bytes)."""

    ram_raw: int = 0
    ram_wire: int = 0
    disk_raw: int = 0
    disk_wire: int = 0
    control_raw: int = 0  # the control stream's messages (not counted in raw / wire)
    control_wire: int = 0
    zero_pages: int = 0
    reconnects: int = 0
    replayed_bytes: int = 0
    rtt_ms: float | None = None

    @property
    def raw(self) -> int:
        return self.ram_raw + self.disk_raw

    @property
    def wire(self) -> int:
        return self.ram_wire + self.disk_wire

    @property
    def compression_ratio(self) -> float:
        return self.raw / self.wire if self.wire else 1.0

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> ChannelFigures:
        """Sum the per-stream counters of the (one) session in a channel endpoint's ``stats()``
        (see docs/channel.md); zeros when it has none."""
        sessions = stats.get("sessions") or []
        session = sessions[0] if sessions else None
        if not session:
            return cls()
        sums = {"ram_raw": 0, "ram_wire": 0, "disk_raw": 0, "disk_wire": 0, "control_raw": 0,
                "control_wire": 0, "zero_pages": 0}
        for st in session.get("streams", []):
            name = str(st.get("name"))
            kind = {MIGRATION_STREAM: "ram", NBD_STREAM: "disk"}.get(name)
            if name == CONTROL_STREAM or name.startswith(f"{CONTROL_STREAM}@"):
                kind = "control"
            if kind is None:
                continue
            sums[f"{kind}_raw"] += int(st.get("bytes_sent", 0)) + int(st.get("bytes_received", 0))
            sums[f"{kind}_wire"] += int(st.get("wire_bytes_sent", 0)) + int(st.get("wire_bytes_received", 0))
            sums["zero_pages"] += int(st.get("zero_pages", 0))
        rtt = session.get("rtt")
        return cls(**sums, reconnects=int(session.get("reconnects", 0)),
                   replayed_bytes=int(session.get("replayed_bytes", 0)),
                   rtt_ms=float(rtt) * 1000 if rtt is not None else None)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(raw_bytes=self.raw, wire_bytes=self.wire, compression_ratio=round(self.compression_ratio, 3))
        return d


@dataclass(frozen=True)
class CclmReport:
    """The source's final word: the migration report plus the channel's figures and the destination's."""

    migration: MigrationReport
    channel: ChannelFigures = field(default_factory=ChannelFigures)
    destination: str | None = None  # "running" / "paused" once the destination confirmed; None otherwise
    source_state: dict[str, str] | None = None  # in doubt: the source QEMU's run state and migration status

    @property
    def outcome(self) -> str:
        return self.migration.outcome

    def as_dict(self) -> dict[str, Any]:
        """The ``report`` event (JSON-compatible)."""
        m = self.migration
        out: dict[str, Any] = {
            "event": "report", "outcome": m.outcome, "phase": m.phase,
            "switched_over": m.switched_over, "postcopy": m.postcopy,
            "total_time": round(m.total_time, 3), "downtime_ms": m.downtime_ms,
            "ram_bytes": m.ram_transferred, "disk_bytes": m.disk_bytes,
            "destination": self.destination, "error": m.error, "source_state": self.source_state,
            "decisions": [d.as_dict() for d in m.decisions],
        }
        out.update(self.channel.as_dict())
        return out


def progress_event(p: MigrationProgress) -> dict[str, Any]:
    """A progress sample as a ``progress`` event."""
    d = asdict(p)
    d["event"] = "progress"
    d["elapsed"] = round(p.elapsed, 3)
    return d


def emit(on_event: EventCallback | None, event: dict[str, Any]) -> None:
    if on_event is None:
        return
    try:
        on_event(event)
    except Exception:  # an observer must not break a migration
        log.exception("event callback failed")


def make_workdir(parent: str | Path | None, prefix: str) -> Path:
    """A private directory for a role's unix sockets (paths must stay short: directly under /tmp or
    the given parent)."""
    # unix socket paths must stay short: a directory directly under /tmp (or the given parent)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


@dataclass(frozen=True)
class TargetReport:
    """The destination's final word."""

    #: ``completed`` (the guest runs here), ``rolled-back`` (it never ran here and never will: the
    #: source keeps or takes it back), ``in-doubt`` (it is here, paused, and the source went away
    #: without a commit or an abort: see ``dataplane resolve``); before a migration started:
    #: ``refused`` (the plan, nothing changed) or ``aborted`` (interrupted before a plan came)
    outcome: str
    status: str | None  # the guest here: "running" / "paused" / QEMU's run state / None
    total_time: float
    error: str | None = None
    postcopy: bool = False
    channel: ChannelFigures = field(default_factory=ChannelFigures)
    state: dict[str, str] | None = None  # in doubt: this QEMU's run state and migration status
    #: per destination node: "kept" (the source's holes stay unallocated) or "as configured: <why>"
    #: (left as it was opened: holes stay holes only if that was with discard=unmap)
    holes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "report", "outcome": self.outcome, "status": self.status,
                               "total_time": round(self.total_time, 3), "error": self.error,
                               "postcopy": self.postcopy, "destination_state": self.state,
                               "holes": dict(self.holes)}
        out.update(self.channel.as_dict())
        return out


async def qemu_state(drv: QemuDriver) -> dict[str, str]:
    """The run state and migration status of a QEMU, as far as it answers."""
    state = {"status": "unreachable", "migration": "unknown"}
    with contextlib.suppress(DriverError):
        state["status"] = (await drv.query_status()).status
        state["migration"] = (await drv.query_migrate()).status or "none"
    return state
