"""A libvirt domain's disks and libvirt's own block copy API, asyncio side (no monitor passthrough).

Where libvirt owns QEMU, a disk may only move through libvirt: its block copy job
(``virDomainBlockCopy``, then ``virDomainBlockJobAbort`` with ``PIVOT``) keeps libvirt's view of
the domain true, and nothing here sends a QMP command (no ``custom-monitor`` taint). Each blocking
libvirt call runs in the default executor.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from .errors import CommandError, ConnectionLost

__all__ = ["LibvirtDisk", "LibvirtDomainDisks"]

T = TypeVar("T")


@dataclass(frozen=True)
class LibvirtDisk:
    """One disk of the domain XML: ``target`` (``vda``), ``alias`` (``virtio-disk0``), ``source``
    (the file or device), ``kind`` (``file`` / ``block``), ``format`` (``raw`` / ``qcow2``)."""

    target: str
    alias: str
    source: str
    kind: str
    format: str
    read_only: bool


class LibvirtDomainDisks:
    """The disks of one running libvirt domain and the block copy jobs on them."""

    def __init__(self, uri: str, conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        self.uri = uri
        self._conn = conn
        self._dom = dom
        #: awaited with (call, disk target) before each call that changes the domain (blockCopy,
        #: the pivot, cancel, write limits): a crash journal writes it down first
        self.before_change: Callable[[str, str], Awaitable[None]] | None = None

    async def _changing(self, call: str, target: str) -> None:
        if self.before_change is not None:
            await self.before_change(call, target)

    @classmethod
    async def open(cls, uri: str, domain: str) -> LibvirtDomainDisks:
        """Connect to ``uri`` and look ``domain`` (name or UUID) up.

        :raises ConnectionLost: libvirt cannot be reached or the domain does not exist or is not running.
        """
        def lookup() -> tuple[libvirt.virConnect, libvirt.virDomain]:
            conn = libvirt.open(uri)
            try:
                try:
                    dom = conn.lookupByName(domain)
                except libvirt.libvirtError:
                    dom = conn.lookupByUUIDString(domain)
                if not dom.isActive():
                    raise ConnectionLost(f"domain {domain!r} is not running")
                return conn, dom
            except BaseException:
                conn.close()
                raise

        try:
            conn, dom = await asyncio.get_running_loop().run_in_executor(None, lookup)
        except libvirt.libvirtError as exc:
            raise ConnectionLost(f"libvirt {uri}: {exc.get_error_message()}") from None
        return cls(uri, conn, dom)

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except libvirt.libvirtError as exc:
            raise CommandError(what, None, "LibvirtError", exc.get_error_message() or str(exc)) from None

    @property
    def name(self) -> str:
        return str(self._dom.name())

    async def persistent(self) -> bool:
        return bool(await self._call(self._dom.isPersistent, "isPersistent"))

    async def disks(self) -> list[LibvirtDisk]:
        """The domain's disks, from its live XML.

        :raises CommandError: libvirt refused.
        """
        xml = await self._call(lambda: self._dom.XMLDesc(0), "XMLDesc")
        out = []
        for disk in ET.fromstring(xml).iterfind("./devices/disk"):
            if disk.get("device", "disk") != "disk":
                continue
            target = disk.find("target")
            source = disk.find("source")
            driver = disk.find("driver")
            alias = disk.find("alias")
            src = "" if source is None else (source.get("file") or source.get("dev") or "")
            out.append(LibvirtDisk(
                target.get("dev", "") if target is not None else "",
                alias.get("name", "") if alias is not None else "", src, disk.get("type", "file"),
                driver.get("type", "raw") if driver is not None else "raw",
                disk.find("readonly") is not None))
        return out

    async def capacity(self, target: str) -> int:
        """The guest-visible size in bytes of disk ``target``.

        :raises CommandError: libvirt refused.
        """
        info = await self._call(lambda: self._dom.blockInfo(target, 0), "blockInfo")
        return int(info[0])

    async def block_copy(self, target: str, dest_xml: str, *, bandwidth: int = 0, reuse: bool = False,
                         synchronous_writes: bool = False) -> None:
        """Start libvirt's block copy of disk ``target`` to the ``<disk>`` ``dest_xml`` (libvirt
        creates a file destination unless ``reuse``; a persistent domain gets a transient job).

        :raises CommandError: libvirt refused.
        """
        flags = 0
        if reuse:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        if synchronous_writes:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
        if await self.persistent():
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        params: dict[str, Any] = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else {}
        await self._changing("blockCopy", target)
        await self._call(lambda: self._dom.blockCopy(target, dest_xml, params, flags), "blockCopy")

    async def set_speed(self, target: str, bytes_per_second: int) -> None:
        """Cap the block job on ``target`` at ``bytes_per_second`` (0: none).

        :raises CommandError: libvirt refused.
        """
        flag = libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES
        await self._call(lambda: self._dom.blockJobSetSpeed(target, bytes_per_second, flag),
                         "blockJobSetSpeed")

    async def job(self, target: str) -> dict[str, int] | None:
        """The block job on ``target`` (``cur``, ``end``, ``type``, ``bandwidth``), or None."""
        info = await self._call(lambda: self._dom.blockJobInfo(target, 0), "blockJobInfo")
        return dict(info) if info else None

    async def pivot(self, target: str) -> bool:
        """Pivot the READY copy job of ``target``; False when libvirt says it is not ready yet.

        :raises CommandError: libvirt refused for another reason.
        """
        await self._changing("pivot", target)
        try:
            flag = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
            await self._call(lambda: self._dom.blockJobAbort(target, flag), "blockJobAbort")
        except CommandError as exc:
            if "not ready" in exc.description:
                return False
            raise
        return True

    async def cancel(self, target: str) -> None:
        """Cancel the job on ``target`` (the disk stays on its source).

        :raises CommandError: libvirt refused.
        """
        await self._call(lambda: self._dom.blockJobAbort(target, 0), "blockJobAbort")

    async def throttle_writes(self, target: str, bytes_per_second: int) -> None:
        """Limit the guest's writes to ``target`` (0 lifts it), through libvirt's block I/O tuning.

        :raises CommandError: libvirt refused.
        """
        params = {libvirt.VIR_DOMAIN_BLOCK_IOTUNE_WRITE_BYTES_SEC: bytes_per_second}
        await self._changing("setBlockIoTune", target)
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE
        await self._call(lambda: self._dom.setBlockIoTune(target, params, live), "setBlockIoTune")

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._conn.close)
