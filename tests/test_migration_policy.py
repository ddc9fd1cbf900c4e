"""The convergence policy and the control protocol, sans-IO (no QEMU, no sockets)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.migration.control import (
    MAX_LINE,
    Abort,
    ControlDecoder,
    ControlError,
    Done,
    Hello,
    Ready,
    encode,
    parse,
)
from dataplane.migration.policy import (
    FAIL,
    NOTE,
    RAISE_THROTTLE,
    SWITCH_POSTCOPY,
    ConvergenceMonitor,
    PolicySettings,
    completion_timeout,
)

MiB = 1 << 20


def _settings(**kw) -> PolicySettings:
    base = dict(auto_converge=True, postcopy=True, stall_window=10.0, stall_min_shrink=0.05,
                completion_timeout=600.0)
    base.update(kw)
    return PolicySettings(**base)


def _run(monitor: ConvergenceMonitor, passes: list[int], pass_seconds: float = 4.0, bulk: int = 256 * MiB,
         throttle: int = 0) -> list:
    """Feed a sawtooth: a bulk pass, then one pass per entry of *passes* (its working set, bytes)."""
    out = []
    t = 0.0
    for sync, peak in enumerate([bulk, *passes], start=1):
        for step in range(8):  # remaining falls within a pass
            t += pass_seconds / 8
            out += monitor.observe(t, int(peak * (1 - step / 8)), sync, throttle, 30 * MiB, 12 * MiB)
    return out


def test_bounded_working_set_that_never_shrinks_switches_to_postcopy():
    mon = ConvergenceMonitor(_settings(), 0.0)
    decisions = _run(mon, [64 * MiB] * 6)
    assert [d.action for d in decisions] == [SWITCH_POSTCOPY]
    assert "64.0 MiB" in decisions[0].reason and "stalled" in decisions[0].reason
    assert decisions[0].elapsed >= 4.0 + 10.0  # the bulk pass plus a full window


def test_shrinking_working_set_is_not_a_stall():
    mon = ConvergenceMonitor(_settings(), 0.0)
    assert _run(mon, [64 * MiB, 40 * MiB, 25 * MiB, 15 * MiB, 9 * MiB, 5 * MiB]) == []


def test_stall_without_postcopy_raises_the_throttle_once_then_notes():
    mon = ConvergenceMonitor(_settings(postcopy=False), 0.0)
    decisions = _run(mon, [64 * MiB] * 12)
    actions = [d.action for d in decisions]
    assert actions[0] == RAISE_THROTTLE and actions.count(RAISE_THROTTLE) == 1
    assert decisions[0].params == {"cpu-throttle-increment": 20}


def test_stall_with_nothing_allowed_notes_then_fails_at_the_timeout():
    mon = ConvergenceMonitor(_settings(postcopy=False, auto_converge=False, completion_timeout=40.0), 0.0)
    decisions = _run(mon, [64 * MiB] * 12)
    actions = [d.action for d in decisions]
    assert NOTE in actions and actions[-1] == FAIL and actions.count(FAIL) == 1
    assert "completion timeout of 40 s" in decisions[-1].reason
    assert "no way to converge" in decisions[actions.index(NOTE)].reason


def test_throttle_changes_are_reported():
    mon = ConvergenceMonitor(_settings(), 0.0)
    assert mon.observe(1.0, MiB, 1, 0) == []
    d = mon.observe(2.0, MiB, 1, 20)
    assert [x.action for x in d] == [NOTE] and "started" in d[0].reason and "20 %" in d[0].reason
    d = mon.observe(3.0, MiB, 1, 30)
    assert "raised" in d[0].reason
    assert mon.observe(4.0, MiB, 1, 30) == []


def test_completion_timeout_scales_with_size():
    assert completion_timeout(60, 30, 512 * MiB) == 90  # at least one GiB's worth
    assert completion_timeout(60, 30, 4 << 30) == 180


# -------------------------------------------------------------------------------- control protocol


def test_control_round_trip_split_anywhere():
    wire = encode(Hello(1, {"disks": []})) + encode(Ready(multifd=2, postcopy=False))
    for cut in range(len(wire) + 1):
        dec = ControlDecoder()
        msgs = dec.feed(wire[:cut]) + dec.feed(wire[cut:])
        assert [m.type for m in msgs] == ["hello", "ready"]
        assert msgs == [Hello(1, {"disks": []}), Ready(2, False)]
        assert dec.pending == 0


@pytest.mark.parametrize("line, why", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "JSON object"),
    (b'{"no": "type"}\n', "JSON object"),
    (b'{"type": "launch"}\n', "unknown control message type"),
    (b'{"type": "done"}\n', "'done' lacks 'status'"),
    (b'{"type": "ready", "multifd": "2", "postcopy": false}\n', "'multifd' must be int, got str"),
    (b'{"type": "ready", "multifd": true, "postcopy": false}\n', "'multifd' must be int, got bool"),
    (b'{"type": "hello", "version": 1, "plan": []}\n', "'plan' must be dict"),
    (b'{"type": "abort", "reason": null}\n', "'reason' must be str"),
])
def test_control_garbage_is_refused(line, why):
    with pytest.raises(ControlError, match=why):
        ControlDecoder().feed(line)


def test_control_line_length_is_bounded():
    dec = ControlDecoder()
    with pytest.raises(ControlError, match="longer than"):
        for _ in range(MAX_LINE // 65536 + 1):
            dec.feed(b"x" * 65536)
    assert dec.pending <= MAX_LINE + 65536
    with pytest.raises(ValueError):
        encode(Abort("x" * MAX_LINE))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_control_decoder_never_crashes(data):
    dec = ControlDecoder()
    try:
        for m in dec.feed(data):
            assert isinstance(m.type, str) and parse({"type": m.type, **vars(m)}) == m
    except ControlError:
        pass
    assert dec.pending < MAX_LINE


def test_control_messages_are_json_lines():
    line = encode(Abort("the source was interrupted"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"type": "abort", "reason": "the source was interrupted"}
    # members a newer peer adds are ignored
    assert ControlDecoder().feed(b'{"type":"done","status":"paused","extra":1}\n') == [Done("paused")]


class _Stream:
    """Stands in for a ChannelStream: the control stream only acknowledges what it consumed."""

    def __init__(self) -> None:
        self.reset_reason: str | None = None

    def consumed(self, n: int) -> None:
        pass

    def reset(self, reason: str) -> None:
        self.reset_reason = reason


async def test_a_peer_flooding_the_control_stream_loses_it():
    """More unread messages than the inbox holds end the conversation (ControlLost), not the memory."""
    from dataplane.migration.cclm import ControlStream
    from dataplane.migration.control_stream import MAX_INBOX
    from dataplane.migration.errors import ControlLost

    control = ControlStream()
    stream = _Stream()
    control.stream = stream  # type: ignore[assignment]
    control.on_data(stream, encode(Abort("x")) * (MAX_INBOX // 2))  # accepted
    control.on_data(stream, encode(Abort("x")) * MAX_INBOX)  # one batch too many
    assert stream.reset_reason is not None and "unread" in stream.reset_reason
    for _ in range(MAX_INBOX // 2):
        assert control.poll() == Abort("x")
    with pytest.raises(ControlLost, match="unread"):
        control.poll()


@pytest.mark.parametrize("steps", range(6))
async def test_control_watcher_cancelled_at_any_step_loses_no_message(steps):
    # The source's watcher is cancelled the moment its QEMU completes, just before the commit; the
    # destination's "abort" may be in flight at that instant: the watcher either raised it, or it
    # stays readable for the wait after the commit. It is never swallowed.
    import asyncio
    from types import SimpleNamespace

    from dataplane.migration.cclm import ControlStream
    from dataplane.migration.cclm_source import _watch_peer
    from dataplane.migration.control import Abort
    from dataplane.migration.errors import PeerAborted

    control = ControlStream()
    client = SimpleNamespace(done=asyncio.get_running_loop().create_future())
    watch = asyncio.ensure_future(_watch_peer(control, client, None))
    await asyncio.sleep(0)
    control.on_data(_Stream(), encode(Abort("gone")))
    for _ in range(steps):
        await asyncio.sleep(0)
    watch.cancel()
    (result,) = await asyncio.gather(watch, return_exceptions=True)
    if not isinstance(result, PeerAborted):
        assert isinstance(result, asyncio.CancelledError), result
        assert (await control.recv(1.0)) == Abort("gone")
    with pytest.raises(TimeoutError):
        await control.recv(0.01)
