"""Parsing of the tunnel's command-line values: addresses, endpoints, forward specs, rates.

Pure functions (no I/O) that raise ValueError with a message fit for a
command-line error line:

* :func:`parse_hostport` ``HOST:PORT`` (``[v6]:PORT``; an empty host means
  every interface) for ``--bind`` and ``--to``;
* :func:`parse_endpoint` ``unix:/path`` or ``tcp:HOST:PORT``, the local side
  of a relay (:class:`Endpoint`);
* :func:`parse_mapping` ``NAME=ENDPOINT`` for ``--forward`` / ``--expose``;
* :func:`parse_rate` a bandwidth cap, in bits per second (``200M``,
  ``1G``, ``500kbit``) or bytes per second (``100MiB/s``, ``50MB/s``),
  returned in **bytes per second** (the unit of
  :class:`~dataplane.channel.shaping.TokenBucket`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["Endpoint", "format_hostport", "format_rate", "parse_endpoint", "parse_hostport",
           "parse_mapping", "parse_rate"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,254}$")


def _parse_port(text: str, what: str, *, allow_zero: bool) -> int:
    if not text.isdigit():
        raise ValueError(f"invalid port {text!r} in {what}: expected a number")
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        low = 0 if allow_zero else 1
        raise ValueError(f"port {port} in {what} is out of range ({low}..65535)")
    return port


def _check_host(host: str, what: str) -> None:
    if not host:
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not all(re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", lb) for lb in labels):
        raise ValueError(f"invalid host {host!r} in {what}: not an IP address nor a host name")


def parse_hostport(text: str, *, allow_zero: bool = False, allow_empty_host: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[IPv6]:PORT`` for IPv6) into ``(host, port)``.

    *allow_zero* admits port 0 (bind to an ephemeral port);
    *allow_empty_host* admits ``:PORT`` (host ``""``: every interface).
    Raises ValueError naming what is wrong.
    """
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise ValueError(f"invalid address {text!r}: expected [IPv6]:PORT")
        host, port_text = text[1:close], text[close + 2:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"invalid address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid address {text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"invalid address {text!r}: write IPv6 addresses as [ADDRESS]:PORT")
    if not host and not allow_empty_host:
        raise ValueError(f"invalid address {text!r}: the host is missing")
    _check_host(host, repr(text))
    return host, _parse_port(port_text, repr(text), allow_zero=allow_zero)


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Endpoint:
    """A local stream endpoint: a unix socket ``path`` or a TCP ``host``/``port``.

    ``str(endpoint)`` gives back the ``unix:/path`` / ``tcp:HOST:PORT`` form.
    """

    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"tcp:{format_hostport(self.host, self.port)}"


def parse_endpoint(text: str, *, listen: bool = False) -> Endpoint:
    """Parse ``unix:/path`` or ``tcp:HOST:PORT`` into an :class:`Endpoint`.

    With *listen* (a local listener) the TCP host may be empty (every
    interface) but the port must not be 0, so that applications know where
    to connect. Raises ValueError naming what is wrong.
    """
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        raise ValueError(f"invalid endpoint {text!r}: expected unix:/PATH or tcp:HOST:PORT")
    if kind == "unix":
        if not rest:
            raise ValueError(f"invalid endpoint {text!r}: the socket path is missing")
        if "\x00" in rest:
            raise ValueError(f"invalid endpoint {text!r}: the path contains a NUL byte")
        if len(rest.encode()) > 107:
            raise ValueError(f"invalid endpoint {text!r}: unix socket paths are limited to 107 bytes")
        return Endpoint("unix", path=rest)
    host, port = parse_hostport(rest, allow_empty_host=listen)
    return Endpoint("tcp", host=host, port=port)


def parse_mapping(text: str, *, listen: bool = False) -> tuple[str, Endpoint]:
    """Parse ``NAME=ENDPOINT`` (``--forward`` / ``--expose``) into ``(name, endpoint)``.

    NAME: 1..255 characters from letters, digits and ``._:@+-``, starting
    with a letter or digit. Raises ValueError naming what is wrong.
    """
    name, sep, ep = text.partition("=")
    if not sep:
        raise ValueError(f"invalid mapping {text!r}: expected NAME=unix:/PATH or NAME=tcp:HOST:PORT")
    if not _NAME_RE.match(name):
        raise ValueError(
            f"invalid stream name {name!r} in {text!r}: use 1..255 letters, digits and ._:@+- "
            "(starting with a letter or digit)")
    return name, parse_endpoint(ep, listen=listen)


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
