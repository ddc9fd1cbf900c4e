"""Transport through libvirt, for QEMUs that libvirt owns (KubeVirt launcher pods).

Commands go through ``virDomainQemuMonitorCommand`` (``libvirt_qemu``), and
events arrive through ``qemuMonitorEventRegister``. libvirt marks a domain
driven this way as *tainted* (``custom-monitor``); that is expected and
harmless for the data plane, which only issues commands libvirt itself would.

libvirt accepts exactly one event-loop implementation per process, for the
life of the process. So the driver runs libvirtaio's implementation on a
private asyncio loop in one daemon thread (:class:`LibvirtEventThread`) and
hands each event over to the loop of the transport that subscribed to it.
Any number of asyncio loops (one per test, say) can then use libvirt safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import libvirt
import libvirt_qemu
import libvirtaio

from .errors import CommandError, ConnectFailed, ConnectionLost, DomainNotFound, DriverTimeout
from .events import Event
from .transport import Transport

log = logging.getLogger(__name__)

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")


def _version_text(number: int) -> str:
    """libvirt's packed version (``major * 1000000 + minor * 1000 + micro``) as ``X.Y.Z``."""
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def _silence_libvirt_stderr(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; the driver raises instead."""


class LibvirtEventThread:
    """The process-wide libvirt event loop (libvirtaio on a dedicated thread)."""

    _lock = threading.Lock()
    _instance: LibvirtEventThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            libvirtaio.virEventRegisterAsyncIOImpl(loop=self.loop)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        self.thread.start()
        ready.wait()

    @classmethod
    def ensure(cls) -> LibvirtEventThread:
        """Start the event thread once per process; return it."""
        with cls._lock:
            if cls._instance is None:
                libvirt.registerErrorHandler(_silence_libvirt_stderr, None)
                cls._instance = cls()
            return cls._instance


class LibvirtTransport(Transport):
    """QMP passthrough to one libvirt domain."""

    def __init__(self, uri: str, conn: libvirt.virConnect, dom: libvirt.virDomain,
                 loop: asyncio.AbstractEventLoop, libvirt_version: str = "?") -> None:
        super().__init__()
        self.uri = uri
        self.domain_name = dom.name()
        self._conn = conn
        self._dom = dom
        self._loop = loop
        self._callback_ids: list[tuple[str, int]] = []
        #: the libvirt daemon's version, ``X.Y.Z`` (what its migration API offers depends on it)
        self.libvirt_version = libvirt_version

    def describe(self) -> str:
        return f"libvirt {self.libvirt_version} domain {self.domain_name} on {self.uri}"

    @classmethod
    async def connect(cls, uri: str, domain: str, *, timeout: float = 10.0) -> LibvirtTransport:
        """Open ``uri`` and attach to ``domain`` (a name or a UUID).

        :raises DomainNotFound: libvirt has no such domain.
        :raises ConnectFailed: libvirt is unreachable, or the domain is not running.
        :raises DriverTimeout: libvirt did not answer within ``timeout`` seconds.
        """
        events = LibvirtEventThread.ensure()
        loop = asyncio.get_running_loop()

        def open_and_lookup() -> tuple[libvirt.virConnect, libvirt.virDomain, str]:
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError as exc:
                raise ConnectFailed(f"cannot open libvirt connection {uri}: {exc}") from None
            try:
                if _UUID.match(domain):
                    try:
                        dom = conn.lookupByUUIDString(domain)
                    except libvirt.libvirtError:
                        dom = conn.lookupByName(domain)
                else:
                    dom = conn.lookupByName(domain)
            except libvirt.libvirtError as exc:
                conn.close()
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise DomainNotFound(f"no domain {domain!r} on {uri}") from None
                raise ConnectFailed(f"looking up domain {domain!r} on {uri}: {exc}") from None
            try:
                active = dom.isActive()
                version = _version_text(conn.getLibVersion())
            except libvirt.libvirtError as exc:
                conn.close()
                raise ConnectFailed(f"asking libvirt {uri} about domain {domain!r}: {exc}") from None
            if not active:
                conn.close()
                raise ConnectFailed(f"domain {domain!r} on {uri} is not running")
            return conn, dom, version

        try:
            conn, dom, version = await asyncio.wait_for(loop.run_in_executor(None, open_and_lookup), timeout)
        except TimeoutError:
            raise DriverTimeout(f"libvirt {uri} did not answer within {timeout:g}s") from None
        self = cls(uri, conn, dom, loop, version)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._register(), events.loop))
        return self

    async def _register(self) -> None:
        """Runs on the libvirt event thread: subscribe to monitor and lifecycle events."""
        cid = libvirt_qemu.qemuMonitorEventRegister(self._conn, self._dom, None, self._on_qmp_event, None, 0)
        self._callback_ids.append(("qemu", cid))
        cid = self._conn.domainEventRegisterAny(
            self._dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        self._callback_ids.append(("domain", cid))
        self._conn.registerCloseCallback(self._on_conn_closed, None)

    # -- callbacks: run on the libvirt event thread; hop to the owner's loop --

    def _on_qmp_event(self, _conn: object, _dom: object, event: str, seconds: int, micros: int,
                      details: str | None, _opaque: object) -> None:
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {"raw": details}
        ev = Event(event, data if isinstance(data, dict) else {"value": data}, seconds + micros / 1e6)
        self._loop.call_soon_threadsafe(self.hub.publish, ev)

    def _on_lifecycle(self, _conn: object, _dom: object, event: int, detail: int, _opaque: object) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            exc = ConnectionLost(f"{self.describe()}: domain stopped (event {event}, detail {detail})")
            self._loop.call_soon_threadsafe(self.hub.close, exc)

    def _on_conn_closed(self, _conn: object, reason: int, _opaque: object) -> None:
        exc = ConnectionLost(f"{self.describe()}: libvirt connection closed (reason {reason})")
        self._loop.call_soon_threadsafe(self.hub.close, exc)

    # -- commands --

    async def _run(self, command: str, arguments: Mapping[str, Any] | None, fd: int | None,
                   timeout: float | None) -> Any:
        if self.hub.closed is not None:
            raise ConnectionLost(f"{self.describe()}: not connected (cannot run {command})")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        text = json.dumps(msg)

        def call() -> str:
            if fd is None:
                return libvirt_qemu.qemuMonitorCommand(self._dom, text, 0)
            reply, files = libvirt_qemu.qemuMonitorCommandWithFiles(self._dom, text, [fd], 0)
            for f in files:
                f.close()
            return reply

        try:
            reply_text = await asyncio.wait_for(self._loop.run_in_executor(None, call), timeout)
        except TimeoutError:
            raise DriverTimeout(f"{self.describe()}: {command} got no reply within {timeout:g}s") from None
        except libvirt.libvirtError as exc:
            # QMP errors come back as reply text (handled below); a libvirtError
            # means libvirt itself failed: the domain is gone, or it timed out.
            if not self._dom_active():
                raise ConnectionLost(f"{self.describe()}: {command}: {exc}") from None
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT:
                raise DriverTimeout(f"{self.describe()}: {command}: {exc}") from None
            raise CommandError(command, arguments, "LibvirtError", str(exc)) from None
        try:
            reply = json.loads(reply_text)
        except ValueError:
            raise ConnectionLost(
                f"{self.describe()}: unparsable reply to {command}: {reply_text[:200]!r}") from None
        if "error" in reply:
            err = reply["error"]
            raise CommandError(command, arguments, str(err.get("class", "GenericError")),
                               str(err.get("desc", "")))
        return reply.get("return")

    def _dom_active(self) -> bool:
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError:
            return False

    async def close(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        events = LibvirtEventThread.ensure()

        async def unregister() -> None:
            for kind, cid in self._callback_ids:
                with contextlib.suppress(libvirt.libvirtError, KeyError):
                    if kind == "qemu":
                        libvirt_qemu.qemuMonitorEventDeregister(conn, cid)
                    else:
                        conn.domainEventDeregisterAny(cid)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()

        with contextlib.suppress(Exception):
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(unregister(), events.loop))
        with contextlib.suppress(libvirt.libvirtError):
            await self._loop.run_in_executor(None, conn.close)
        self.hub.close(ConnectionLost(f"{self.describe()}: closed by us"))
