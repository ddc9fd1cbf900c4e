"""Small asyncio helpers that every layer uses, written once.

The pattern "wait for the first of several things, then cancel and collect what is left" is easy to
get subtly wrong (a task left running, an exception never retrieved, a cancellation swallowed).
:func:`first_done` waits; :func:`cancel_and_collect` cleans up. Imports nothing of the project.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["cancel_and_collect", "first_done", "run_shielded", "task_exception"]


async def cancel_and_collect(*futures: asyncio.Future[Any] | None) -> None:
    """Cancel every one of *futures* that is not done, and wait until all of them have ended.

    Their results and exceptions are retrieved and dropped (``None`` entries are skipped). Raises
    only :class:`asyncio.CancelledError`, when the caller itself is cancelled meanwhile.
    """
    live = [f for f in futures if f is not None]
    for f in live:
        if not f.done():
            f.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)


async def first_done(*aws: Awaitable[Any], timeout: float | None = None) -> set[asyncio.Future[Any]]:
    """Wait until the first of *aws* is done (or *timeout* seconds pass); return the done ones.

    Futures and tasks passed in belong to the caller: they are left running. Coroutines are wrapped
    in tasks that this call owns: those still running when it returns are cancelled and collected,
    so that nothing outlives the call. On a timeout the returned set is empty. Raises
    :class:`asyncio.CancelledError` (after the clean-up) when the caller is cancelled.
    """
    owned: list[asyncio.Future[Any]] = []
    futures: list[asyncio.Future[Any]] = []
    for aw in aws:
        if asyncio.isfuture(aw):
            futures.append(aw)
        else:
            task = asyncio.ensure_future(aw)
            owned.append(task)
            futures.append(task)
    try:
        done, _ = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_collect(*(t for t in owned if not t.done()))
        for t in owned:  # an owned task's exception is the caller's to read in ``done``, never "unretrieved"
            if t.done() and not t.cancelled():
                t.exception()
    return done


async def run_shielded(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile; the cancellation is then
    delivered afterwards (:class:`asyncio.CancelledError`). Raises what ``aw`` raises."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        task.result()
        raise asyncio.CancelledError
    return task.result()


def task_exception(task: asyncio.Future[Any]) -> BaseException | None:
    """The exception a finished task raised (None if it returned or was cancelled)."""
    return None if task.cancelled() else task.exception()
