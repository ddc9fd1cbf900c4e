"""Host-side view of the test guest's checked RAM pages (the stamp ``agent.c`` writes).

Every text or random page of the agent's dirtied area starts with a 32-byte stamp: the magic
``DPRM``, the page's index in the area (u32), its generation (u64: how many times the dirtier has
rewritten it), a keyed checksum of the rest of the page (u64) and 8 zero bytes. The guest's own
checker verifies them; the host only needs to find them, for example in a guest's RAM held in a
``memory-backend-file``, to damage one on purpose and prove the check can fail.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

__all__ = ["PAGE", "RAM_MAGIC", "StampedPage", "stamped_pages"]

PAGE = 4096
RAM_MAGIC = b"DPRM"
_STAMP = struct.Struct("<4sIQQQ")  # magic, index, generation, checksum, zero


@dataclass(frozen=True)
class StampedPage:
    """A checked page found in a RAM image: where it is and what its stamp says."""

    offset: int
    index: int
    generation: int


def stamped_pages(ram: bytes | bytearray | mmap.mmap) -> dict[int, StampedPage]:
    """Find the agent's stamped pages in *ram* (a guest's physical memory); return them by index.

    Only page-aligned stamps count. A page index seen twice (a stale copy left elsewhere in guest
    memory) keeps its highest generation. Never raises on arbitrary input.
    """
    out: dict[int, StampedPage] = {}
    size = len(ram)
    start = ram.find(RAM_MAGIC)
    while start >= 0:
        if start % PAGE == 0 and start + _STAMP.size <= size:
            _, index, gen, _, zero = _STAMP.unpack(ram[start : start + _STAMP.size])
            if zero == 0 and (index not in out or out[index].generation < gen):
                out[index] = StampedPage(start, index, gen)
        start = ram.find(RAM_MAGIC, (start // PAGE + 1) * PAGE)
    return out
