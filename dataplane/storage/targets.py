"""Where a disk moves to in a storage live migration: parsing a target and making it ready.

A target is one of:

* a file path (``/var/lib/images/vm-new.qcow2``) with an image format (``raw`` or ``qcow2``): created
  sparse with the disk's virtual size when missing; an existing file is refused unless ``reuse``
  is given and its virtual size is the disk's;
* a host block device (``/dev/...``): used raw (``host_device``), limited to the disk's size when
  larger; refused when smaller;
* blockdev JSON (text starting with ``{``): any backend QEMU supports, added as given (it must be a
  format node or a protocol node QEMU can write; its size must be the disk's).

:func:`parse_target` is pure; :func:`prepare_target_file` touches the file system (and runs
``qemu-img create`` for qcow2).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "Target", "TargetError", "blockdev_nodes", "device_size", "parse_target",
           "prepare_target_file"]

#: The image formats a file target may have.
FORMATS = ("raw", "qcow2")


class TargetError(Exception):
    """A target that cannot be used (bad syntax, exists without ``reuse``, wrong size, no space)."""


@dataclass(frozen=True)
class Target:
    """A parsed target: ``kind`` is ``file``, ``device`` or ``blockdev``; ``path`` for the first two;
    ``format`` the image format on it (``raw`` for a device); ``options`` the blockdev JSON."""

    kind: str
    path: str | None = None
    format: str = "raw"
    options: dict[str, Any] = field(default_factory=dict)

    def with_format(self, source_format: str) -> Target:
        """This target with its format settled: a file target without one takes ``source_format``
        when that is one of :data:`FORMATS`, else raw."""
        if self.kind != "file" or self.format:
            return self
        fmt = source_format if source_format in FORMATS else "raw"
        return Target(self.kind, self.path, fmt, self.options)

    def describe(self) -> str:
        if self.kind == "blockdev":
            return f"blockdev {json.dumps(self.options, sort_keys=True)}"
        return f"{self.path} ({self.format})"


def parse_target(text: str, fmt: str | None = None) -> Target:
    """The target that ``text`` names (see the module). ``fmt`` is the image format of a file target
    (when None: ``""``, the disk's own format where it is raw or qcow2, raw otherwise; see
    :meth:`Target.with_format`).

    :raises TargetError: unparsable JSON, a JSON target without ``driver``, an unknown format, a
        format given for a block device other than raw, or an empty path.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            options = json.loads(text)
        except ValueError as exc:
            raise TargetError(f"target is not valid blockdev JSON: {exc}") from None
        if not isinstance(options, dict) or not isinstance(options.get("driver"), str):
            raise TargetError("a blockdev JSON target needs a \"driver\"")
        return Target("blockdev", options=options, format=str(options["driver"]))
    if not text:
        raise TargetError("empty target")
    if fmt is not None and fmt not in FORMATS:
        raise TargetError(f"unknown format {fmt!r}: use {' or '.join(FORMATS)}")
    path = os.path.abspath(text)
    try:
        is_device = stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        is_device = False
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a file where a directory should be
        raise TargetError(f"target {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if is_device:
        if fmt not in (None, "raw"):
            raise TargetError(f"{path} is a block device: it is written raw (no --format {fmt})")
        return Target("device", path, "raw")
    return Target("file", path, fmt or "")


def device_size(path: str) -> int:
    """The size in bytes of a block device (or any file), by seeking to its end."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _virtual_size(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise TargetError(f"{path}: qemu-img info failed: {out.stderr.strip()}")
    return int(json.loads(out.stdout)["virtual-size"])


def prepare_target_file(target: Target, size: int, *, reuse: bool = False) -> bool:
    """Make a file or device target ready for a disk of ``size`` bytes; a blockdev target is left as
    it is. Returns whether a file was created (it is then this run's).

    :raises TargetError: an existing file without ``reuse``, a reused file or a device of another
        size (a device may be larger), a missing directory, or the file cannot be created.
    """
    if target.kind == "blockdev":
        return False
    assert target.path is not None
    path = target.path
    if target.kind == "device":
        have = device_size(path)
        if have < size:
            raise TargetError(f"{path}: the device has {have} bytes, the disk {size}")
        return False
    if os.path.exists(path):
        if not reuse:
            raise TargetError(f"{path} exists; give --reuse to write over it")
        have = _virtual_size(path)
        if have != size:
            raise TargetError(f"{path}: its virtual size is {have} bytes, the disk's {size} (--reuse needs "
                              f"the same size)")
        return False
    parent = Path(path).parent
    if not parent.is_dir():
        raise TargetError(f"{path}: directory {parent} does not exist")
    if target.format == "raw":
        try:
            with open(path, "xb") as f:
                f.truncate(size)  # sparse: no block is allocated until written
        except OSError as exc:
            raise TargetError(f"{path}: {exc.strerror or exc}") from None
        return True
    out = subprocess.run(["qemu-img", "create", "-q", "-f", target.format, path, str(size)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise TargetError(f"{path}: qemu-img create failed: {out.stderr.strip()}")
    return True


def blockdev_nodes(target: Target, node: str, size: int) -> list[dict[str, Any]]:
    """The ``blockdev-add`` arguments, in order, that open ``target`` as format node ``node`` (a
    protocol child ``<node>-file`` for a file or device). Holes stay holes: discards are passed
    down and written zeros become unmapped ranges."""
    if target.kind == "blockdev":
        return [{**target.options, "node-name": target.options.get("node-name", node)}]
    assert target.path is not None
    protocol = "host_device" if target.kind == "device" else "file"
    file_node: dict[str, Any] = {"driver": protocol, "node-name": f"{node}-file", "filename": target.path,
                                 "discard": "unmap"}
    fmt_node: dict[str, Any] = {"driver": target.format, "node-name": node, "file": f"{node}-file",
                                "discard": "unmap", "detect-zeroes": "unmap"}
    if target.kind == "device":
        fmt_node["size"] = size  # a larger device is used up to the disk's size
    return [file_node, fmt_node]
