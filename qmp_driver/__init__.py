"""Asyncio control of QEMU over QMP, directly or through libvirt.

This package is the one place in the project that knows QMP. It knows nothing
of the streaming channel.

- :class:`QemuDriver` — typed async methods for run state, the block graph,
  block jobs, dirty bitmaps, NBD exports and migration.
- Transports: :class:`SocketTransport` (a QMP unix socket, via ``qemu.qmp``)
  and :class:`LibvirtTransport` (``libvirt_qemu`` passthrough + ``libvirtaio``).
- Events: :func:`match` builds predicates; :meth:`QemuDriver.expect`
  subscribes before the command that triggers an event.
- Errors: see :mod:`qmp_driver.errors`.
"""

from typing import TYPE_CHECKING, Any

from .driver import MIGRATION_DONE, Action, QemuDriver
from .errors import (
    CommandError,
    ConnectFailed,
    ConnectionLost,
    DomainNotFound,
    DriverError,
    DriverTimeout,
    Unsupported,
)
from .events import Event, EventHub, Subscription, match
from .schema import Features, QmpSchema
from .socket_transport import SocketTransport
from .transport import Transport
from .types import (
    BlockDevice,
    BlockExport,
    BlockJob,
    BlockNode,
    JobInfo,
    MigrationInfo,
    RamStats,
    StatusInfo,
    VersionInfo,
)

if TYPE_CHECKING:
    from .libvirt_transport import LibvirtTransport


def __getattr__(name: str) -> Any:
    # libvirt-python takes ~30 ms to import: only a libvirt connection pays for it
    if name == "LibvirtTransport":
        from .libvirt_transport import LibvirtTransport

        return LibvirtTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QemuDriver", "Action", "MIGRATION_DONE",
    "DriverError", "CommandError", "ConnectionLost", "DriverTimeout", "Unsupported", "ConnectFailed",
    "DomainNotFound",
    "Event", "EventHub", "Subscription", "match",
    "Features", "QmpSchema",
    "Transport", "SocketTransport", "LibvirtTransport",
    "BlockDevice", "BlockExport", "BlockJob", "BlockNode", "JobInfo", "MigrationInfo", "RamStats",
    "StatusInfo", "VersionInfo",
]
