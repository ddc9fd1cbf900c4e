"""Transport over a QMP unix socket, built on ``qemu.qmp``.

Used when the data plane owns QEMU (standalone daemon, tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

from .errors import CommandError, ConnectFailed, ConnectionLost, DriverTimeout
from .events import Event
from .transport import Transport

log = logging.getLogger(__name__)

#: The largest single QMP message accepted (query-named-block-nodes on a big
#: graph is the largest real reply; anything past this is treated as garbage).
MAX_MESSAGE = 16 * 1024 * 1024

#: How qemu.qmp's reader reports that QEMU closed the socket (it exited, e.g. a destination whose
#: incoming migration was cancelled): the driver already turns that into ConnectionLost.
_PEER_CLOSED = ("ConnectionResetError", "EOFError", "BrokenPipeError", "IncompleteReadError")


class _PeerClosedIsInfo(logging.Filter):
    """Demote qemu.qmp's ERROR for a monitor socket that QEMU closed to INFO: an expected event (the
    driver raises ConnectionLost to whoever waits), not a fault that needs an operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            text = record.getMessage()
            if "Task.Reader" in text and any(name in text for name in _PEER_CLOSED):
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.msg, record.args = "QEMU closed its QMP socket (%s)", (text.rsplit(": ", 1)[-1],)
        return True


_PEER_CLOSED_FILTER = _PeerClosedIsInfo()


class SocketTransport(Transport):
    """A QMP client connection to one QEMU monitor socket."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._client = QMPClient(f"qmp:{path}", readbuflen=MAX_MESSAGE)
        self._client.logger.addFilter(_PEER_CLOSED_FILTER)  # one logger per connection: filter it
        self._listener = EventListener()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def describe(self) -> str:
        return f"QMP socket {self.path}"

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0) -> SocketTransport:
        """Connect to the QMP server at ``path`` and negotiate capabilities.

        :raises ConnectFailed: nothing listens there, or it is not a QMP server
            (no greeting, garbage, or negotiation refused).
        :raises DriverTimeout: no greeting within ``timeout`` seconds.
        """
        self = cls(path)
        try:
            await asyncio.wait_for(self._client.connect(path), timeout)
        except TimeoutError:
            await self._abort()
            raise DriverTimeout(f"{path}: no QMP greeting within {timeout:g}s") from None
        except QMPError as exc:
            await self._abort()
            cause = getattr(exc, "exc", None) or exc.__cause__ or exc
            if isinstance(cause, OSError):
                raise ConnectFailed(f"{path}: cannot connect: {cause}") from exc
            raise ConnectFailed(f"{path}: not a usable QMP server: {cause!r}") from exc
        except OSError as exc:
            await self._abort()
            raise ConnectFailed(f"{path}: cannot connect: {exc}") from exc
        self._client.register_listener(self._listener)
        self._tasks.append(asyncio.create_task(self._pump(), name=f"qmp-events:{path}"))
        self._tasks.append(asyncio.create_task(self._watch(), name=f"qmp-watch:{path}"))
        return self

    async def _abort(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    async def _pump(self) -> None:
        async for msg in self._listener:
            self.hub.publish(Event.from_qmp(dict(msg)))

    async def _watch(self) -> None:
        while True:
            state = await self._client.runstate_changed()
            if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                break
        # Let the pump deliver what was already queued (e.g. SHUTDOWN) first.
        await asyncio.sleep(0)
        while not self._listener.empty():
            self.hub.publish(Event.from_qmp(dict(await self._listener.get())))
        why = "closed by us" if self._closing else "QEMU closed the monitor (exited or crashed?)"
        self.hub.close(ConnectionLost(f"{self.describe()}: {why}"))

    async def _run(self, command: str, arguments: Mapping[str, Any] | None, fd: int | None,
                   timeout: float | None) -> Any:
        if self.hub.closed is not None or self._client.runstate != Runstate.RUNNING:
            raise ConnectionLost(f"{self.describe()}: not connected (cannot run {command})")
        try:
            if fd is not None:
                self._client.send_fd_scm(fd)
            coro = self._client.execute(command, dict(arguments) if arguments else None)
            return await asyncio.wait_for(coro, timeout)
        except ExecuteError as exc:
            raise CommandError(command, arguments, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise DriverTimeout(f"{self.describe()}: {command} got no reply within {timeout:g}s") from None
        except (ExecInterruptedError, QMPError, OSError, EOFError) as exc:
            raise ConnectionLost(f"{self.describe()}: lost during {command}: {exc!r}") from exc

    async def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self.hub.close(ConnectionLost(f"{self.describe()}: closed by us"))
