"""The demo (``make demo``): a cross-cluster live migration of a small guest that verifies itself.

Both tests run the demo's ``main`` in this process (so the session's QEMU and
namespace leak guards see what it started) with a small guest, and check the
exit status, the verification lines of the report, and that nothing is left
behind: no child process, no work directory.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from dataplane import demo
from dataplane.testing.net_fixtures import require_netns

SMALL = ["--memory", "128", "--dirty-mib", "32", "--dirty-rate", "4",
         "--disk-size", "64", "--disk-data", "16"]
VERIFIED = (
    "ok      heartbeat continued on the destination, same boot id: boot id ",
    "ok      guest RAM verified: 32 MiB checked area verified on the destination (3 checker passes of ",
    "ok      journal verified: journal verifies (",
    "ok      disks identical: jrnl 16 MiB, data 64 MiB",
)


def _children() -> list[int]:
    """Pids of this process's live children."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _run_demo(*args: str) -> tuple[int, str]:
    buf = io.StringIO()
    rc = demo.main([*SMALL, *args], stream=buf)
    return rc, buf.getvalue()


def _check(rc: int, out: str) -> None:
    assert rc == 0, out
    for line in VERIFIED:
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "cross-cluster live migration: completed" in out
    assert re.search(r"downtime +\d+ ms as the guest felt it", out), out
    assert re.search(r"compression ratio +\d+\.\d\d", out), out
    assert "zero pages elided" in out and "demo passed" in out
    assert "migrate: phase precopy" in out, out  # live progress from migrate's JSON events
    workdir = re.search(r"certificates in (\S+)/pki", out)
    assert workdir is not None, out
    assert not Path(workdir.group(1)).exists(), "the work directory was left behind"
    assert _children() == [], "a child process was left behind"


@pytest.mark.e2e
def test_demo_migrates_between_namespaces(qemu_platform, guest) -> None:
    require_netns()
    rc, out = _run_demo("--rate", "1gbit")
    _check(rc, out)
    assert f"source QEMU {qemu_platform.version} started" in out, out
    assert f"destination QEMU {qemu_platform.version} started" in out, out
    assert re.search(r"cluster-a = network namespace dp-a-\S+ \(10\.200\.0\.1\), cluster-b = dp-b-\S+ "
                     r"\(10\.200\.0\.2\); veth veth-a/veth-b, both ends shaped to 1 Gbit/s \(tbf\)", out), out
    assert "2 CAs (cluster-a, cluster-b), cross-trusted" in out
    assert re.search(r"veth bytes +\d", out), out


@pytest.mark.e2e
def test_demo_loopback_mode(guest) -> None:
    rc, out = _run_demo("--loopback", "--json")
    _check(rc, out)
    assert "loopback mode (--loopback was given)" in out
    assert "listening on 127.0.0.1:" in out
    assert "the channel's report (loopback mode: no veth to count)" in out
    last = out.strip().splitlines()[-1]
    assert '"event": "demo", "ok": true, "loopback": true' in last, last
