"""Build script for the native kernels.

Every ``ext/<name>.pyx`` is compiled into the extension module
``dataplane.native.<name>``. Two kernels link a system library through its C
API: ``codec`` the system liblz4 (``liblz4-dev``), ``checksum`` the system
libxxhash (``libxxhash-dev``).

Compiler baseline: ``-O3 -march=x86-64-v2`` on x86-64 (SSE4.2/POPCNT, every
x86 server CPU since 2009). Wider kernels (AVX2) are chosen at run time by
GCC function multi-versioning, so one build runs everywhere.
Set ``DATAPLANE_MARCH`` to override the baseline (for example ``native``).

There is no pure-Python fallback: if a kernel does not build, installation
fails with a message that says what is missing.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_DIR = ROOT / "ext"


def fail(msg: str) -> None:
    sys.stderr.write(f"\n*** dataplane: cannot build the native kernels: {msg}\n\n")
    raise SystemExit(1)


#: Extension -> (pkg-config name, Debian package) of the system library it links.
SYSTEM_LIBS = {"codec": ("liblz4", "liblz4-dev"), "checksum": ("libxxhash", "libxxhash-dev")}


def pkg_flags(pkg: str) -> tuple[list[str], list[str], list[str]] | None:
    """Return (include_dirs, library_dirs, libraries) for the system library *pkg*, or None if not found."""
    try:
        cflags = subprocess.check_output(["pkg-config", "--cflags", pkg], text=True,
                                         stderr=subprocess.DEVNULL).split()
        libs = subprocess.check_output(["pkg-config", "--libs", pkg], text=True,
                                       stderr=subprocess.DEVNULL).split()
    except subprocess.CalledProcessError:
        return None
    inc = [f[2:] for f in cflags if f.startswith("-I")]
    libdirs = [f[2:] for f in libs if f.startswith("-L")]
    names = [f[2:] for f in libs if f.startswith("-l")]
    return inc, libdirs, names


def system_libs(stems: list[str]) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """Build flags of the system libraries the kernels *stems* link; fails naming every missing package."""
    wanted = {stem: SYSTEM_LIBS[stem] for stem in stems if stem in SYSTEM_LIBS}
    apt = " ".join(sorted(deb for _, deb in wanted.values()))
    if wanted and shutil.which("pkg-config") is None:
        fail(f"pkg-config is not installed (apt-get install pkg-config {apt})")
    found = {stem: pkg_flags(pkg) for stem, (pkg, _) in wanted.items()}
    missing = sorted(wanted[stem] for stem, flags in found.items() if flags is None)
    if missing:
        names = ", ".join(pkg for pkg, _ in missing)
        debs = " ".join(deb for _, deb in missing)
        fail(f"the system {names} not found by pkg-config (apt-get install {debs})")
    return {stem: flags for stem, flags in found.items() if flags is not None}


def compile_args() -> list[str]:
    args = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function", "-Wno-unreachable-code"]
    march = os.environ.get("DATAPLANE_MARCH")
    if march:
        args.append(f"-march={march}")
    elif platform.machine() in ("x86_64", "AMD64"):
        args.append("-march=x86-64-v2")
    return args


class StrictBuildExt(build_ext):
    """build_ext that turns any failure into one clear, fatal message."""

    def run(self) -> None:
        try:
            super().run()
        except SystemExit:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised as a fatal, explained error
            fail(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            fail(f"extension {ext.name} failed to compile: {exc}")


def extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        fail("Cython is not installed (pip install 'Cython>=3.0')")
    sources = sorted(EXT_DIR.glob("*.pyx"))
    if not sources:
        fail(f"no Cython sources in {EXT_DIR}")
    flags = system_libs([src.stem for src in sources])
    exts = []
    for src in sources:
        inc, libdirs, libs = flags.get(src.stem, ([], [], []))
        exts.append(Extension(
            f"dataplane.native.{src.stem}",
            [str(src.relative_to(ROOT))],
            include_dirs=[str(EXT_DIR), *inc],
            library_dirs=libdirs,
            libraries=libs,
            extra_compile_args=compile_args(),
        ))
    return cythonize(
        exts,
        include_path=[str(EXT_DIR)],
        quiet=True,  # the compiler directives are in each .pyx file's header
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": StrictBuildExt})
