"""Early writeback of destination images (dataplane.storage.writeback), on real files."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from dataplane.storage.writeback import EarlyWriteback, start_writeback

MiB = 1 << 20


def dirty_kib() -> int:
    """The kernel's count of dirty page-cache memory (``Dirty:`` in /proc/meminfo), in KiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1])
    raise AssertionError("no Dirty: line in /proc/meminfo")


def write_file(path, nbytes: int) -> None:
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(chunk)


async def test_dirty_pages_of_an_image_are_written_back_while_it_runs(tmp_path):
    img = tmp_path / "img.raw"
    before = dirty_kib()
    write_file(img, 96 * MiB)
    dirty = dirty_kib()
    assert dirty - before > 64 * 1024, "the file system wrote the pages back by itself: nothing to test"
    await asyncio.sleep(0.3)
    assert dirty_kib() > dirty - 32 * 1024, "the kernel writes back by itself on this machine"
    async with EarlyWriteback([str(img)], interval=0.05) as wb:
        assert wb.paths == [str(img)]
        deadline = time.monotonic() + 10
        while dirty_kib() > dirty - 64 * 1024 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert dirty_kib() <= dirty - 64 * 1024, "the image's dirty pages were not written back"


async def test_what_is_not_a_local_file_is_left_out(tmp_path):
    img = tmp_path / "img.raw"
    img.write_bytes(b"x" * 4096)
    paths = [str(tmp_path), str(tmp_path / "missing.raw"), "/dev/null", str(img), str(img)]
    wb = EarlyWriteback(paths)
    assert wb.paths == [str(img)]  # a directory, a missing file, a character device, a duplicate
    wb.start()
    await asyncio.sleep(0.05)
    await wb.stop()
    await wb.stop()  # idempotent
    assert EarlyWriteback([]).paths == []


def test_start_writeback_on_a_pipe_is_an_error():
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            start_writeback(r)
        assert info.value.errno is not None
    finally:
        os.close(r)
        os.close(w)
