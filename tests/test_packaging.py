"""The package as a user installs it: an sdist and a wheel built from a clean clone, installed into a
fresh virtual environment, whose ``dataplane`` then carries a real cross-cluster migration.

Slow (it compiles the native kernels from the sdist and installs the dependencies into a new venv),
so it runs once, in one test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from dataplane.testing.commands import CLI_ENV, ROOT
from dataplane.testing.net_fixtures import require_netns

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_sdist_and_wheel_install_into_a_fresh_venv_and_migrate(tmp_path: Path) -> None:
    require_netns()
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(ROOT), str(clone)])  # what is committed: no stray build output
    dist = tmp_path / "dist"
    # the sdist first, then the wheel built from the sdist: the sdist must hold everything a build needs
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(clone)])
    sdists, wheels = sorted(dist.glob("dataplane-*.tar.gz")), sorted(dist.glob("dataplane-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(dist.iterdir())
    with tarfile.open(sdists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("setup.py", "pyproject.toml", "ext/codec.pyx", "ext/kernels.pxd", "ext/dp_kernels.h",
                 "dataplane/py.typed", "qmp_driver/py.typed", "dataplane/testing/agent/agent.c"):
        assert need in names, f"the sdist lacks {need}"
    with zipfile.ZipFile(wheels[0]) as whl:
        wnames = set(whl.namelist())
    assert any(n.startswith("dataplane/native/codec.") and n.endswith(".so") for n in wnames), wnames
    assert {"dataplane/py.typed", "qmp_driver/py.typed", "dataplane/native/codec.pyi"} <= wnames

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py, cli = venv / "bin" / "python", venv / "bin" / "dataplane"
    _run([str(py), "-m", "pip", "install", "-q", str(wheels[0])], timeout=900)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    version = _run([str(cli), "--version"], env=env, cwd=tmp_path).stdout
    assert version.startswith("dataplane "), version
    code = "import dataplane, dataplane.native.codec as c; print(dataplane.__file__, c.__file__)"
    where = _run([str(py), "-c", code], env=env, cwd=tmp_path).stdout
    assert str(venv) in where and str(ROOT) not in where, where

    # a real migration whose two roles are the installed command (the harness comes from the checkout)
    test = "tests/test_cclm_e2e.py::test_two_disks_raw_qcow2_multifd[primary]"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          cwd=ROOT, env={**os.environ, CLI_ENV: str(cli)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
