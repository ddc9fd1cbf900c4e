"""Exceptions of the migration orchestration.

::

    MigrationError          base class
     ├── PlanRefused        a plan cannot be carried out (checked before anything starts)
     ├── RolledBack         a migration failed and was rolled back; ``report`` says how far it got
     ├── ControlError       the control stream carried something that is not this protocol
     ├── ControlLost        the control stream ended (the peer went away, or the session failed)
     ├── PeerAborted        the peer sent ``abort``
     └── Interrupted        the operator interrupted the migration (SIGINT / SIGTERM)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import MigrationReport


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
    :class:`~dataplane.migration.report.MigrationReport` (outcome ``rolled-back``).
    """

    def __init__(self, report: MigrationReport) -> None:
        self.report = report
        super().__init__(f"migration rolled back in phase {report.phase!r}: {report.error}")


class ControlError(MigrationError):
    """The control stream carried something that is not this protocol."""


class ControlLost(MigrationError):
    """The control stream ended (the peer went away, or the session failed)."""


class PeerAborted(MigrationError):
    """The peer sent ``abort``."""


class Interrupted(MigrationError):
    """The operator interrupted the migration (SIGINT / SIGTERM)."""
