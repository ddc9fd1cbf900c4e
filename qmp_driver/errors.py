"""The driver's exception hierarchy.

Every public coroutine of :mod:`qmp_driver` raises only these (plus
``asyncio.CancelledError`` when its task is cancelled)::

    DriverError
     ├── CommandError        QEMU answered a command with an error
     ├── ConnectionLost      the monitor went away (QEMU exited, socket closed)
     ├── DriverTimeout       a deadline passed (connect, command, event wait)
     ├── Unsupported         this QEMU lacks the command or capability
     ├── ConnectFailed       the monitor could not be reached or is not QMP
     └── DomainNotFound      libvirt has no such domain
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Argument names whose values never appear in messages or logs.
SECRET_KEYS = frozenset({"password", "secret", "key-secret", "passphrase", "token"})
REDACTED = "<redacted>"


def redact(args: Any) -> Any:
    """Return a copy of QMP arguments with secret-looking values replaced.

    Keys named in :data:`SECRET_KEYS` (and any key containing ``password`` or
    ``secret``) are redacted, at any depth.
    """
    if isinstance(args, Mapping):
        out = {}
        for k, v in args.items():
            lk = str(k).lower()
            if lk in SECRET_KEYS or "password" in lk or "secret" in lk:
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(args, list | tuple):
        return [redact(v) for v in args]
    return args


class DriverError(Exception):
    """Base class of every error the driver raises."""


class CommandError(DriverError):
    """QEMU returned an error for a command.

    Attributes: ``command``, ``arguments`` (secrets redacted), ``error_class``
    (QMP's ``class``, e.g. ``GenericError``, ``DeviceNotFound``) and
    ``description`` (QMP's ``desc``).
    """

    def __init__(self, command: str, arguments: Mapping[str, Any] | None, error_class: str,
                 description: str) -> None:
        self.command = command
        self.arguments = redact(dict(arguments or {}))
        self.error_class = error_class
        self.description = description
        super().__init__(f"{command}({self.arguments}) failed: {error_class}: {description}")


class ConnectionLost(DriverError):
    """The monitor connection is gone: QEMU exited, or the socket was closed.

    Raised by commands in flight and by every pending event waiter at once.
    """


class DriverTimeout(DriverError, TimeoutError):
    """A connect, command or event wait did not finish within its deadline."""


class Unsupported(DriverError):
    """The connected QEMU does not offer a command or capability the caller needs."""

    def __init__(self, what: str, version: str) -> None:
        self.what = what
        self.version = version
        super().__init__(f"{what} is unsupported by this QEMU ({version})")


class ConnectFailed(DriverError):
    """The monitor could not be reached, or what answered is not a QMP server."""


class DomainNotFound(ConnectFailed):
    """libvirt knows no domain of that name or UUID."""
