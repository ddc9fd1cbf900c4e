"""The decision of `dataplane resolve` (sans-IO): exactly one copy may run afterwards, and what
cannot be done safely is refused."""

from __future__ import annotations

import pytest

from dataplane.migration.resolve import (
    ABORT,
    COMMIT,
    DESTINATION,
    NONE,
    REFUSE,
    SOURCE,
    SideState,
    acts,
    decide,
    decide_alone,
)


def src(status: str, migration: str) -> SideState:
    return SideState(SOURCE, status, migration)


def dst(status: str, migration: str) -> SideState:
    return SideState(DESTINATION, status, migration)


@pytest.mark.parametrize(("source", "destination", "action", "outcome"), [
    (src("running", "failed"), dst("running", "completed"), REFUSE, "in-doubt"),
    (src("postmigrate", "completed"), dst("running", "completed"), NONE, "completed"),
    (src("running", "failed"), dst("paused", "completed"), NONE, "rolled-back"),
    (src("postmigrate", "completed"), dst("paused", "completed"), COMMIT, "completed"),
    (src("finish-migrate", "postcopy-active"), dst("paused", "postcopy-active"), COMMIT, "completed"),
    (src("finish-migrate", "postcopy-paused"), dst("inmigrate", "active"), REFUSE, "in-doubt"),
    (src("postmigrate", "completed"), dst("inmigrate", "active"), ABORT, "rolled-back"),
    (src("postmigrate", "completed"), dst("unreachable", "unknown"), REFUSE, "in-doubt"),
    (src("finish-migrate", "pre-switchover"), dst("inmigrate", "active"), ABORT, "rolled-back"),
    (src("finish-migrate", "pre-switchover"), dst("paused", "completed"), ABORT, "rolled-back"),
    (src("unreachable", "unknown"), dst("inmigrate", "active"), REFUSE, "in-doubt"),
    (src("unreachable", "unknown"), dst("paused", "completed"), REFUSE, "in-doubt"),
])
def test_decide(source, destination, action, outcome):
    r = decide(source, destination)
    assert (r.action, r.outcome) == (action, outcome), r
    # whoever acts, the other stays as it is: never both running afterwards
    if r.action == COMMIT:
        assert acts(DESTINATION, r) and not acts(SOURCE, r) and not source.running
    if r.action == ABORT:
        assert acts(SOURCE, r) and not acts(DESTINATION, r) and not destination.running


@pytest.mark.parametrize(("me", "action"), [
    (src("postmigrate", "completed"), ABORT),
    (src("finish-migrate", "postcopy-active"), REFUSE),
    (src("running", "failed"), NONE),
    (dst("paused", "completed"), COMMIT),
    (dst("paused", "postcopy-active"), COMMIT),
    (dst("inmigrate", "active"), REFUSE),
    (dst("running", "completed"), NONE),
])
def test_decide_alone(me, action):
    assert decide_alone(me).action == action
