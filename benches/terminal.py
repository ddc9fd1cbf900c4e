"""Print benchmark figures straight to the terminal, past pytest's output capture."""

from __future__ import annotations

import pytest


def say(capsys: pytest.CaptureFixture[str], *lines: str) -> None:
    """Print *lines*, indented, after an empty line (pytest -q would swallow them otherwise)."""
    with capsys.disabled():
        print()
        for line in lines:
            print(f"  {line}")
