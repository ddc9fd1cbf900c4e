"""Named points of the switchover where a test harness may hold a migration (a test seam).

Fault injection must reach the moments around the switchover exactly, not by timing luck. When the
environment variable :data:`HOOK_DIR_ENV` names a directory, :func:`reached` at point ``NAME``
creates ``NAME.reached`` there (holding the process id) and waits until ``NAME.go`` exists; the
harness injects its fault in between. Without the variable (every production run) :func:`reached`
returns at once and touches nothing.

Points (in the order a migration passes them):

===================== ======= =========================================================
point                 role    the moment
===================== ======= =========================================================
before-continue       source  mirrors ended, NBD nodes deleted, ``migrate-continue`` next
after-continue        source  ``migrate-continue`` returned; the source QEMU finishes alone
source-completed      source  the source QEMU completed (stopped); ``commit`` not sent yet
destination-completed target  the destination QEMU completed (paused); before the commit is read
after-resume          target  the destination resumed the guest; ``done`` not sent yet
===================== ======= =========================================================
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

#: The environment variable naming the directory of the hook files.
HOOK_DIR_ENV = "DATAPLANE_TEST_HOOK_DIR"
POINTS = ("before-continue", "after-continue", "source-completed", "destination-completed", "after-resume")


async def reached(point: str) -> None:
    """Hold here while a test harness asks to (see the module's docstring); at once otherwise.

    :raises ValueError: ``point`` is not one of :data:`POINTS`.
    """
    if point not in POINTS:
        raise ValueError(f"unknown hook point {point!r}")
    where = os.environ.get(HOOK_DIR_ENV)
    if not where:
        return
    d = Path(where)
    (d / f"{point}.reached").write_text(f"{os.getpid()}\n")
    go = d / f"{point}.go"
    while not go.exists():
        await asyncio.sleep(0.02)
