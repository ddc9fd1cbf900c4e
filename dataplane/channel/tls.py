"""Mutual TLS 1.3 for the channel: contexts, peer-name pinning, peer identity, readable refusals.

Both ends of a channel authenticate each other:

- each side presents its own certificate (``cert``/``key``) and trusts only
  an explicit CA bundle (``ca_bundle``, the *peer's* CA; the system trust
  store is never loaded);
- each side pins the name the peer's certificate must carry (``peer_name``:
  the subject CN or any DNS/IP subjectAltName, compared exactly, no
  wildcards);
- TLS 1.3 is the minimum, and the server requires a client certificate.

Name pinning is enforced *inside the handshake* on both sides by the contexts
returned here: their SSL objects check the peer's names as soon as OpenSSL
has verified the chain, so a connection with the wrong name fails exactly
like one with a bad certificate (asyncio's ``open_connection`` /
``start_tls`` raise :class:`PeerNameMismatch`, which is an
``ssl.SSLCertVerificationError``). :func:`verify_peer_name` does the same
check on demand, e.g. on a transport made from another context.

Typical asyncio use::

    # listener: refusals are reported through on_refusal (asyncio itself logs
    # handshake failures only at debug level)
    ctx = server_context(cfg, on_refusal=lambda reason, exc: log.error("TLS refused: %s", reason))
    server = await asyncio.start_server(handle, host, port, ssl=ctx)
    ...
    async def handle(reader, writer):
        fingerprint = peer_fingerprint(writer)             # bind the session to it

    # dialer: the handshake error is raised here
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=client_context(cfg))
    except (ssl.SSLError, OSError) as exc:
        log.error("TLS to %s failed: %s", host, describe_tls_error(exc, cfg))

Upgrading an accepted plain TCP stream with ``await
writer.start_tls(server_context(cfg))`` raises the refusal to the caller,
but it is racy: bytes the StreamReader has already read (the ClientHello)
are lost to TLS and the handshake hangs. On the default loop it works only
when ``start_tls`` is the handler's first await; under uvloop 0.23 it hangs
even then. Prefer ``start_server(ssl=ctx)``.

With TLS 1.3 the client finishes its handshake before the server has
checked the client certificate, so a client learns of its own refusal on
its first read (an ``ssl.SSLError`` naming the peer's alert, or EOF);
:func:`describe_tls_error` words both.

Plaintext is only for an explicit request (``TLSConfig(plaintext=True)``);
log :func:`warn_plaintext` when using it.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MIN_TLS_VERSION",
    "NoPeerCertificate",
    "PeerIdentity",
    "PeerNameMismatch",
    "TLSConfig",
    "TLSConfigError",
    "client_context",
    "describe_tls_error",
    "peer_fingerprint",
    "peer_identity",
    "peer_names",
    "server_context",
    "verify_peer_name",
    "warn_plaintext",
]

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_3

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) that describe_tls_error words itself.
_V_UNABLE_TO_GET_ISSUER_CERT = 2
_V_CERT_SIGNATURE_FAILURE = 7
_V_CERT_NOT_YET_VALID = 9
_V_CERT_HAS_EXPIRED = 10
_V_DEPTH_ZERO_SELF_SIGNED_CERT = 18
_V_SELF_SIGNED_CERT_IN_CHAIN = 19
_V_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
_V_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
_V_CERT_REVOKED = 23
_V_INVALID_CA = 24
_V_INVALID_PURPOSE = 26
_V_CERT_UNTRUSTED = 27
_V_HOSTNAME_MISMATCH = 62
_V_IP_ADDRESS_MISMATCH = 64

_UNTRUSTED_CODES = {
    _V_UNABLE_TO_GET_ISSUER_CERT,
    _V_CERT_SIGNATURE_FAILURE,
    _V_DEPTH_ZERO_SELF_SIGNED_CERT,
    _V_SELF_SIGNED_CERT_IN_CHAIN,
    _V_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    _V_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    _V_INVALID_CA,
    _V_CERT_UNTRUSTED,
}

_EOF_REASON = (
    "peer closed the connection during or right after the TLS handshake "
    "(it probably refused our certificate or our name: see the peer's log)"
)

_NOT_TLS = "peer does not speak TLS (a plaintext peer, or not a dataplane channel endpoint)"

# OpenSSL reason codes (exc.reason) of handshake errors that are not chain-verification errors.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "peer presented no certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "peer requires a client certificate and we presented none (TLS alert certificate_required)"
    ),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "peer refused our certificate: it is not signed by a CA the peer trusts (TLS alert unknown_ca)"
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer refused our certificate (TLS alert bad_certificate)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        "peer refused our certificate: it has expired (TLS alert certificate_expired)"
    ),
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": (
        "peer refused our certificate: wrong key usage for this role (TLS alert unsupported_certificate)"
    ),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "peer refused our certificate (TLS alert certificate_unknown)",
    "TLSV1_ALERT_ACCESS_DENIED": "peer refused our certificate (TLS alert access_denied)",
    "UNSUPPORTED_PROTOCOL": "TLS version too old: the peer offered only versions below TLS 1.3",
    "TLSV1_ALERT_PROTOCOL_VERSION": (
        "TLS version too old: the peer requires a newer version than we offered (TLS alert protocol_version)"
    ),
    "NO_PROTOCOLS_AVAILABLE": "TLS version too old: no TLS version is enabled in our configuration",
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "HTTP_REQUEST": "peer does not speak TLS (it sent an HTTP request)",
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "RECORD_LAYER_FAILURE": _NOT_TLS,
    "NO_SHARED_CIPHER": "TLS handshake failure: no cipher suite in common with the peer",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "TLS handshake failure: the peer found no acceptable parameters",
    "TLSV1_ALERT_DECRYPT_ERROR": "TLS handshake failure: a signature did not verify (TLS alert)",
    "UNEXPECTED_EOF_WHILE_READING": _EOF_REASON,
    "EOF": _EOF_REASON,
}


class TLSConfigError(ValueError):
    """The TLS configuration is unusable: a file is missing, unreadable or invalid, or a value is wrong."""


class PeerNameMismatch(ssl.SSLCertVerificationError):
    """The peer's certificate is valid but does not carry the pinned peer name.

    ``expected`` is the pinned name, ``presented`` the names the certificate
    carries (CN and subjectAltNames). ``str(exc)`` is
    ``peer name mismatch: expected X, got ['a', 'b']``.
    """

    def __init__(self, expected: str, presented: Sequence[str]) -> None:
        self.expected = expected
        self.presented = list(presented)
        message = f"peer name mismatch: expected {expected}, got {self.presented}"
        super().__init__(message)
        self.verify_code = _V_HOSTNAME_MISMATCH
        self.verify_message = message
        self.reason = "PEER_NAME_MISMATCH"
        self.library = "dataplane"

    def __str__(self) -> str:
        return self.verify_message


class NoPeerCertificate(ssl.SSLError):
    """The connection has no verified peer certificate (plaintext, or verification was off)."""

    def __init__(self, detail: str = "peer presented no certificate") -> None:
        super().__init__(detail)
        self.reason = "NO_PEER_CERTIFICATE"
        self.library = "dataplane"
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


# --------------------------------------------------------------------------- configuration


def _check_file(path: Path, what: str, marker: bytes) -> None:
    """Raise TLSConfigError unless *path* is a readable regular file holding a PEM block with *marker*."""
    if not path.exists():
        raise TLSConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise TLSConfigError(f"{what} {path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or marker not in data:
        raise TLSConfigError(f"{what} {path} is not a PEM file with a {marker.decode()} block")


@dataclass(frozen=True)
class TLSConfig:
    """One side's TLS settings; the constructor checks every file (unless ``plaintext``).

    ``cert``/``key``: this side's certificate chain and private key (PEM).
    ``ca_bundle``: the only CAs trusted for the peer (PEM bundle).
    ``peer_name``: the name the peer's certificate must carry (CN or a
    DNS/IP subjectAltName). Required on the client; on the server ``None``
    accepts any client certificate issued by ``ca_bundle``.
    ``plaintext``: no TLS at all, only when explicitly requested (the files
    are then not checked, and the context factories refuse the config).

    Raises TLSConfigError naming the file and the reason (missing, not a
    regular file, unreadable, not PEM) or an empty ``peer_name``.
    """

    cert: Path
    key: Path
    ca_bundle: Path
    peer_name: str | None = None
    plaintext: bool = False

    def __post_init__(self) -> None:
        for field_name in ("cert", "key", "ca_bundle"):
            value = getattr(self, field_name)
            if not isinstance(value, Path):
                if not isinstance(value, str | os.PathLike):
                    raise TLSConfigError(f"TLS {field_name} must be a path, got {value!r}")
                object.__setattr__(self, field_name, Path(value))
        if self.peer_name is not None and (not isinstance(self.peer_name, str) or not self.peer_name.strip()):
            raise TLSConfigError(f"peer name must be a non-empty string, got {self.peer_name!r}")
        if self.plaintext:
            return
        _check_file(self.cert, "TLS certificate", b"CERTIFICATE")
        _check_file(self.key, "TLS private key", b"PRIVATE KEY")
        _check_file(self.ca_bundle, "trusted CA bundle", b"CERTIFICATE")

    @classmethod
    def from_paths(
        cls,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca_bundle: str | os.PathLike[str],
        peer_name: str | None = None,
        *,
        plaintext: bool = False,
    ) -> TLSConfig:
        """Build a config from str or path-like values; raises TLSConfigError like the constructor."""
        return cls(Path(cert), Path(key), Path(ca_bundle), peer_name, plaintext)


# --------------------------------------------------------------------------- contexts


RefusalHook = Callable[[str, BaseException], None]


class _PinnedSSLObject(ssl.SSLObject):
    """SSLObject (asyncio's TLS) that checks the pinned peer name as the last step of the handshake."""

    def do_handshake(self) -> None:
        _checked_handshake(self, super().do_handshake)


class _PinnedSSLSocket(ssl.SSLSocket):
    """SSLSocket (blocking TLS) that checks the pinned peer name as the last step of the handshake."""

    def do_handshake(self, block: bool = False) -> None:
        _checked_handshake(self, lambda: super(_PinnedSSLSocket, self).do_handshake(block))


class _PinnedContext(ssl.SSLContext):
    """An SSLContext that remembers its TLSConfig, enforces its peer name and reports refusals."""

    sslobject_class = _PinnedSSLObject
    sslsocket_class = _PinnedSSLSocket
    dataplane_config: TLSConfig | None = None
    dataplane_on_refusal: RefusalHook | None = None

    @property
    def pinned_peer_name(self) -> str | None:
        """The name the peer certificate must carry, or None (any certificate from the CA bundle)."""
        return self.dataplane_config.peer_name if self.dataplane_config is not None else None


def _checked_handshake(obj: ssl.SSLObject | ssl.SSLSocket, handshake: Callable[[], None]) -> None:
    ctx = obj.context
    try:
        handshake()
        expected = ctx.pinned_peer_name if isinstance(ctx, _PinnedContext) else None
        if expected is not None:
            verify_peer_name(obj, expected)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        raise
    except ssl.SSLError as exc:
        pinned = ctx if isinstance(ctx, _PinnedContext) else None
        hook = pinned.dataplane_on_refusal if pinned is not None else None
        if pinned is not None and hook is not None:
            try:
                hook(describe_tls_error(exc, pinned.dataplane_config), exc)
            except Exception:  # noqa: BLE001 - a logging hook must not change the handshake's outcome
                logging.getLogger(__name__).exception("the TLS refusal hook failed")
        raise


def _context(cfg: TLSConfig, server_side: bool, on_refusal: RefusalHook | None) -> ssl.SSLContext:
    if not isinstance(cfg, TLSConfig):
        raise TLSConfigError(f"expected a TLSConfig, got {type(cfg).__name__}")
    if cfg.plaintext:
        raise TLSConfigError("this configuration is plaintext (explicitly requested): it has no TLS context")
    ctx = _PinnedContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.check_hostname = False  # names are checked by _PinnedSSLObject/_PinnedSSLSocket, against peer_name
    ctx.verify_mode = ssl.CERT_REQUIRED  # on the server side: a client certificate is required
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if server_side:
        ctx.num_tickets = 0  # no session resumption: every connection proves its certificate afresh
    try:
        ctx.load_verify_locations(cafile=str(cfg.ca_bundle))  # the only trust anchors: no system store
    except (ssl.SSLError, OSError) as exc:
        detail = _ssl_detail(exc)
        raise TLSConfigError(f"trusted CA bundle {cfg.ca_bundle} cannot be loaded: {detail}") from exc
    try:
        ctx.load_cert_chain(certfile=str(cfg.cert), keyfile=str(cfg.key))
    except (ssl.SSLError, OSError) as exc:
        detail = _ssl_detail(exc)
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            detail = "the private key does not belong to the certificate"
        raise TLSConfigError(f"certificate {cfg.cert} with key {cfg.key} cannot be loaded: {detail}") from exc
    ctx.dataplane_config = cfg
    ctx.dataplane_on_refusal = on_refusal
    return ctx


def _ssl_detail(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def server_context(cfg: TLSConfig, *, on_refusal: RefusalHook | None = None) -> ssl.SSLContext:
    """The listener's context: TLS >= 1.3, client certificate required, only ``cfg.ca_bundle`` trusted.

    If ``cfg.peer_name`` is set, a client whose certificate does not carry it
    fails the handshake with :class:`PeerNameMismatch`. ``on_refusal(reason,
    exc)`` is called (with the :func:`describe_tls_error` line) for every
    handshake this side refuses, which is how a server that passes the
    context to ``asyncio.start_server(ssl=...)`` gets to log refusals (asyncio
    itself reports them only at debug level). Raises TLSConfigError if
    ``cfg`` is plaintext or its files do not load (e.g. a key that does not
    match the certificate).
    """
    return _context(cfg, server_side=True, on_refusal=on_refusal)


def client_context(cfg: TLSConfig, *, on_refusal: RefusalHook | None = None) -> ssl.SSLContext:
    """The dialer's context: TLS >= 1.3, our client certificate, only ``cfg.ca_bundle`` trusted.

    The server's certificate must carry ``cfg.peer_name``, whatever host or
    address was dialled (a mismatch fails the handshake with
    :class:`PeerNameMismatch`). Raises TLSConfigError if ``cfg`` is
    plaintext, has no ``peer_name``, or its files do not load.
    ``on_refusal`` as for :func:`server_context` (the handshake error is
    raised to the caller as well).
    """
    if isinstance(cfg, TLSConfig) and not cfg.plaintext and cfg.peer_name is None:
        raise TLSConfigError("the client must pin the server's name: peer_name is required")
    return _context(cfg, server_side=False, on_refusal=on_refusal)


# --------------------------------------------------------------------------- the peer


def _ssl_object(obj: Any) -> ssl.SSLObject | ssl.SSLSocket:
    """The SSL object behind an SSLObject, SSLSocket, asyncio transport or StreamWriter.

    Raises NoPeerCertificate if the connection is not TLS, TypeError if *obj*
    is none of these.
    """
    if isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return obj
    get_extra_info = getattr(obj, "get_extra_info", None)
    if get_extra_info is None:
        raise TypeError(f"expected an SSL object, transport or StreamWriter, got {type(obj).__name__}")
    sslobj = get_extra_info("ssl_object")
    if sslobj is None:
        raise NoPeerCertificate("the connection is not TLS: there is no peer certificate")
    return sslobj


def peer_names(cert: dict[str, Any]) -> list[str]:
    """The names a peer certificate carries: subject CN(s), then DNS and IP subjectAltNames, no duplicates.

    *cert* is the dict of ``SSLObject.getpeercert()``. IP addresses are in
    their canonical text form. Returns [] for an empty dict.
    """
    names: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.append(value)
        elif kind == "IP Address":
            try:
                names.append(str(ipaddress.ip_address(value.strip())))
            except ValueError:
                names.append(value.strip())
    return list(dict.fromkeys(names))


def _matches(expected: str, names: Iterable[str]) -> str | None:
    try:
        want_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(expected)
    except ValueError:
        want_ip = None
    want = expected.rstrip(".").lower()
    for name in names:
        if want_ip is not None:
            try:
                if ipaddress.ip_address(name) == want_ip:
                    return name
            except ValueError:
                continue
        elif name.rstrip(".").lower() == want:
            return name
    return None


def verify_peer_name(conn: Any, expected: str) -> str:
    """Check that the peer certificate of *conn* carries *expected*; return the matching name.

    *conn* is an SSLObject, SSLSocket, asyncio transport or StreamWriter
    after the handshake. *expected* matches the subject CN or any DNS
    subjectAltName case-insensitively, or an IP subjectAltName/CN when it is
    an IP address; wildcards are not expanded. Raises PeerNameMismatch
    (naming the expected and presented names), NoPeerCertificate if there is
    no verified peer certificate, TypeError for an unsupported *conn*.
    """
    sslobj = _ssl_object(conn)
    cert = sslobj.getpeercert()
    if not cert:
        raise NoPeerCertificate()
    names = peer_names(cert)
    match = _matches(expected, names)
    if match is None:
        raise PeerNameMismatch(expected, names)
    return match


def peer_fingerprint(conn: Any) -> str:
    """SHA-256 (lower-case hex) of the peer's DER certificate: a stable identity of the peer.

    *conn* is an SSLObject, SSLSocket, asyncio transport or StreamWriter
    after the handshake. Raises NoPeerCertificate if the peer presented none
    (or the connection is plaintext), TypeError for an unsupported *conn*.
    """
    der = _ssl_object(conn).getpeercert(binary_form=True)
    if not der:
        raise NoPeerCertificate()
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of an established TLS connection."""

    fingerprint: str  # sha256 hex of the DER certificate
    names: tuple[str, ...]  # CN, then DNS/IP subjectAltNames
    issuer: str  # the issuing CA's common name
    not_after: str  # expiry, as OpenSSL prints it
    version: str  # negotiated TLS version, e.g. "TLSv1.3"

    def __str__(self) -> str:
        name = self.names[0] if self.names else "?"
        return f"{name} (sha256 {self.fingerprint[:16]}…, issuer {self.issuer})"


def peer_identity(conn: Any) -> PeerIdentity:
    """The :class:`PeerIdentity` of an established TLS connection (for logs and session binding).

    Raises NoPeerCertificate or TypeError like :func:`peer_fingerprint`.
    """
    sslobj = _ssl_object(conn)
    cert = sslobj.getpeercert()
    if not cert:
        raise NoPeerCertificate()
    rdns: Any = cert.get("issuer", ())  # ((("commonName", "x"),), ...)
    issuer = next((v for rdn in rdns for k, v in rdn if k == "commonName"), "?")
    return PeerIdentity(
        fingerprint=peer_fingerprint(sslobj),
        names=tuple(peer_names(cert)),
        issuer=issuer,
        not_after=str(cert.get("notAfter", "?")),
        version=sslobj.version() or "?",
    )


# --------------------------------------------------------------------------- words for the logs


def _verify_reason(exc: ssl.SSLCertVerificationError, cfg: TLSConfig | None) -> str:
    code = exc.verify_code
    detail = exc.verify_message or "certificate verify failed"
    if code in _UNTRUSTED_CODES:
        bundle = f"the trusted CA bundle {cfg.ca_bundle}" if cfg is not None else "the trusted CA bundle"
        return f"peer certificate is not signed by {bundle} ({detail})"
    if code == _V_CERT_HAS_EXPIRED:
        return "peer certificate has expired"
    if code == _V_CERT_NOT_YET_VALID:
        return "peer certificate is not yet valid (are the clocks of both clusters right?)"
    if code == _V_INVALID_PURPOSE:
        return "peer certificate is not valid for its role (wrong extended key usage: serverAuth/clientAuth)"
    if code == _V_CERT_REVOKED:
        return "peer certificate has been revoked"
    if code in (_V_HOSTNAME_MISMATCH, _V_IP_ADDRESS_MISMATCH):
        expected = cfg.peer_name if cfg is not None else None
        return f"peer name mismatch: expected {expected}" if expected else "peer name mismatch"
    return f"peer certificate rejected: {detail}"


def describe_tls_error(exc: BaseException, cfg: TLSConfig | None = None) -> str:
    """One log line saying why a TLS connection was refused or broke.

    *exc* is what a handshake (``open_connection``, ``start_tls``,
    ``wrap_socket``) or the first read after it raised; *cfg* is this side's
    configuration, used to name the CA bundle and the expected peer name.
    Examples: ``peer certificate is not signed by the trusted CA bundle
    /etc/dp/server-trust.pem (unable to get local issuer certificate)``,
    ``peer presented no certificate``, ``peer name mismatch: expected b,
    got ['c']``, ``TLS version too old: ...``. Never raises.
    """
    try:
        return _describe(exc, cfg)
    except Exception:  # noqa: BLE001 - a description must never fail
        return f"{type(exc).__name__}: {exc}"


def _describe(exc: BaseException, cfg: TLSConfig | None) -> str:
    if isinstance(exc, PeerNameMismatch | NoPeerCertificate | TLSConfigError):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verify_reason(exc, cfg)
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _REASONS:
            return _REASONS[reason]
        if isinstance(exc, ssl.SSLEOFError):
            return _EOF_REASON
        if isinstance(exc, ssl.SSLZeroReturnError):
            return "peer closed the TLS session"
        text = reason.lower().replace("_", " ") if reason else str(exc)
        return f"TLS error: {text}"
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return _EOF_REASON
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out (is the peer a dataplane channel endpoint, and reachable?)"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return (
            "connection reset by the peer during or right after the TLS handshake "
            "(it probably refused our certificate, name or TLS version: see the peer's log)"
        )
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens at the peer's address)"
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "")
        return f"network error: {exc.strerror or exc}" + (f" ({name})" if name else "")
    return f"{type(exc).__name__}: {exc}"


def warn_plaintext(logger: logging.Logger, peer: str | None = None) -> None:
    """Log the warning that goes with an explicitly requested plaintext channel (*peer*: for the message)."""
    where = f" with {peer}" if peer else ""
    logger.warning(
        "PLAINTEXT channel%s (explicitly requested): the migration stream is neither encrypted nor "
        "authenticated; use this only on an isolated test network",
        where,
    )
