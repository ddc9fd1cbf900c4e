"""Early writeback of the destination's disk images while a mirror fills them.

QEMU's mirror flushes its target before it reports READY. Over NBD that
flush reaches the destination QEMU, which ``fdatasync``\\ s an image whose
page cache may hold every byte the mirror wrote: hundreds of MiB written
back at once while the link and the CPUs stand idle (0.4 s for 300 MiB on
the development machine, where the kernel's background writeback would not
start before 2.4 GB were dirty).

:class:`EarlyWriteback` asks the kernel to start writing back the image
files every ``interval`` seconds (``sync_file_range(SYNC_FILE_RANGE_WRITE)``:
it queues the writeback and waits for nothing, durability is still the
flush's job), so that the flush finds little left to do. Images that are not
local files (network protocols, a path this process cannot open) and
platforms without ``sync_file_range`` are skipped: the helper never fails a
migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:  # the C library this interpreter runs on (find_library would spawn ldconfig: slow)
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()


def start_writeback(fd: int) -> None:
    """Queue the writeback of every dirty page of the file behind *fd* (returns without waiting).

    :raises OSError: the kernel refused (``EBADF``, ``ESPIPE`` ...), or the
        platform has no ``sync_file_range`` (``ENOSYS``).
    """
    if _sync_file_range is None:
        raise OSError(38, "sync_file_range is not available")
    if _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class EarlyWriteback:
    """Keeps the kernel writing back *paths* while it runs (a daemon thread per instance).

    ``async with EarlyWriteback(paths):`` starts it and stops it on exit.
    Paths that are not regular files or block devices, or cannot be opened,
    are left out (logged at debug level); :attr:`paths` lists those kept.
    """

    def __init__(self, paths: Iterable[str], interval: float = 0.1) -> None:
        self.interval = interval
        self.paths: list[str] = []
        self._fds: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if _sync_file_range is None:
            log.debug("early writeback: sync_file_range is not available here")
            return
        for path in dict.fromkeys(paths):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                log.debug("early writeback: skipping %s: %s", path, exc.strerror or exc)
                continue
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                os.close(fd)
                log.debug("early writeback: skipping %s: not a file or block device", path)
                continue
            self.paths.append(path)
            self._fds.append(fd)

    def start(self) -> None:
        """Start the periodic writeback (no-op without files, or if started already)."""
        if self._fds and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="early-writeback", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # A thread rather than the event loop: sync_file_range may block while the device queue is full.
        fds = list(self._fds)
        while fds:
            for fd in list(fds):
                try:
                    start_writeback(fd)
                except OSError as exc:  # e.g. a file system without support: stop asking for this one
                    log.debug("early writeback: dropping fd %d: %s", fd, exc.strerror or exc)
                    fds.remove(fd)
            if self._stop.wait(self.interval):
                return

    async def stop(self) -> None:
        """Stop (waiting for a call in progress), then close the files. Never raises."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    async def __aenter__(self) -> EarlyWriteback:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = ["EarlyWriteback", "start_writeback"]
