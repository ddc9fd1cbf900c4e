"""Collect RATIO lines and print them, in one block, at the end of a run.

Every benchmark figure is a ratio against a reference measured in the same run.
The line format is fixed (other tools parse it)::

    RATIO <name> <measured> goal <goal>

where ``<goal>`` is written ``>=X`` or ``<=X``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ratio:
    name: str
    measured: float
    op: str  # ">=" or "<="
    goal: float
    note: str = ""

    @property
    def met(self) -> bool:
        return self.measured >= self.goal if self.op == ">=" else self.measured <= self.goal

    def line(self) -> str:
        return f"RATIO {self.name} {self.measured:.3f} goal {self.op}{self.goal:g}"


_RATIOS: list[Ratio] = []


def record(name: str, measured: float, goal: str, note: str = "") -> Ratio:
    """Record a ratio; ``goal`` is a string such as ``">=1.3"`` or ``"<=1.02"``."""
    op, value = goal[:2], float(goal[2:])
    if op not in (">=", "<="):
        raise ValueError(f"goal must start with >= or <=: {goal!r}")
    r = Ratio(name, float(measured), op, value, note)
    _RATIOS.append(r)
    out = os.environ.get("DATAPLANE_RATIO_FILE")
    if out:
        with Path(out).open("a") as f:
            f.write(json.dumps(asdict(r)) + "\n")
    return r


def collected() -> list[Ratio]:
    return list(_RATIOS)
