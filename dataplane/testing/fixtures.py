"""pytest fixtures for tests that run the real test guest under QEMU.

Made available to the suite by ``tests/conftest.py``
(``from dataplane.testing.fixtures import *``):

``guest``              session: the built (or cached) guest artefacts; skips
                       with the reason if QEMU is missing or the guest cannot
                       be built (``DATAPLANE_REQUIRE_E2E=1`` makes that a failure)
``vm_factory``         function: ``vm_factory(spec=None, *, start=True, name=None, **spec_fields)``
                       returns a started :class:`~dataplane.testing.vm.QemuVM`
                       in a directory of its own under ``tmp_path``; every VM
                       it made is killed at teardown, pass or fail
``qemu_leak_guard``    session, autouse: at the end of the session, fails if
                       any QEMU started by this process is still running
``qemu_platform``      function, parametrized ``primary`` / ``floor``: runs the
                       test once on the primary QEMU and once on the QEMU 7.2
                       floor (``DATAPLANE_QEMU`` pointed at the unpacked 7.2);
                       ``qemu_platform.check(vm)`` asserts which QEMU a VM runs
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dataplane.testing.guest import GuestArtifacts, GuestBuildError
from dataplane.testing.guest import build as build_guest
from dataplane.testing.vm import (
    FLOOR_QEMU_VERSION,
    QEMU_ENV,
    QemuVM,
    VMSpec,
    binary_version,
    floor_qemu_binary,
    kill_all,
    pid_alive,
    qemu_binary,
    started_pids,
)

__all__ = ["QemuPlatform", "VMFactory", "guest", "qemu_leak_guard", "qemu_platform", "vm_factory"]

VMFactory = Callable[..., QemuVM]


@pytest.fixture(scope="session")
def guest() -> GuestArtifacts:
    """The test guest's kernel and initramfs (built on first use, then cached).

    Skips (a failure under DATAPLANE_REQUIRE_E2E=1) if qemu-system-x86_64 is
    missing or the guest cannot be built, with the reason.
    """
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    try:
        return build_guest(log=lambda msg: print(f"[guest] {msg}"))
    except GuestBuildError as exc:
        pytest.skip(f"the test guest cannot be built: {exc}")


@pytest.fixture
def vm_factory(guest: GuestArtifacts, tmp_path: Path) -> Iterator[VMFactory]:
    """Factory of started QEMU VMs running the test guest; kills them all at teardown.

    ``vm_factory(VMSpec(...))`` or ``vm_factory(memory_mib=..., cmdline={...})``
    (keywords override fields of a given spec). ``start=False`` returns the VM
    unstarted; ``name`` names its directory (default ``vm<n>``). Raises
    whatever :meth:`QemuVM.start` raises (VMStartError with QEMU's message).
    """
    vms: list[QemuVM] = []

    def factory(
        spec: VMSpec | None = None, /, *, start: bool = True, name: str | None = None, **fields: object
    ) -> QemuVM:
        if spec is None:
            spec = VMSpec(**fields)  # type: ignore[arg-type]
        elif fields:
            spec = dataclasses.replace(spec, **fields)  # type: ignore[arg-type]
        spec = dataclasses.replace(
            spec,
            kernel=spec.kernel if spec.kernel is not None else guest.kernel,
            initrd=spec.initrd if spec.initrd is not None else guest.initrd,
        )
        vm = QemuVM(spec, tmp_path / (name or f"vm{len(vms)}"))
        vms.append(vm)
        if start:
            vm.start()
        return vm

    try:
        yield factory
    finally:
        for vm in vms:
            vm.kill()


@pytest.fixture(scope="session", autouse=True)
def qemu_leak_guard() -> Iterator[None]:
    """At session end: fail if a QEMU started by this test process is still running (then kill it)."""
    yield
    deadline = time.monotonic() + 5
    leaked = [pid for pid in started_pids() if pid_alive(pid)]
    while leaked and time.monotonic() < deadline:  # give reaping a moment
        time.sleep(0.05)
        leaked = [pid for pid in leaked if pid_alive(pid)]
    kill_all()
    if leaked:
        pytest.fail(f"QEMU processes outlived the tests that started them: pids {leaked}", pytrace=False)


@dataclasses.dataclass(frozen=True)
class QemuPlatform:
    """Which QEMU a test runs on: ``primary`` (PATH or ``DATAPLANE_QEMU``) or ``floor`` (QEMU 7.2)."""

    name: str
    binary: str
    version: str  # X.Y.Z, as the binary reports it

    def check(self, vm: QemuVM) -> None:
        """Assert that *vm* runs this platform's QEMU (so a floor test cannot pass on the primary)."""
        got = vm.qemu_version()
        assert got == self.version, f"{vm!r} runs QEMU {got}, not the {self.name} platform's {self.version}"


@pytest.fixture(params=["primary", "floor"])
def qemu_platform(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> QemuPlatform:
    """Run the test on the primary QEMU and again on the QEMU 7.2 floor.

    The floor is the QEMU of Debian bookworm, unpacked into the cache by ``scripts/qemu-floor.sh``
    (``scripts/setup.sh`` runs it); the test's QEMUs use it through ``DATAPLANE_QEMU``. Skips (a
    failure under DATAPLANE_REQUIRE_E2E=1) if it is not there.
    """
    if request.param == "floor":
        binary = floor_qemu_binary()
        if binary is None:
            pytest.skip(f"the QEMU {FLOOR_QEMU_VERSION} floor is not unpacked: run scripts/qemu-floor.sh")
        monkeypatch.setenv(QEMU_ENV, binary)
    else:
        found = qemu_binary()
        if found is None:
            pytest.skip("qemu-system-x86_64 is not installed")
        binary = found
    version = binary_version(binary)
    if request.param == "floor":
        assert version.startswith(FLOOR_QEMU_VERSION + "."), f"{binary} is QEMU {version}"
    return QemuPlatform(request.param, binary, version)
