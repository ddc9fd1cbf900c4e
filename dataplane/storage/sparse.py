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

from typing import Any

from qmp_driver import BlockNode, CommandError, QemuDriver

__all__ = ["PROTOCOLS", "enable_unmap", "reopen_options"]

#: The protocol drivers whose nodes :func:`enable_unmap` reopens under a format node.
PROTOCOLS = frozenset({"file", "host_device"})


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
