"""Counters of a session and of its streams, and a throughput meter driven by the injected clock.

The session updates these objects in place; read them at any time
(``Session.stats``, ``Session.stream_stats(id)``) or turn them into a dict
with ``as_dict()`` for metrics. Throughput figures are refreshed by
``Session.tick(now)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


class RateMeter:
    """Throughput of a growing byte counter, sampled with an injected clock.

    ``sample(total, now)`` closes an interval once at least ``interval``
    seconds passed since the previous one and folds its rate into an
    exponentially weighted average (``alpha`` weight on the newest interval).
    """

    __slots__ = ("interval", "alpha", "rate", "_t", "_b")

    def __init__(self, interval: float = 1.0, alpha: float = 0.5) -> None:
        self.interval = interval
        self.alpha = alpha
        self.rate = 0.0
        self._t: float | None = None
        self._b = 0

    def sample(self, total: int, now: float) -> float:
        """Record counter value *total* at time *now*; return the current rate in units/s."""
        if self._t is None:
            self._t, self._b = now, total
            return self.rate
        dt = now - self._t
        if dt >= self.interval and dt > 0:
            inst = (total - self._b) / dt
            self.rate = inst if self.rate == 0.0 else self.alpha * inst + (1.0 - self.alpha) * self.rate
            self._t, self._b = now, total
        return self.rate


def _ratio(raw: int, wire: int) -> float:
    return raw / wire if wire else 1.0


@dataclass(slots=True)
class StreamStats:
    """Counters of one stream.

    ``bytes_sent``: application bytes transmitted for the first time;
    ``raw_data_sent`` / ``payload_sent``: bytes in DATA frames before and
    after compression, replays included (their quotient is
    ``compression_ratio``, >1 when compression pays); ``wire_bytes_sent``:
    DATA frame bytes on the wire including headers; ``replayed_bytes``:
    application bytes sent again after a lost connection;
    ``duplicate_bytes``: received bytes dropped as already delivered.
    """

    stream_id: int
    name: str
    bytes_sent: int = 0
    raw_data_sent: int = 0
    payload_sent: int = 0
    wire_bytes_sent: int = 0
    frames_sent: int = 0
    compressed_frames: int = 0
    zero_pages: int = 0
    replayed_bytes: int = 0
    bytes_received: int = 0
    wire_bytes_received: int = 0
    frames_received: int = 0
    duplicate_bytes: int = 0
    compression: str = "off"
    send_rate: float = 0.0
    recv_rate: float = 0.0
    _send_meter: RateMeter = field(default_factory=RateMeter, repr=False)
    _recv_meter: RateMeter = field(default_factory=RateMeter, repr=False)

    @property
    def compression_ratio(self) -> float:
        """Uncompressed over on-the-wire DATA payload bytes sent (1.0 when nothing was sent)."""
        return _ratio(self.raw_data_sent, self.payload_sent)

    def sample(self, now: float) -> None:
        """Refresh ``send_rate`` / ``recv_rate`` (application bytes per second)."""
        self.send_rate = self._send_meter.sample(self.bytes_sent, now)
        self.recv_rate = self._recv_meter.sample(self.bytes_received, now)

    def as_dict(self) -> dict[str, object]:
        """All public counters and the ratio as a dict."""
        out: dict[str, object] = {
            f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["compression_ratio"] = self.compression_ratio
        return out


@dataclass(slots=True)
class SessionStats:
    """Counters of a session (all streams and connections together).

    Byte counters mirror :class:`StreamStats`; ``wire_bytes_sent`` /
    ``wire_bytes_received`` count every byte on every connection (prefaces
    and control frames included). ``reconnects`` counts connections that
    completed their handshake after the session had lost one. RTT figures
    are in seconds from PING/PONG (``rtt`` last sample, ``rtt_min``,
    ``srtt`` smoothed 7/8). ``recv_buffered``/``send_buffered`` are the
    current receive (reorder + unconsumed) and send (replay) memory, with
    their peaks.
    """

    bytes_sent: int = 0
    raw_data_sent: int = 0
    payload_sent: int = 0
    wire_bytes_sent: int = 0
    frames_sent: int = 0
    compressed_frames: int = 0
    zero_pages: int = 0
    replayed_bytes: int = 0
    bytes_received: int = 0
    wire_bytes_received: int = 0
    frames_received: int = 0
    duplicate_bytes: int = 0
    connections: int = 0
    connections_opened: int = 0
    connections_lost: int = 0
    reconnects: int = 0
    streams_opened: int = 0
    streams_closed: int = 0
    streams_reset: int = 0
    pings_sent: int = 0
    pongs_received: int = 0
    rtt: float | None = None
    rtt_min: float | None = None
    srtt: float | None = None
    recv_buffered: int = 0
    recv_buffered_peak: int = 0
    send_buffered: int = 0
    send_buffered_peak: int = 0
    send_rate: float = 0.0
    recv_rate: float = 0.0
    _send_meter: RateMeter = field(default_factory=RateMeter, repr=False)
    _recv_meter: RateMeter = field(default_factory=RateMeter, repr=False)

    @property
    def compression_ratio(self) -> float:
        """Uncompressed over on-the-wire DATA payload bytes sent (1.0 when nothing was sent)."""
        return _ratio(self.raw_data_sent, self.payload_sent)

    def add_rtt(self, rtt: float) -> None:
        """Fold one RTT sample into ``rtt``, ``rtt_min`` and ``srtt``."""
        self.rtt = rtt
        self.rtt_min = rtt if self.rtt_min is None else min(self.rtt_min, rtt)
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt

    def sample(self, now: float) -> None:
        """Refresh ``send_rate`` / ``recv_rate`` (application bytes per second)."""
        self.send_rate = self._send_meter.sample(self.bytes_sent, now)
        self.recv_rate = self._recv_meter.sample(self.bytes_received, now)

    def as_dict(self) -> dict[str, object]:
        """All public counters and the ratio as a dict."""
        out: dict[str, object] = {
            f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["compression_ratio"] = self.compression_ratio
        return out


def count_both(stream: StreamStats, session: SessionStats, **counts: int) -> None:
    """Add each of *counts* to the stream's counter of that name and to the session's: the one place
    where a stream's traffic is also the session's. Raises AttributeError for an unknown counter."""
    for name, n in counts.items():
        setattr(stream, name, getattr(stream, name) + n)
        setattr(session, name, getattr(session, name) + n)
