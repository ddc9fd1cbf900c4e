"""The package as a node installs it: the steps of ``packaging/Containerfile`` (an sdist and a wheel built
from the files it copies out of a clean clone, a wheel of every dependency, those wheels installed into a
fresh venv from nowhere else), then the installed ``dataplane`` carries a real cross-cluster migration and
serves as ``packaging/dataplane.service`` starts it.

Slow (it compiles the native kernels from the sdist and installs the dependencies into a new venv), so the
install is made once per module, by the ``installed`` fixture.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataplane.testing.commands import CLI_ENV, ROOT
from dataplane.testing.net_fixtures import require_netns

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

CONTAINERFILE = ROOT / "packaging" / "Containerfile"
UNIT = ROOT / "packaging" / "dataplane.service"
#: Where the image and the unit have the venv.
VENV = "/opt/dataplane"


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) of a Containerfile: continuation lines joined, comments skipped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not those ``--from`` another stage)."""
    out: list[tuple[list[str], str]] = []
    for word, args in _instructions(path):
        argv = shlex.split(args)
        if word != "COPY" or any(a.startswith("--from") for a in argv):
            continue
        *sources, dest = [a for a in argv if not a.startswith("--")]
        out.append((sources, dest))
    return out


def _unit(path: Path) -> dict[str, list[str]]:
    """The directives of a systemd unit, ``"Section.Key"`` -> its values in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a directive: {line!r}"
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def _one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


@dataclass(frozen=True)
class Installed:
    sdist: Path
    wheel: Path
    venv: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The Containerfile's build and install steps, outside a container (``--no-isolation``: the build
    requirements come from this venv rather than from an isolated one)."""
    tmp = tmp_path_factory.mktemp("packaging")
    clone = tmp / "clone"
    _run(["git", "clone", "-q", str(ROOT), str(clone)])  # what is committed: no stray build output
    context = tmp / "src"  # the image's WORKDIR: only what the Containerfile copies
    for sources, dest in _copies(CONTAINERFILE):
        assert dest.endswith("/"), f"COPY {sources} {dest}: a destination directory, please"
        target = context / dest
        for src in sources:
            if (clone / src).is_dir():
                shutil.copytree(clone / src, target, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(clone / src, target / Path(src).name)
    dist, wheels = tmp / "dist", tmp / "wheels"
    # the sdist first, then the wheel built from the sdist: the sdist must hold everything a build needs
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(context)])
    sdists, built = sorted(dist.glob("dataplane-*.tar.gz")), sorted(dist.glob("dataplane-*.whl"))
    assert len(sdists) == 1 and len(built) == 1, list(dist.iterdir())
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    _run([*pip, "wheel", "-q", "--wheel-dir", str(wheels), str(built[0])], timeout=900)
    _run([*pip, "install", "-q", "--no-index", "--find-links", str(wheels), "dataplane"], timeout=300)
    return Installed(sdists[0], built[0], venv)


