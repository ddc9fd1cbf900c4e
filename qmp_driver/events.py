"""Event fan-out with waiters that never hang.

The transports push every QMP event they receive into an :class:`EventHub`.
Callers subscribe *before* they send the command whose consequence they await
(see :meth:`qmp_driver.QemuDriver.expect`), so an event that QEMU emits right
after replying is never missed. When the connection is lost, the hub fails
every subscription at once with :class:`~qmp_driver.errors.ConnectionLost`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConnectionLost, DriverTimeout


@dataclass(frozen=True)
class Event:
    """One QMP event: its name, its ``data`` member and QEMU's timestamp (seconds)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0

    @classmethod
    def from_qmp(cls, msg: dict[str, Any]) -> Event:
        ts = msg.get("timestamp") or {}
        stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        return cls(str(msg.get("event", "")), dict(msg.get("data") or {}), stamp)


Predicate = Callable[[Event], bool]


def match(names: str | Iterable[str] | None = None, **data: Any) -> Predicate:
    """Build a predicate: event name in ``names`` and each ``data`` key equal.

    A data value may also be a set/frozenset/tuple of accepted values, e.g.
    ``match("MIGRATION", status={"completed", "failed"})``.
    """
    wanted = None if names is None else ({names} if isinstance(names, str) else set(names))

    def pred(ev: Event) -> bool:
        if wanted is not None and ev.name not in wanted:
            return False
        for k, v in data.items():
            got = ev.data.get(k)
            if isinstance(v, set | frozenset | tuple):
                if got not in v:
                    return False
            elif got != v:
                return False
        return True

    return pred


class Subscription:
    """A queue of events that match a predicate.

    Use :meth:`wait` to take the next matching event. Events that arrive
    between subscribing and waiting are kept (up to ``maxlen``; the oldest
    are dropped beyond that, and :attr:`dropped` counts them).
    """

    def __init__(self, hub: EventHub, predicate: Predicate, maxlen: int = 4096) -> None:
        self._hub = hub
        self._predicate = predicate
        self._events: deque[Event] = deque()
        self._maxlen = maxlen
        self._wakeup = asyncio.Event()
        self._error: BaseException | None = None
        self.dropped = 0

    def _offer(self, ev: Event) -> None:
        if not self._predicate(ev):
            return
        if len(self._events) >= self._maxlen:
            self._events.popleft()
            self.dropped += 1
        self._events.append(ev)
        self._wakeup.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._wakeup.set()

    def pending(self) -> list[Event]:
        """Events received and not yet taken, oldest first (does not take them)."""
        return list(self._events)

    async def wait(self, timeout: float | None = None) -> Event:
        """Return the next matching event.

        :raises DriverTimeout: nothing matched within ``timeout`` seconds.
        :raises ConnectionLost: the connection was lost (at once, for every waiter).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._events:
                return self._events.popleft()
            if self._error is not None:
                raise ConnectionLost(str(self._error)) from self._error
            self._wakeup.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DriverTimeout(f"no matching event within {timeout:g}s")
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                raise DriverTimeout(f"no matching event within {timeout:g}s") from None

    def close(self) -> None:
        """Stop receiving events (idempotent)."""
        self._hub._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Distributes events to subscriptions; fails them all on disconnect."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._closed: BaseException | None = None
        self._listeners: list[Callable[[Event], None]] = []

    @property
    def closed(self) -> BaseException | None:
        """The error that closed the hub, or None while the connection lives."""
        return self._closed

    def subscribe(self, predicate: Predicate, maxlen: int = 4096) -> Subscription:
        """Register a subscription. If the hub is already closed it fails at once."""
        sub = Subscription(self, predicate, maxlen)
        if self._closed is not None:
            sub._fail(self._closed)
        else:
            self._subs.append(sub)
        return sub

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn(event)`` for every event (for logging and metrics)."""
        self._listeners.append(fn)

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, ev: Event) -> None:
        for fn in list(self._listeners):
            fn(ev)
        for sub in list(self._subs):
            sub._offer(ev)

    def close(self, exc: BaseException) -> None:
        """Fail every present and future subscription with ``exc`` (first call wins)."""
        if self._closed is not None:
            return
        self._closed = exc
        subs, self._subs = self._subs, []
        for sub in subs:
            sub._fail(exc)
