"""Create the certificates for a mutually authenticated channel (``dataplane certs init``).

:func:`init_certs` writes a small PKI into one directory: one CA (or, with
``two_cas=True``, one CA per cluster) and two leaf identities, the *server*
(the channel listener, in the destination cluster) and the *client* (the side
that dials out, in the source cluster). Every key is ECDSA P-256 and every
signature ECDSA-SHA256: OpenSSL 3 (Debian bookworm) handles that for TLS 1.3
with client authentication, and so does every other TLS stack.

Layout with one CA::

    ca.crt  ca.key                      the CA (ca.key is only needed to issue more certificates)
    server.crt  server.key              listener identity (EKU serverAuth)
    client.crt  client.key              dialer identity (EKU clientAuth)
    server-trust.pem  client-trust.pem  the CA bundle each side pins for its peer (here: ca.crt)
    manifest.json  README.txt           which file is what

With ``two_cas=True`` the CAs are ``cluster-a-ca.{crt,key}`` (signs the
client) and ``cluster-b-ca.{crt,key}`` (signs the server), and each side's
trust bundle holds only the *other* cluster's CA: ``server-trust.pem`` is
cluster A's CA, ``client-trust.pem`` is cluster B's CA (cross-trust).

Private keys are unencrypted PKCS#8 PEM files created with mode 0600; the
directory is created with mode 0700. Existing files are never overwritten
unless ``force=True``. :func:`load_cert_set` reads a directory back.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from dataplane.channel.tls import TLSConfig

__all__ = [
    "CAFiles",
    "CertSet",
    "CertsError",
    "CertsExistError",
    "DEFAULT_CA_NAME",
    "DEFAULT_CLIENT_NAMES",
    "DEFAULT_CLUSTER_NAMES",
    "DEFAULT_DAYS",
    "DEFAULT_SERVER_NAMES",
    "Identity",
    "InvalidNameError",
    "MANIFEST_NAME",
    "init_certs",
    "load_cert_set",
]

DEFAULT_CA_NAME = "dataplane-ca"
DEFAULT_CLUSTER_NAMES = ("cluster-a", "cluster-b")  # (client side, server side)
DEFAULT_SERVER_NAMES = ("dataplane-server",)
DEFAULT_CLIENT_NAMES = ("dataplane-client",)
DEFAULT_DAYS = 365
MANIFEST_NAME = "manifest.json"
README_NAME = "README.txt"
MANIFEST_VERSION = 1

_CLOCK_SKEW = _dt.timedelta(minutes=5)  # not_before is back-dated: the clusters' clocks differ a little
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CertsError(Exception):
    """Certificates cannot be created or read (the message says which file or value, and why)."""


class CertsExistError(CertsError):
    """``init_certs`` would overwrite existing files and ``force`` was not given."""

    def __init__(self, existing: Sequence[Path]) -> None:
        self.existing = list(existing)
        names = ", ".join(str(p) for p in self.existing)
        super().__init__(
            f"refusing to overwrite existing files ({names}); pass force=True / --force to replace them"
        )


class InvalidNameError(CertsError, ValueError):
    """A certificate name is neither a valid DNS name nor an IP address, or a parameter is out of range."""


@dataclass(frozen=True)
class CAFiles:
    """One certificate authority: its display name and its PEM files."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class Identity:
    """One side's identity: its names, certificate, key, and the CA bundle it pins for its peer.

    ``names`` are the SAN entries (the first is also the subject CN);
    ``trust`` is the bundle this side must trust (the *peer's* issuing CA);
    ``fingerprint`` is the SHA-256 hex digest of the DER certificate, as
    :func:`dataplane.channel.tls.peer_fingerprint` reports it on the other side.
    """

    role: str
    names: tuple[str, ...]
    cert: Path
    key: Path
    trust: Path
    issuer: str
    fingerprint: str


