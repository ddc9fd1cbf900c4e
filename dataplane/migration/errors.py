"""Exceptions of the migration orchestration.

::

    MigrationError          base class
     ├── PlanRefused        a plan cannot be carried out (checked before anything starts)
     └── RolledBack         a migration failed and was rolled back; ``report`` says how far it got
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .source import MigrationReport


class MigrationError(Exception):
    """Base class of every error raised by :mod:`dataplane.migration`."""


class PlanRefused(MigrationError):
    """A migration plan was refused before any state changed (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"migration plan refused: {reason}")


class RolledBack(MigrationError):
    """The migration failed before the switchover completed and was rolled back.

    The source VM runs on its original disks. ``report`` is the final
    :class:`~dataplane.migration.source.MigrationReport` (outcome ``rolled-back``).
    """

    def __init__(self, report: MigrationReport) -> None:
        self.report = report
        super().__init__(f"migration rolled back in phase {report.phase!r}: {report.error}")
