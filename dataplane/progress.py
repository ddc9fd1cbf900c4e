"""One line of migration progress, fitted to the terminal: what ``dataplane migrate`` and the demo show.

A ``progress`` event (see docs/cli.md) becomes ``phase [####....] 42.0% RAM 1.2 GiB/2.0 GiB
110.0 MiB/s ETA 8 s (12 s)``. The line never exceeds the width it is given: the bar shrinks first,
then the optional parts (throttle, dirty rate, ETA, elapsed time) are left out, so a redrawn line
never wraps and leaves stale rows on an 80-column terminal.
"""

from __future__ import annotations

import shutil
from typing import Any

from dataplane.units import format_bytes

__all__ = ["DISK_PHASES", "progress_line", "terminal_width"]

#: Phases in which the disks are what moves (RAM has not started; ``copy``: a storage migration).
DISK_PHASES = ("preparing", "mirror", "mirror-ready", "copy")
_MIN_BAR = 10
_MAX_BAR = 30


def terminal_width(default: int = 80) -> int:
    """The width of the terminal on stdout (``COLUMNS`` or the tty's), else *default*."""
    return shutil.get_terminal_size((default, 24)).columns


def progress_line(event: dict[str, Any], width: int = 80) -> str | None:
    """The line for one ``progress`` event, at most *width* characters (at least 20 are assumed).

    None when there is nothing to show yet (a RAM phase before QEMU reported its size). Never raises
    on missing or odd members: they count as zero.
    """
    phase = str(event.get("phase") or "?")
    ram_total = _int(event.get("ram_total"))
    if phase in DISK_PHASES or not ram_total:
        if phase not in DISK_PHASES:
            return None
        total, done, rate, what = (_int(event.get("disk_total")), _int(event.get("disk_done")),
                                   _float(event.get("disk_rate")), "disks")
    else:
        total, rate, what = ram_total, _float(event.get("ram_rate")), "RAM"
        done = max(0, total - _int(event.get("ram_remaining")))
    pct = 100.0 * done / total if total else 0.0
    core = f"{pct:5.1f}% {what} {format_bytes(done)}/{format_bytes(total)} {format_bytes(rate)}/s"
    # (drop rank, text): shown in this order; the highest rank goes first when the line is too long
    optional = [(1, f"ETA {(total - done) / rate:.0f} s" if rate > 0 and total > done else "ETA -")]
    if _int(event.get("cpu_throttle")):
        optional.append((2, f"throttle {_int(event.get('cpu_throttle'))}%"))
    if what == "RAM" and _float(event.get("dirty_rate")):
        optional.append((3, f"dirty {format_bytes(_float(event.get('dirty_rate')))}/s"))
    optional.append((4, f"({_float(event.get('elapsed')):.0f} s)"))
    width = max(20, width)
    while True:
        tail = " ".join([core, *(text for _, text in optional)])
        room = width - len(phase) - len(tail) - 4  # "phase [" ... "] " ...
        if room >= _MIN_BAR or not optional:
            break
        optional.remove(max(optional))
    bar = max(0, min(_MAX_BAR, room))
    fill = int(bar * min(pct, 100.0) / 100)
    line = f"{phase} [{'#' * fill}{'.' * (bar - fill)}] {tail}" if bar else f"{phase} {tail}"
    return line[:width]


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0