@dataclass(frozen=True)
class CertSet:
    """Everything :func:`init_certs` wrote (or :func:`load_cert_set` read) in ``directory``."""

    directory: Path
    cas: tuple[CAFiles, ...]
    server: Identity
    client: Identity
    manifest: Path
    readme: Path
    two_cas: bool
    days: int

    def files(self) -> list[tuple[Path, str]]:
        """Every file of the set with a one-line description, in a stable order."""
        out: list[tuple[Path, str]] = []
        for ca in self.cas:
            out.append((ca.cert, f"CA certificate '{ca.name}'"))
            out.append((ca.key, f"CA private key '{ca.name}' (keep offline; only for issuing certificates)"))
        for ident in (self.server, self.client):
            side = "listener" if ident.role == "server" else "dialer"
            out.append((ident.cert, f"{ident.role} certificate ({side}; names {', '.join(ident.names)})"))
            out.append((ident.key, f"{ident.role} private key"))
            out.append((ident.trust, f"CA bundle the {ident.role} pins for its peer (issuer of the peer)"))
        out.append((self.manifest, "machine-readable manifest of this directory"))
        out.append((self.readme, "human-readable description of this directory"))
        return out

    def config(self, side: str, *, cert: str | os.PathLike[str] | None = None,
               key: str | os.PathLike[str] | None = None, ca: str | os.PathLike[str] | None = None,
               peer_name: str | None = None, pin_peer: bool = True) -> TLSConfig:
        """The :class:`~dataplane.channel.tls.TLSConfig` of ``side`` (``server``: the listener,
        ``client``: the dialer): this set's identity of that side, each file replaced by the one
        given; the peer's name ``peer_name``, or the other side's first name (none without
        ``pin_peer``: any certificate the CA bundle trusts). Raises TLSConfigError like
        :meth:`TLSConfig.from_paths`."""
        from dataplane.channel.tls import TLSConfig

        own, other = (self.server, self.client) if side == "server" else (self.client, self.server)
        name = peer_name or (other.names[0] if pin_peer else None)
        return TLSConfig.from_paths(cert or own.cert, key or own.key, ca or own.trust, name)

    def server_config(self, peer_name: str | None = None) -> TLSConfig:
        """The listener's :class:`~dataplane.channel.tls.TLSConfig`.

        ``peer_name`` is the client name to require (default: the client's
        first name). Raises TLSConfigError if a file is missing or unreadable.
        """
        return self.config("server", peer_name=peer_name)

    def client_config(self, peer_name: str | None = None) -> TLSConfig:
        """The dialer's :class:`~dataplane.channel.tls.TLSConfig`.

        ``peer_name`` is the server name to require (default: the server's
        first name). Raises TLSConfigError if a file is missing or unreadable.
        """
        return self.config("client", peer_name=peer_name)


# --------------------------------------------------------------------------- names


def _load_crypto() -> None:
    """Import ``cryptography`` on first use: only generating certificates needs it, and it takes
    ~70 ms to import (which every ``migrate`` / ``receive`` with ``--certs`` would pay otherwise)."""
    global x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _check_name(name: str) -> x509.GeneralName:
    """The SAN entry for *name*: an IPAddress if it parses as one, else a DNSName.

    Raises InvalidNameError for anything that is neither (spaces, empty labels,
    non-ASCII, wildcards: pinned names are exact).
    """
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"invalid certificate name {name!r}: empty")
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    host = name[:-1] if name.endswith(".") else name
    if len(host) > 253 or not host.isascii() or not all(_DNS_LABEL.match(label) for label in host.split(".")):
        raise InvalidNameError(
            f"invalid certificate name {name!r}: not an IP address nor a DNS name "
            "(letters, digits and '-' in dot-separated labels; no wildcards)"
        )
    return x509.DNSName(host.lower())


