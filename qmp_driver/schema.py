"""What a QEMU can do, read from its own QMP schema (``query-qmp-schema``) rather than its version.

QEMU's introspection lists every command with the name of its argument type, and every object
type with its members; type names are masked (``"123"``), so a command's arguments are found by
following its ``arg-type``. :class:`QmpSchema` answers the questions the data plane asks;
:class:`Features` names the ones whose answer changes what it does (and what it reports), from
QEMU 7.2 (the floor) to QEMU 10 (the primary platform):

==============================  =====================================================  =======
feature                         how it is detected                                     since
==============================  =====================================================  =======
``block_job_change``            command ``block-job-change`` (mirror copy-mode live)    8.2
``avail_switchover_bandwidth``  ``migrate-set-parameters`` has that member              8.2
``migrate_channels``            ``migrate`` has ``channels``                           8.2
``mirror_copy_mode``            ``blockdev-mirror`` has ``copy-mode``                   6.0
``multifd_compression``         ``migrate-set-parameters`` has ``multifd-compression``  5.0
``postcopy_preempt``            migration capability ``postcopy-preempt``              8.0
==============================  =====================================================  =======
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Features", "QmpSchema"]


class QmpSchema:
    """The parsed result of ``query-qmp-schema``. Never raises on odd entries: it ignores them."""

    def __init__(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._commands: dict[str, str] = {}
        self._members: dict[str, frozenset[str]] = {}
        self._enums: dict[str, frozenset[str]] = {}
        for entry in entries:
            if not isinstance(entry, Mapping):
                continue
            name, kind = str(entry.get("name", "")), entry.get("meta-type")
            if kind == "command":
                self._commands[name] = str(entry.get("arg-type", ""))
            elif kind == "object":
                members = entry.get("members") or []
                self._members[name] = frozenset(str(m.get("name")) for m in members if isinstance(m, Mapping))
            elif kind == "enum":
                values = entry.get("values") or []
                self._enums[name] = frozenset(str(v) for v in values)

    def has_command(self, command: str) -> bool:
        """True if QEMU offers *command*."""
        return command in self._commands

    def command_arguments(self, command: str) -> frozenset[str]:
        """The argument names *command* accepts (empty for an unknown command)."""
        return self._members.get(self._commands.get(command, ""), frozenset())

    def accepts(self, command: str, argument: str) -> bool:
        """True if *command* exists and takes an argument named *argument*."""
        return argument in self.command_arguments(command)


@dataclass(frozen=True)
class Features:
    """The capabilities of one QEMU that the data plane's behaviour depends on (see the module doc)."""

    block_job_change: bool = False
    avail_switchover_bandwidth: bool = False
    migrate_channels: bool = False
    mirror_copy_mode: bool = False
    multifd_compression: bool = False
    postcopy_preempt: bool = False

    @classmethod
    def detect(cls, schema: QmpSchema, capabilities: Iterable[str] = ()) -> Features:
        """Read the features from *schema* and the migration *capabilities* QEMU listed."""
        caps = set(capabilities)
        return cls(
            block_job_change=schema.has_command("block-job-change"),
            avail_switchover_bandwidth=schema.accepts("migrate-set-parameters", "avail-switchover-bandwidth"),
            migrate_channels=schema.accepts("migrate", "channels"),
            mirror_copy_mode=schema.accepts("blockdev-mirror", "copy-mode"),
            multifd_compression=schema.accepts("migrate-set-parameters", "multifd-compression"),
            postcopy_preempt="postcopy-preempt" in caps,
        )

    def names(self) -> list[str]:
        """The names of the features present, in declaration order."""
        return [f.name.replace("_", "-") for f in fields(self) if getattr(self, f.name)]
