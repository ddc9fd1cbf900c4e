"""The interface every monitor transport offers the driver.

A transport sends one QMP command and returns its ``return`` value, and
publishes every QMP event it receives into its :class:`EventHub`. It knows
nothing about what the commands mean; :class:`qmp_driver.QemuDriver` does.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from .events import EventHub


class Transport(abc.ABC):
    """One monitor connection to one QEMU instance."""

    def __init__(self) -> None:
        self.hub = EventHub()

    @abc.abstractmethod
    def describe(self) -> str:
        """A short human name for logs and errors (socket path, domain name)."""

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      *, timeout: float | None = None) -> Any:
        """Run one QMP command and return its ``return`` member.

        :raises CommandError: QEMU answered with an error.
        :raises ConnectionLost: the monitor went away before the reply.
        :raises DriverTimeout: no reply within ``timeout`` seconds.
        """
        return await self._run(command, arguments, None, timeout)

    async def execute_with_fd(self, command: str, arguments: Mapping[str, Any], fd: int,
                              *, timeout: float | None = None) -> Any:
        """Like :meth:`execute`, passing ``fd`` to QEMU with the command (SCM_RIGHTS).

        :raises CommandError, ConnectionLost, DriverTimeout: as :meth:`execute`.
        """
        return await self._run(command, arguments, fd, timeout)

    @abc.abstractmethod
    async def _run(self, command: str, arguments: Mapping[str, Any] | None, fd: int | None,
                   timeout: float | None) -> Any:
        """Send one command (with ``fd`` if not None); raises as :meth:`execute`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; pending waiters get ConnectionLost. Idempotent."""
