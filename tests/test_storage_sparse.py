"""dataplane.storage.sparse: which destination nodes can be reopened with discard=unmap, and how
(the reopen itself runs against real QEMUs in test_migration_local and test_cclm_e2e)."""

from __future__ import annotations

from typing import Any

from dataplane.storage.sparse import reopen_options
from qmp_driver import BlockNode


def _node(name: str, driver: str, filename: str, **raw: Any) -> BlockNode:
    return BlockNode(name, driver, filename, False, 1 << 20, [], raw)


def test_a_format_node_over_one_file_is_reopened_with_its_cache_mode_and_unmap():
    fmt = _node("vda", "qcow2", "/v/a.qcow2", cache={"direct": True, "no-flush": False}, detect_zeroes="on")
    proto = _node("vda-file", "file", "/v/a.qcow2", cache={"direct": True, "no-flush": False})
    other = _node("vdb-file", "file", "/v/b.raw")
    assert reopen_options(fmt, [fmt, proto, other]) == [
        {"driver": "file", "node-name": "vda-file", "filename": "/v/a.qcow2", "discard": "unmap",
         "read-only": False, "cache": {"direct": True, "no-flush": False}},
        {"driver": "qcow2", "node-name": "vda", "file": "vda-file", "discard": "unmap", "read-only": False,
         "cache": {"direct": True, "no-flush": False}, "detect-zeroes": "on"},
    ]


def test_what_cannot_be_reopened_says_why():
    fmt = _node("vda", "qcow2", "/v/a.qcow2", backing_file_depth=1)
    assert reopen_options(fmt, [fmt]) == "it has a backing chain"
    proto = _node("vda-file", "file", "/v/a.raw")
    assert "protocol node" in str(reopen_options(proto, [proto]))
    net = _node("vdc", "raw", "nbd://host/export")
    assert "not over one file or host device" in str(reopen_options(net, [net, _node("n", "nbd", "nbd://host/export")]))


def test_a_raw_slice_is_not_reopened():
    """A raw node that is a slice of its file (offset/size options) would lose them in a reopen."""
    fmt = BlockNode("vda", "raw", "/v/a.raw", False, 1 << 20, [], {})
    proto = BlockNode("vda-file", "file", "/v/a.raw", False, 4 << 20, [], {})
    assert "slice" in str(reopen_options(fmt, [fmt, proto]))
