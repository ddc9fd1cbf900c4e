"""Live migration of a running VM together with its non-shared disks.

The orchestration drives two QEMUs through :class:`qmp_driver.QemuDriver`:

- :mod:`.plan` — :class:`MigrationPlan` (disks, memory size, options) with JSON
  (de)serialisation, :func:`discover_plan` on the source, :func:`validate_target`;
- :mod:`.target` — :func:`prepare_target` (returns a :class:`PreparedTarget`),
  :func:`await_incoming` and :func:`resume_target` (or both at once: :func:`finish_target`),
  :func:`abort_target`;
- :mod:`.cclm` — the two roles across clusters, with the committed switchover;
  :mod:`.resolve` — settling a migration that ended in doubt;
- :mod:`.source` — :func:`migrate_source`: NBD mirrors, RAM precopy,
  pause-before-switchover, switchover, and rollback on any failure before it;
- :mod:`.report` — :class:`MigrationProgress` samples and the final :class:`MigrationReport`;
- :mod:`.errors` — :class:`MigrationError` and its subclasses.

Where the sockets between the QEMUs lead (same host, or relays into the
cross-cluster channel) is the caller's business. See ``docs/migration.md``.
"""

from .errors import (
    ControlError,
    ControlLost,
    Interrupted,
    MigrationError,
    PeerAborted,
    PlanRefused,
    RolledBack,
)
from .plan import DiskPlan, MigrationOptions, MigrationPlan, discover_plan, resolve_targets, validate_target
from .report import PHASES, MigrationProgress, MigrationReport
from .source import MigrationControl, migrate_source
from .target import (
    PreparedTarget,
    abort_target,
    await_incoming,
    finish_target,
    image_paths,
    prepare_target,
    resume_target,
)

__all__ = [
    "MigrationError", "PlanRefused", "RolledBack", "ControlError", "ControlLost", "PeerAborted",
    "Interrupted",
    "DiskPlan", "MigrationOptions", "MigrationPlan", "discover_plan", "resolve_targets", "validate_target",
    "PHASES", "MigrationControl", "MigrationProgress", "MigrationReport", "migrate_source",
    "PreparedTarget", "abort_target", "await_incoming", "finish_target", "image_paths", "prepare_target",
    "resume_target",
]
