"""The demo (``make demo``) runs end to end on a small guest and verifies itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_runs_and_verifies(guest):
    r = subprocess.run([sys.executable, "-m", "dataplane.demo", "--memory", "128", "--dirty-mib", "32",
                        "--seconds", "0.5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "round trip identical" in out
    assert "one boot" in out and "every acknowledged write" in out
    for step in ("[3/5] zero-page scan", "[4/5] page codec", "[5/5] dirty tracking"):
        assert step in out
