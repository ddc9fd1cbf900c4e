"""What a migration tells its caller: progress samples while it runs and the report at its end.

Kept apart from the orchestration so that :mod:`.errors` (a rollback carries its report) and
callers can use them without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import Decision

__all__ = ["PHASES", "MigrationProgress", "MigrationReport"]

#: Phases, in order. A rolled-back report names the phase that was reached.
PHASES = ("preparing", "mirror", "mirror-ready", "precopy", "switchover", "completed")


@dataclass(frozen=True)
class MigrationProgress:
    """One progress sample. Bytes and bytes/s; ``elapsed`` in seconds since the start."""

    phase: str
    elapsed: float
    disk_done: int = 0  # mirror offsets, summed over the disks
    disk_total: int = 0  # mirror lengths (grows while the guest dirties mirrored areas)
    disk_rate: float = 0.0
    ram_done: int = 0  # RAM bytes transferred
    ram_total: int = 0
    ram_remaining: int = 0
    ram_rate: float = 0.0
    dirty_rate: float = 0.0  # bytes/s the guest dirties (QEMU's estimate)
    cpu_throttle: int = 0  # auto-converge's vCPU throttle, percent


@dataclass(frozen=True)
class MigrationReport:
    """How a migration ended.

    ``outcome`` is ``completed`` (the destination is authoritative),
    ``rolled-back`` (the source runs on its original disks) or
    ``failed-after-switchover`` (postcopy had started: the destination is
    authoritative, but the migration did not finish); ``phase`` is the
    last phase reached (see :data:`PHASES`); ``total_time`` in seconds;
    ``downtime_ms`` as QEMU reports it (None unless completed);
    ``ram_transferred`` and ``disk_bytes`` in bytes; ``error`` the reason of a
    rollback, plus any clean-up step that failed (those alone in ``rollback_errors``).
    """

    outcome: str
    phase: str
    total_time: float
    downtime_ms: int | None
    ram_transferred: int
    disk_bytes: int
    error: str | None = None
    postcopy: bool = False  # the switchover happened in postcopy mode
    decisions: tuple[Decision, ...] = ()
    rollback_errors: tuple[str, ...] = ()  # rollback steps that failed (also named in ``error``)

    def summary(self) -> str:
        """One line for a log: the outcome, the phase it reached, time, downtime, bytes, the cause."""
        down = f", downtime {self.downtime_ms} ms" if self.downtime_ms is not None else ""
        line = (f"migration {self.outcome} in {self.total_time:.1f} s (phase {self.phase}{down}, "
                f"RAM {self.ram_transferred / (1 << 20):.0f} MiB, disks {self.disk_bytes / (1 << 20):.0f} MiB"
                + (", postcopy" if self.postcopy else "") + ")")
        return f"{line}: {self.error}" if self.error else line

    @property
    def switched_over(self) -> bool:
        """True when the destination is authoritative (the source must not be resumed)."""
        return self.outcome != "rolled-back"
