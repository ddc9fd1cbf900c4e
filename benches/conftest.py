from __future__ import annotations

import pytest

from benches import ratios


@pytest.fixture
def ratio():
    """``ratio(name, measured, goal, note="")`` records one RATIO line."""
    return ratios.record


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    rs = ratios.collected()
    if not rs:
        return
    terminalreporter.section("RATIO")
    for r in rs:
        terminalreporter.write_line(r.line())
    for r in rs:
        if not r.met:
            terminalreporter.write_line(
                f"MISSED {r.name}: {r.measured:.3f} vs goal {r.op}{r.goal:g} {r.note}".rstrip())
