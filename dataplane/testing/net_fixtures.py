"""pytest fixtures for tests that need real "clusters": network namespaces joined by a veth pair.

Made available to the suite by ``tests/conftest.py``
(``from dataplane.testing.net_fixtures import *``):

``link``           function: a started :class:`~dataplane.testing.netns.Link`
                   with no rate limit; deleted at teardown, pass or fail
``link_factory``   function: ``link_factory(rate=None, **kwargs)`` returns a
                   started Link (keywords as :class:`Link`); every link it
                   made is deleted at teardown. Successive links get distinct
                   subnets (10.200.0.0/30, 10.200.0.4/30, ...) unless
                   ``subnet=`` is given
``netns_leak_guard`` session, autouse: at the end of the session, fails if a
                   namespace created by this process is still there (and
                   deletes it)

Both skip (a failure under ``DATAPLANE_REQUIRE_E2E=1``) when not root or
when ``ip netns`` is unavailable; stale namespaces of dead test runs are
swept when a link starts. Tests using them should be marked
``@pytest.mark.e2e``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dataplane.testing.netns import Link, NetnsError, close_all, netns_unavailable_reason

__all__ = ["LinkFactory", "link", "link_factory", "netns_leak_guard"]

LinkFactory = Callable[..., Link]


def require_netns() -> None:
    """Skip the calling test when this machine cannot make network namespaces (an error in CI)."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


@pytest.fixture
def link_factory() -> Iterator[LinkFactory]:
    """Factory of started :class:`Link` objects, ``link_factory(rate=None, **kwargs)``; deleted at teardown.

    Raises NetnsError (the failing command and its stderr) if a link cannot
    be built although namespaces are available.
    """
    require_netns()
    links: list[Link] = []

    def factory(rate: int | float | str | None = None, **kwargs: Any) -> Link:
        if "subnet" not in kwargs:
            base = ipaddress.ip_network("10.200.0.0/30")
            kwargs["subnet"] = str(ipaddress.ip_network((int(base.network_address) + 4 * len(links), 30)))
        lk = Link(rate, **kwargs)
        links.append(lk)
        return lk.start()

    try:
        yield factory
    finally:
        errors = []
        for lk in links:
            try:
                lk.close()
            except NetnsError as exc:
                errors.append(str(exc))
        if errors:
            pytest.fail(f"link cleanup failed: {'; '.join(errors)}", pytrace=False)


@pytest.fixture
def link(link_factory: LinkFactory) -> Link:
    """A started, unshaped :class:`Link` (``link.ns_a``/``link.ns_b``, ``link.addr_a``/``link.addr_b``)."""
    return link_factory()


@pytest.fixture(scope="session", autouse=True)
def netns_leak_guard() -> Iterator[None]:
    """At session end: fail if a namespace made by this process is still there (then delete it)."""
    yield
    leaked = close_all()
    if leaked:
        pytest.fail(f"network namespaces outlived the tests that created them: {leaked}", pytrace=False)
