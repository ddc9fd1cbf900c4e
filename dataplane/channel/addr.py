"""Parsing of the tunnel's command-line values: addresses, endpoints, forward specs.

Pure functions (no I/O) that raise ValueError with a message fit for a
command-line error line:

* :func:`parse_hostport` ``HOST:PORT`` (``[v6]:PORT``; an empty host means
  every interface) for ``--bind`` and ``--to``;
* :func:`parse_endpoint` ``unix:/path`` or ``tcp:HOST:PORT``, the local side
  of a relay (:class:`Endpoint`);
* :func:`parse_mapping` ``NAME=ENDPOINT`` for ``--forward`` / ``--expose``.

Rates and sizes are :mod:`dataplane.units`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["Endpoint", "format_hostport", "is_loopback", "parse_endpoint", "parse_hostport", "parse_mapping"]

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


def is_loopback(host: str) -> bool:
    """True for a loopback IP address or ``localhost`` (a wildcard or any other name: False)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