def _names(names: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        _check_name(name)
        if name not in out:
            out.append(name)
    if not out:
        raise InvalidNameError(f"at least one {what} name is required")
    return tuple(out)


# --------------------------------------------------------------------------- issuing


@dataclass
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(common_name: str, days: int) -> _Issued:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dataplane"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issued(cert, key)


def _make_leaf(ca: _Issued, names: Sequence[str], role: str, days: int) -> _Issued:
    key = _new_key()
    now = _now()
    eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dataplane"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_check_name(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return _Issued(cert, key)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# --------------------------------------------------------------------------- writing


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write *data* to *path* atomically (temp file + rename), with *mode* set before any data."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the umask may have cleared bits of a public file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plan(two_cas: bool, ca_name: str) -> dict[str, Any]:
    if two_cas:
        a, b = DEFAULT_CLUSTER_NAMES
        cas = {a: (f"{a}-ca.crt", f"{a}-ca.key"), b: (f"{b}-ca.crt", f"{b}-ca.key")}
        client_issuer, server_issuer = a, b
    else:
        cas = {ca_name: ("ca.crt", "ca.key")}
        client_issuer = server_issuer = ca_name
    return {
        "cas": cas,
        **{
            role: {"cert": f"{role}.crt", "key": f"{role}.key", "trust": f"{role}-trust.pem", "issuer": who}
            for role, who in (("server", server_issuer), ("client", client_issuer))
        },
    }


def _all_names(plan: dict[str, Any]) -> list[str]:
    out = [name for pair in plan["cas"].values() for name in pair]
    for role in ("server", "client"):
        out += [plan[role]["cert"], plan[role]["key"], plan[role]["trust"]]
    return [*out, MANIFEST_NAME, README_NAME]


def _readme(cs: CertSet) -> str:
    lines = [
        "dataplane channel certificates (created by `dataplane certs init`)",
        "",
        f"valid for {cs.days} days; "
        + ("two CAs, cross-trusted (each side pins the other cluster's CA)" if cs.two_cas else "one CA"),
        "",
        "files:",
    ]
    width = max(len(p.name) for p, _ in cs.files())
    lines += [f"  {p.name:<{width}}  {desc}" for p, desc in cs.files()]
    lines += [
        "",
        "listener (destination cluster): server.crt, server.key, pins server-trust.pem,",
        f"  expects the client name {cs.client.names[0]!r}",
        "dialer (source cluster):        client.crt, client.key, pins client-trust.pem,",
        f"  expects the server name {cs.server.names[0]!r}",
        "",
        "Private keys are unencrypted (mode 0600): store them as Kubernetes secrets.",
        "",
    ]
    return "\n".join(lines)


def init_certs(
    directory: str | os.PathLike[str],
    *,
    ca_name: str = DEFAULT_CA_NAME,
    server_names: Iterable[str] = DEFAULT_SERVER_NAMES,
    client_names: Iterable[str] = DEFAULT_CLIENT_NAMES,
    two_cas: bool = False,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> CertSet:
    """Create a CA (or two cross-trusted cluster CAs) and the server and client identities in *directory*.

    ``server_names`` / ``client_names``: SAN entries of each leaf (an entry
    that parses as an IP address becomes an IP SAN, anything else a DNS SAN;
    the first is also the subject CN). ``ca_name`` names the single CA (with
    ``two_cas`` the CAs are ``cluster-a``, issuing the client, and
    ``cluster-b``, issuing the server). ``days``: validity of every
    certificate. The directory is created (mode 0700) if needed.

    Returns the :class:`CertSet` of written paths. Raises InvalidNameError for
    a bad name or ``days`` < 1, CertsExistError if any target file exists and
    ``force`` is false (nothing is written then), CertsError if *directory*
    is not a directory or a file cannot be written.
    """
    _load_crypto()
    if not isinstance(days, int) or days < 1:
        raise InvalidNameError(f"days must be a whole number >= 1, got {days!r}")
    if not two_cas and (not ca_name or not ca_name.isprintable()):
        raise InvalidNameError(f"invalid CA name {ca_name!r}: empty or not printable")
    snames = _names(server_names, "server")
    cnames = _names(client_names, "client")
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise CertsError(f"{root} exists and is not a directory")
    plan = _plan(two_cas, ca_name)
    if not force:
        existing = [root / name for name in _all_names(plan) if (root / name).exists()]
        if existing:
            raise CertsExistError(existing)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        issued_cas = {name: _make_ca(f"{name} dataplane CA", days) for name in plan["cas"]}
        ca_files: list[CAFiles] = []
        for name, (crt, key) in plan["cas"].items():
            _write(root / crt, _cert_pem(issued_cas[name].cert), 0o644)
            _write(root / key, _key_pem(issued_cas[name].key), 0o600)
            ca_files.append(CAFiles(name, root / crt, root / key))
        identities: dict[str, Identity] = {}
        for role, names in (("server", snames), ("client", cnames)):
            spec = plan[role]
            peer_issuer = plan["client" if role == "server" else "server"]["issuer"]
            leaf = _make_leaf(issued_cas[spec["issuer"]], names, role, days)
            _write(root / spec["cert"], _cert_pem(leaf.cert), 0o644)
            _write(root / spec["key"], _key_pem(leaf.key), 0o600)
            _write(root / spec["trust"], _cert_pem(issued_cas[peer_issuer].cert), 0o644)
            identities[role] = Identity(
                role=role,
                names=names,
                cert=root / spec["cert"],
                key=root / spec["key"],
                trust=root / spec["trust"],
                issuer=spec["issuer"],
                fingerprint=_fingerprint(leaf.cert),
            )
        cs = CertSet(
            directory=root,
            cas=tuple(ca_files),
            server=identities["server"],
            client=identities["client"],
            manifest=root / MANIFEST_NAME,
            readme=root / README_NAME,
            two_cas=two_cas,
            days=days,
        )
        _write(cs.manifest, json.dumps(_manifest(cs), indent=2).encode() + b"\n", 0o644)
        _write(cs.readme, _readme(cs).encode(), 0o644)
    except OSError as exc:
        raise CertsError(f"cannot write certificates into {root}: {exc.strerror or exc}") from exc
    return cs


def _manifest(cs: CertSet) -> dict[str, Any]:
    def ident(i: Identity) -> dict[str, Any]:
        return {
            "names": list(i.names),
            "cert": i.cert.name,
            "key": i.key.name,
            "trust": i.trust.name,
            "issuer": i.issuer,
            "sha256": i.fingerprint,
        }

    return {
        "version": MANIFEST_VERSION,
        "created": _now().isoformat(),
        "days": cs.days,
        "two_cas": cs.two_cas,
        "key_type": "ECDSA P-256",
        "cas": [{"name": ca.name, "cert": ca.cert.name, "key": ca.key.name} for ca in cs.cas],
        "server": ident(cs.server),
        "client": ident(cs.client),
        "files": {p.name: desc for p, desc in cs.files()},
    }


def load_cert_set(directory: str | os.PathLike[str]) -> CertSet:
    """Read back a directory written by :func:`init_certs` (through its manifest.json).

    Files are not opened here (a node may hold only its own side's files);
    :class:`~dataplane.channel.tls.TLSConfig` checks the ones it uses. Raises
    CertsError if the manifest is missing, unreadable or malformed.
    """
    root = Path(directory)
    path = root / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        if data.get("version") != MANIFEST_VERSION:
            raise CertsError(f"{path}: unsupported manifest version {data.get('version')!r}")
        cas = tuple(CAFiles(c["name"], root / c["cert"], root / c["key"]) for c in data["cas"])
        idents = {
            role: Identity(
                role=role,
                names=tuple(data[role]["names"]),
                cert=root / data[role]["cert"],
                key=root / data[role]["key"],
                trust=root / data[role]["trust"],
                issuer=data[role]["issuer"],
                fingerprint=data[role]["sha256"],
            )
            for role in ("server", "client")
        }
        cs = CertSet(
            root,
            cas,
            idents["server"],
            idents["client"],
            path,
            root / README_NAME,
            bool(data["two_cas"]),
            int(data["days"]),
        )
    except FileNotFoundError as exc:
        raise CertsError(f"{root} holds no {MANIFEST_NAME} (not created by `dataplane certs init`?)") from exc
    except OSError as exc:
        raise CertsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CertsError(f"{path} is malformed: {exc!r}") from exc
    return cs
