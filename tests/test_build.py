"""The native kernels are compiled extensions, and a broken build fails loudly."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dataplane.native.bitmap
import dataplane.native.checksum
import dataplane.native.codec
import dataplane.native.zero

REPO = Path(__file__).resolve().parent.parent


def test_kernels_are_compiled_extensions():
    native = dataplane.native
    for mod in (native.zero, native.bitmap, native.codec, native.checksum):
        assert mod.__file__ is not None
        assert mod.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), mod.__file__


def test_codec_links_the_system_liblz4():
    so = dataplane.native.codec.__file__
    out = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
    assert "liblz4.so" in out, out


def test_checksum_links_the_system_libxxhash():
    so = dataplane.native.checksum.__file__
    out = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
    assert "libxxhash.so" in out, out


def test_build_without_pkg_config_fails_with_a_clear_message(tmp_path):
    # A PATH holding only the Python interpreter: no pkg-config to find liblz4.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python3")
    env = {"PATH": str(bindir), "HOME": str(tmp_path)}
    r = subprocess.run([str(bindir / "python3"), "setup.py", "build_ext", "--build-temp", str(tmp_path / "b"),
                        "--build-lib", str(tmp_path / "l")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "cannot build the native kernels" in r.stderr and "pkg-config" in r.stderr, r.stderr
    assert shutil.which("pkg-config"), "the real environment does have pkg-config"


def test_build_names_every_missing_library_at_once(tmp_path):
    # pkg-config is there but finds nothing: both system libraries are reported in one message.
    env = {**os.environ, "PKG_CONFIG_LIBDIR": str(tmp_path), "PKG_CONFIG_PATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "b"),
                        "--build-lib", str(tmp_path / "l")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "apt-get install liblz4-dev libxxhash-dev" in r.stderr, r.stderr
