"""Bandwidth cap: a token bucket with an injected clock, for the driver to pace its writes.

Usage in a driver: before writing *n* bytes, ``wait = bucket.take(n, now)``;
write, then sleep *wait* seconds before the next write. ``take`` lets the
bucket go into debt, so a single write larger than the burst is allowed and
simply paid for by a longer wait: the long-run rate never exceeds ``rate``.
"""

from __future__ import annotations


class TokenBucket:
    """Token bucket: *rate* bytes/s refill, at most *burst* bytes banked.

    ``rate`` None (or 0) means unlimited. *burst* defaults to 100 ms worth of
    rate (at least 64 KiB). Raises ValueError for negative values.
    """

    __slots__ = ("_rate", "_burst", "_tokens", "_t")

    def __init__(self, rate: float | None, burst: float | None = None, *, now: float = 0.0) -> None:
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._t = now
        self._configure(rate, burst)
        self._tokens = self._burst

    @property
    def rate(self) -> float | None:
        """Current rate in bytes/s, None when unlimited."""
        return self._rate or None

    @property
    def burst(self) -> float:
        """Maximum bytes banked."""
        return self._burst

    def _configure(self, rate: float | None, burst: float | None) -> None:
        if rate is not None and rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        if burst is not None and burst <= 0:
            raise ValueError(f"burst must be > 0, got {burst}")
        self._rate = float(rate or 0.0)
        if burst is None:
            burst = max(self._rate / 10.0, 64 * 1024.0)
        self._burst = float(burst)

    def _refill(self, now: float) -> None:
        dt = now - self._t
        if dt > 0:
            self._tokens = min(self._burst, self._tokens + dt * self._rate)
            self._t = now

    def set_rate(self, rate: float | None, now: float, burst: float | None = None) -> None:
        """Change the rate (and optionally the burst) from time *now* on; None/0 = unlimited.

        Tokens earned so far at the old rate are kept (capped at the new
        burst); an existing debt is kept too. Raises ValueError for negative values.
        """
        self._refill(now)
        self._configure(rate, burst)
        self._tokens = min(self._tokens, self._burst)

    def available(self, now: float) -> float:
        """Bytes that could be sent at *now* without waiting (negative while in debt)."""
        if not self._rate:
            return float("inf")
        self._refill(now)
        return self._tokens

    def take(self, n: int, now: float) -> float:
        """Spend *n* bytes at time *now*; return how many seconds to wait before sending more.

        Raises ValueError for negative *n*.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not self._rate:
            return 0.0
        self._refill(now)
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
