"""Keep holes holes on a destination node that QEMU opened without ``discard=unmap``.

A write of zeros with the "may unmap" flag (an NBD ``WRITE_ZEROES`` without ``NO_HOLE``, which
is what a mirror sends for a hole of its source) punches a hole only if every node it passes
through was opened with ``discard=unmap``. QEMU's default is ``discard=ignore``: the zeros are
then allocated (``fallocate(ZERO_RANGE)`` on a file), and a thin destination volume fills up
with its source's holes. :func:`enable_unmap` reopens a format node and its protocol node with
``discard=unmap`` (``blockdev-reopen``), keeping what ``query-named-block-nodes`` shows of their
other options (cache mode, read-only, detect-zeroes).

::

    why_not = await enable_unmap(drv, "vda")      # None: holes stay holes from now on

``blockdev-reopen`` resets an option it is not given to its default, and QEMU refuses to reset
some (a file node's ``aio`` or ``locking``, for example): a node opened with such options, a
node with a backing chain or a node over something other than one file or host device cannot
be reopened this way, and the reason is returned so that the caller can say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import tempfile
from typing import Any

from qmp_driver import BlockNode, CommandError, QemuDriver

from .targets import Target

__all__ = ["PROTOCOLS", "enable_unmap", "hole_support", "reopen_options"]

#: The protocol drivers whose nodes :func:`enable_unmap` reopens under a format node.
PROTOCOLS = frozenset({"file", "host_device"})


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)``; raises OSError."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def hole_support(target: Target) -> str | None:
    """Whether zeros written to ``target`` can stay holes: None if they can, else why not (a file
    system that cannot punch holes, a device that takes no discards). A blockdev JSON target is not
    probed (None). Probes with a scratch file beside a file target, never the target itself."""
    if target.kind == "blockdev" or target.path is None:
        return None
    if target.kind == "device":
        try:
            rdev = os.stat(target.path).st_rdev
            with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue/discard_max_bytes") as f:
                if int(f.read().strip() or 0) > 0:
                    return None
        except (OSError, ValueError):
            pass
        return f"{target.path} takes no discards"
    directory = os.path.dirname(os.path.abspath(target.path))
    try:
        fd, probe = tempfile.mkstemp(prefix=".dataplane-holes-", dir=directory)
    except OSError as exc:
        return f"cannot probe {directory}: {exc.strerror or exc}"
    try:
        os.write(fd, b"\1" * 8192)
        _punch_hole(fd, 0, 4096)
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_blocks * 512 >= 8192:
            return f"the file system of {directory} keeps punched ranges allocated"
        return None
    except OSError as exc:
        return f"the file system of {directory} cannot punch holes ({exc.strerror or exc})"
    finally:
        os.close(fd)
        os.unlink(probe)


def _common(node: BlockNode) -> dict[str, Any]:
    raw = node.raw
    cache = raw.get("cache") or {}
    opts: dict[str, Any] = {"driver": node.driver, "node-name": node.node_name, "discard": "unmap",
                            "read-only": node.read_only,
                            "cache": {"direct": bool(cache.get("direct")),
                                      "no-flush": bool(cache.get("no-flush"))}}
    zeroes = raw.get("detect_zeroes")
    if zeroes in ("on", "unmap"):
        opts["detect-zeroes"] = zeroes
    return opts


def reopen_options(fmt: BlockNode, nodes: list[BlockNode]) -> list[dict[str, Any]] | str:
    """The ``blockdev-reopen`` options that give ``fmt`` and its protocol node ``discard=unmap``,
    or the reason they cannot be built (as a phrase: "it has a backing chain")."""
    if int(fmt.raw.get("backing_file_depth") or 0):
        return "it has a backing chain"
    if fmt.driver in PROTOCOLS:
        return "it is a protocol node, not an image format over one"
    under = [n for n in nodes if n.node_name != fmt.node_name and n.filename == fmt.filename
             and n.driver in PROTOCOLS]
    if len(under) != 1:
        return f"it is not over one file or host device ({fmt.filename or 'no file name'})"
    proto = under[0]
    if fmt.driver == "raw" and fmt.virtual_size != proto.virtual_size:
        return "it is a slice of its file (a raw offset or size, which a reopen would reset)"
    proto_opts = _common(proto)
    proto_opts["filename"] = proto.filename
    fmt_opts = _common(fmt)
    fmt_opts["file"] = proto.node_name
    return [proto_opts, fmt_opts]


async def enable_unmap(drv: QemuDriver, node_name: str) -> str | None:
    """Reopen format node ``node_name`` and its protocol node with ``discard=unmap``.

    :returns: None when done, else why it could not be done (the node is left as it was:
        ``blockdev-reopen`` changes all the nodes it is given or none).
    :raises qmp_driver.DriverError: the QMP connection failed (a refusal of the reopen itself
        is returned as a reason, not raised).
    """
    nodes = await drv.query_named_block_nodes()
    fmt = next((n for n in nodes if n.node_name == node_name), None)
    if fmt is None:
        return f"no block node {node_name!r}"
    options = reopen_options(fmt, nodes)
    if isinstance(options, str):
        return options
    try:
        await drv.execute("blockdev-reopen", {"options": options})
    except CommandError as exc:
        return f"QEMU cannot reopen it with discard=unmap: {exc.description}"
    return None
