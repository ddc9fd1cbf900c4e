"""Run every benchmark suite and print the RATIO lines next to their goals.

Usage: ``python -m benches [pytest args]``, e.g. ``python -m benches -k codec``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def main() -> int:
    here = Path(__file__).resolve().parent
    args = [str(here), "-p", "no:cacheprovider", "--benchmark-columns=min,median,max,ops",
            "--benchmark-sort=name", "-q", *sys.argv[1:]]
    return pytest.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
