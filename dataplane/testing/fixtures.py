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
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dataplane.testing.guest import GuestArtifacts, GuestBuildError
from dataplane.testing.guest import build as build_guest
from dataplane.testing.vm import QemuVM, VMSpec, kill_all, pid_alive, qemu_binary, started_pids

__all__ = ["VMFactory", "guest", "qemu_leak_guard", "vm_factory"]

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