def _clean_env() -> dict[str, str]:
    """This environment without the checkout on PYTHONPATH: an installed command runs its own package."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_sdist_and_wheel_install_into_a_fresh_venv_and_migrate(request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    require_netns()
    inst: Installed = request.getfixturevalue("installed")
    with tarfile.open(inst.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("setup.py", "pyproject.toml", "ext/codec.pyx", "ext/kernels.pxd", "ext/dp_kernels.h",
                 "dataplane/py.typed", "qmp_driver/py.typed", "dataplane/testing/agent/agent.c"):
        assert need in names, f"the sdist lacks {need}"
    with zipfile.ZipFile(inst.wheel) as whl:
        wnames = set(whl.namelist())
    assert any(n.startswith("dataplane/native/codec.") and n.endswith(".so") for n in wnames), wnames
    assert {"dataplane/py.typed", "qmp_driver/py.typed", "dataplane/native/codec.pyi"} <= wnames

    py, cli = inst.venv / "bin" / "python", inst.venv / "bin" / "dataplane"
    env = _clean_env()
    version = _run([str(cli), "--version"], env=env, cwd=tmp_path).stdout
    assert version.startswith("dataplane "), version
    code = "import dataplane, dataplane.native.codec as c; print(dataplane.__file__, c.__file__)"
    where = _run([str(py), "-c", code], env=env, cwd=tmp_path).stdout
    assert str(inst.venv) in where and str(ROOT) not in where, where

    # a real migration whose two roles are the installed command (the harness comes from the checkout)
    test = "tests/test_cclm_e2e.py::test_two_disks_raw_qcow2_multifd[primary]"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          cwd=ROOT, env={**os.environ, CLI_ENV: str(cli)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_containerfile_copies_only_committed_files() -> None:
    copies = _copies(CONTAINERFILE)
    assert copies, "no COPY from the build context"
    for sources, _ in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"the Containerfile copies {src}, which is not there"
            tracked = _run(["git", "ls-files", "--", src], cwd=ROOT).stdout
            assert tracked.strip(), f"the Containerfile copies {src}, which git does not track"


def test_the_image_and_the_unit_start_the_same_command() -> None:
    found = dict(_instructions(CONTAINERFILE))  # the last of each: the runtime stage's
    image = json.loads(found["ENTRYPOINT"]) + json.loads(found["CMD"])
    assert image == shlex.split(_one(_unit(UNIT), "Service.ExecStart")), image
    assert image[0] == f"{VENV}/bin/dataplane", image


def test_the_unit_passes_systemd_analyze_verify(installed: Installed, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = tmp_path / UNIT.name  # its ExecStart on the installed venv, which verify requires to exist
    unit.write_text(UNIT.read_text().replace(VENV, str(installed.venv)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


def _get(path: Path, url: str) -> tuple[int, object]:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _await_output(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    """Read ``proc``'s stderr until it holds ``needle``; fails if it ends or ``timeout`` s pass first."""
    assert proc.stderr is not None
    fd, seen = proc.stderr.fileno(), b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} within {timeout} s: {seen!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"ended ({proc.wait()}) before {needle!r}: {seen!r}"
            seen += chunk
    return seen


@pytest.fixture
def reaped() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, killed at teardown if they still run."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_installed_daemon_runs_as_the_unit_starts_it(installed: Installed, tmp_path: Path,
                                                         reaped: list[subprocess.Popen[bytes]]) -> None:
    unit = _unit(UNIT)
    runtime = Path("/run") / _one(unit, "Service.RuntimeDirectory")
    here = tmp_path / "run" / runtime.name  # what systemd makes of RuntimeDirectory= before the start
    here.mkdir(parents=True, mode=int(_one(unit, "Service.RuntimeDirectoryMode"), 8))

    state = Path("/var/lib") / _one(unit, "Service.StateDirectory")
    kept = tmp_path / "lib" / state.name  # and of StateDirectory=

    def local(text: str) -> str:
        return text.replace(VENV, str(installed.venv)).replace(str(runtime), str(here)).replace(str(state),
                                                                                               str(kept))

    argv = [local(word) for word in shlex.split(_one(unit, "Service.ExecStart"))]
    api = argv[argv.index("--api") + 1]
    assert api.startswith(f"unix:{here}/"), f"the unit's API socket is not in its RuntimeDirectory: {api}"
    sock = Path(api.removeprefix("unix:"))
    env = _clean_env()
    for assignment in unit.get("Service.Environment", []):
        name, _, value = local(assignment).partition("=")
        env[name] = value

    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    reaped.append(proc)
    _await_output(proc, b"serve listening on", 30)
    assert _get(sock, "/healthz")[0] == 200
    assert _get(sock, "/readyz")[0] == 200
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert b"SIGTERM received" in err, err
    assert not sock.exists(), "the daemon left its socket behind"
