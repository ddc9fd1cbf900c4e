"""How tests, benchmarks and the demo start the ``dataplane`` CLI and the binaries they compare with."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: A ``dataplane`` executable to run instead of the checkout's (an installed wheel's, say).
CLI_ENV = "DATAPLANE_CLI"


def dataplane_argv() -> list[str]:
    """The command that runs the ``dataplane`` CLI: ``$DATAPLANE_CLI`` if set, else the venv's entry
    point, else ``python -m dataplane``."""
    installed = os.environ.get(CLI_ENV)
    if installed:
        return [installed]
    exe = ROOT / ".venv" / "bin" / "dataplane"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dataplane"]


def child_env() -> dict[str, str]:
    """This process's environment with unbuffered output and the checkout on ``PYTHONPATH`` (not
    with ``$DATAPLANE_CLI``: an installed command must run its own installed package)."""
    env = dict(os.environ)
    if not env.get(CLI_ENV):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@functools.cache
def cli_has(*words: str) -> bool:
    """True if ``dataplane <words...> --help`` succeeds (e.g. ``cli_has("migrate")``). Never raises."""
    try:
        proc = subprocess.run([*dataplane_argv(), *words, "--help"], capture_output=True, timeout=60,
                              cwd=ROOT, env=child_env(), check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def stunnel_binary() -> str | None:
    """The stunnel executable (``stunnel4`` on Debian), or None if not installed."""
    return shutil.which("stunnel4") or shutil.which("stunnel")


__all__ = ["CLI_ENV", "ROOT", "child_env", "cli_has", "dataplane_argv", "stunnel_binary"]
