"""Suite-wide configuration.

``DATAPLANE_REQUIRE_E2E=1`` (set by ``.ci/run``) turns every skipped test into
a failure, so an end-to-end test that cannot run in CI is never silently lost.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_E2E = os.environ.get("DATAPLANE_REQUIRE_E2E", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_E2E and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped test is an error under DATAPLANE_REQUIRE_E2E=1: {reason}"

# Fixtures for tests that run the real test guest under QEMU (guest, vm_factory, qemu_leak_guard).
from dataplane.testing.fixtures import *  # noqa: E402, F401, F403

# Fixtures for tests that need real namespaces joined by veth (link, link_factory, netns_leak_guard).
from dataplane.testing.net_fixtures import *  # noqa: E402, F401, F403
