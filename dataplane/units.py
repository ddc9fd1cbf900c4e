"""Rates and sizes, parsed and printed the same way everywhere.

Two kinds of rate, never mixed:

* a **bandwidth cap** (``--bandwidth``): :func:`parse_rate` takes bits/s (``200M``, ``1G``,
  ``500kbit``) or bytes/s (``100MiB/s``, ``50MB/s``) and returns **bytes per second** (the unit of
  :class:`~dataplane.channel.shaping.TokenBucket`); :func:`format_rate` prints one;
* a **link rate** (the test links' ``tc tbf``): :func:`parse_link_rate` takes tc's syntax
  (``50mbit``, ``1gbit``) and returns **bits per second**; :func:`format_link_rate` prints one.

:func:`format_bytes` prints a size in binary units. Pure functions; parsers raise ValueError with a
message fit for a command-line error line.
"""

from __future__ import annotations

import re

__all__ = ["MIN_RATE", "format_bytes", "format_link_rate", "format_rate", "parse_link_rate", "parse_rate"]

_RATE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z/]*)$")
_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BIN = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_UNLIMITED = {"0", "off", "none", "unlimited"}
MIN_RATE = 1000  # bytes per second


def parse_rate(text: str) -> float | None:
    """A bandwidth cap in **bytes per second**, or None for no cap.

    Two notations, told apart by the capital ``B/s``:

    * bits per second (network style): a number with an optional SI prefix
      and an optional ``bit``, ``bit/s`` or ``b/s`` suffix: ``200M``,
      ``1G``, ``1.5g``, ``500kbit``, ``200Mb/s`` (k/M/G/T are powers of 1000);
    * bytes per second (storage style): ``100MiB/s``, ``1GiB/s`` (powers of
      1024) or ``50MB/s``, ``10kB/s`` (powers of 1000), and ``B/s``; the
      prefix is case-sensitive here (``k``/``K``, ``M``, ``G``, ``T``).

    ``0``, ``off``, ``none`` and ``unlimited`` mean no cap. ``bps``-style
    units are refused (``mbps`` means megabytes/s to tc but megabits/s to
    most people). Raises ValueError for anything else or below 1000 bytes/s.
    """
    raw = text.strip()
    if raw.lower() in _UNLIMITED:
        return None
    m = _RATE_RE.match(raw)
    if m is None:
        raise ValueError(f"invalid rate {text!r}: use bits/s like 200M or 1G, or bytes/s like 100MiB/s")
    value = float(m.group(1))
    unit = m.group(2)
    bm = re.fullmatch(r"([kKMGT]?)(i?)B/s", unit)
    if bm is not None:
        prefix = bm.group(1).lower()
        rate = value * (_BIN if bm.group(2) else _SI)[prefix]
    else:
        um = re.fullmatch(r"([kKmMgGtT]?)(bit|bit/s|b/s)?", unit)
        if um is None:
            raise ValueError(
                f"invalid rate {text!r}: unknown unit {unit!r} (bits/s: 200M, 1G, 500kbit; "
                "bytes/s: 100MiB/s, 50MB/s)")
        rate = value * _SI[um.group(1).lower()] / 8
    if rate == 0:
        return None
    if rate < MIN_RATE:
        raise ValueError(f"rate {text!r} is too low (minimum {MIN_RATE} bytes/s = 8kbit)")
    return rate


def format_rate(rate: float | None) -> str:
    """A bytes-per-second rate for humans: ``25.0 MB/s (200 Mbit/s)``, or ``unlimited``."""
    if not rate:
        return "unlimited"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.1f} {unit} ({rate * 8 / 1e6:g} Mbit/s)"
    return f"{rate:.0f} B/s"


def format_bytes(n: float) -> str:
    """``n`` bytes for people: ``"512 B"``, ``"1.5 MiB"`` ... up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_LINK_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)?\s*$", re.IGNORECASE)
_LINK_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_link_rate(rate: int | float | str) -> int:
    """A rate in bits per second: a number, or text like ``"50mbit"`` (SI units bit/kbit/mbit/gbit, as tc).

    tc's byte units (``mbps`` = megabytes/s) are refused to avoid an 8x
    mistake. Raises ValueError for anything else or a rate below 8 bit/s.
    """
    if isinstance(rate, bool):
        raise ValueError(f"invalid rate {rate!r}")
    if isinstance(rate, int | float):
        bits = float(rate)
    else:
        m = _LINK_RE.match(rate)
        if m is None:
            raise ValueError(
                f"invalid rate {rate!r}: use bits per second or e.g. '500kbit', '50mbit', '1gbit'"
            )
        bits = float(m.group(1)) * _LINK_UNITS[(m.group(2) or "bit").lower()]
    if bits < 8:
        raise ValueError(f"rate {rate!r} is too low (minimum 8 bit/s)")
    return int(bits)


def format_link_rate(bps: float | None) -> str:
    """A link rate in bits/s for people: ``1 Gbit/s``, ``200 Mbit/s``, or ``unshaped`` for none."""
    if not bps:
        return "unshaped"
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"
