"""Mutual TLS 1.3 over real loopback sockets: what is accepted, what is refused, and how it is worded."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from dataplane.certs import CertSet, init_certs
from dataplane.channel.tls import (
    NoPeerCertificate,
    PeerNameMismatch,
    TLSConfig,
    TLSConfigError,
    client_context,
    describe_tls_error,
    peer_fingerprint,
    peer_identity,
    peer_names,
    server_context,
    verify_peer_name,
    warn_plaintext,
)

# --------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return init_certs(
        tmp_path_factory.mktemp("pki"),
        server_names=["dp-listener.cluster-b", "127.0.0.1"],
        client_names=["dp-dialer.cluster-a"],
    )


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    """Same names, another CA: must never be accepted by ``pki``'s sides."""
    return init_certs(
        tmp_path_factory.mktemp("rogue"),
        ca_name="rogue-ca",
        server_names=["dp-listener.cluster-b", "127.0.0.1"],
        client_names=["dp-dialer.cluster-a"],
    )


@pytest.fixture(scope="module")
def cross(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return init_certs(
        tmp_path_factory.mktemp("cross"),
        two_cas=True,
        server_names=["dp-listener.cluster-b"],
        client_names=["dp-dialer.cluster-a"],
    )


# --------------------------------------------------------------------------- a real TLS listener


@dataclass
class Listener:
    port: int
    refusals: list[str] = field(default_factory=list)
    accepted: list[dict[str, object]] = field(default_factory=list)

    async def wait_refusal(self, timeout: float = 5.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.refusals:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("the listener did not report a refusal")
            await asyncio.sleep(0.01)
        return self.refusals[0]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Listener], object]


async def _echo_identity(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lst: Listener) -> None:
    lst.accepted.append({"fingerprint": peer_fingerprint(writer), "identity": peer_identity(writer)})
    writer.write(b"welcome")
    await writer.drain()


@pytest.fixture
async def listen() -> AsyncIterator[Callable[..., object]]:
    servers: list[asyncio.Server] = []

    async def start(cfg: TLSConfig, handler: Handler = _echo_identity) -> Listener:
        lst = Listener(port=0)

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer, lst)  # type: ignore[misc]
            finally:
                writer.close()

        ctx = server_context(cfg, on_refusal=lambda reason, exc: lst.refusals.append(reason))
        server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        lst.port = server.sockets[0].getsockname()[1]
        return lst

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _dial(port: int, ctx: ssl.SSLContext) -> bytes:
    """Connect, then read the listener's greeting (TLS 1.3 clients learn of their refusal here)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    try:
        return await asyncio.wait_for(reader.readexactly(7), 5)
    finally:
        writer.close()


def _raw_client_context(pki: CertSet, *, with_cert: bool = True, max_version: ssl.TLSVersion | None = None):
    """A context that is *not* from client_context: for peers that break the rules."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.client.trust)
    if with_cert:
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = max_version
    return ctx


# --------------------------------------------------------------------------- accepted


async def test_mutual_auth_with_init_certs(pki: CertSet, listen) -> None:
    lst = await listen(pki.server_config())
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lst.port, ssl=client_context(pki.client_config())
    )
    assert await reader.readexactly(7) == b"welcome"
    assert peer_fingerprint(writer) == pki.server.fingerprint
    assert verify_peer_name(writer, "dp-listener.cluster-b") == "dp-listener.cluster-b"
    ident = peer_identity(writer)
    assert ident.version == "TLSv1.3"
    assert ident.names == ("dp-listener.cluster-b", "127.0.0.1")
    assert "dataplane-ca" in ident.issuer
    writer.close()
    assert lst.accepted[0]["fingerprint"] == pki.client.fingerprint
    assert lst.refusals == []


async def test_fingerprints_stable_and_distinct(pki: CertSet, rogue: CertSet, listen) -> None:
    lst = await listen(pki.server_config())
    seen = []
    for _ in range(2):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", lst.port, ssl=client_context(pki.client_config())
        )
        seen.append(peer_fingerprint(writer))
        writer.close()
    await asyncio.sleep(0.05)
    assert seen == [pki.server.fingerprint] * 2  # the same server, the same fingerprint
    assert [a["fingerprint"] for a in lst.accepted] == [pki.client.fingerprint] * 2
    assert len(set(seen[0])) > 1 and len(seen[0]) == 64
    # different identities (same names, another key) have different fingerprints
    assert (
        len(
            {
                pki.server.fingerprint,
                pki.client.fingerprint,
                rogue.server.fingerprint,
                rogue.client.fingerprint,
            }
        )
        == 4
    )


async def test_pinned_name_may_be_an_ip_san_whatever_was_dialled(pki: CertSet, listen) -> None:
    lst = await listen(pki.server_config())
    _, writer = await asyncio.open_connection(
        "localhost",
        lst.port,
        ssl=client_context(pki.client_config("127.0.0.1")),
        server_hostname="ignored.example",
    )
    assert verify_peer_name(writer, "127.0.0.1") == "127.0.0.1"
    assert verify_peer_name(writer, "DP-Listener.Cluster-B.") == "dp-listener.cluster-b"
    writer.close()


async def test_two_cas_cross_trust(cross: CertSet, listen) -> None:
    assert cross.server.issuer == "cluster-b" and cross.client.issuer == "cluster-a"
    lst = await listen(cross.server_config())
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lst.port, ssl=client_context(cross.client_config())
    )
    assert await reader.readexactly(7) == b"welcome"
    assert peer_identity(writer).issuer == "cluster-b dataplane CA"
    writer.close()
    await asyncio.sleep(0.05)
    assert lst.accepted[0]["identity"].issuer == "cluster-a dataplane CA"  # type: ignore[attr-defined]


async def test_two_cas_same_cluster_bundle_refuses_the_other_cluster(cross: CertSet, listen) -> None:
    ca_a, ca_b = (ca.cert for ca in cross.cas)
    # the listener (cluster B) trusts only its own CA: the cluster-A client is refused
    own_only = TLSConfig(cross.server.cert, cross.server.key, ca_b, "dp-dialer.cluster-a")
    lst = await listen(own_only)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _dial(lst.port, client_context(cross.client_config()))
    assert await lst.wait_refusal() == (
        f"peer certificate is not signed by the trusted CA bundle {ca_b} "
        "(unable to get local issuer certificate)"
    )
    # the dialer (cluster A) trusts only its own CA: the cluster-B listener is refused
    lst2 = await listen(cross.server_config())
    dialer = TLSConfig(cross.client.cert, cross.client.key, ca_a, "dp-listener.cluster-b")
    with pytest.raises(ssl.SSLCertVerificationError) as exc_info:
        await _dial(lst2.port, client_context(dialer))
    assert describe_tls_error(exc_info.value, dialer).startswith(
        f"peer certificate is not signed by the trusted CA bundle {ca_a}"
    )


# --------------------------------------------------------------------------- refused


async def test_client_cert_from_another_ca_refused_on_both_sides(
    pki: CertSet, rogue: CertSet, listen
) -> None:
    lst = await listen(pki.server_config())
    impostor = TLSConfig(rogue.client.cert, rogue.client.key, pki.client.trust, "dp-listener.cluster-b")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)) as exc_info:
        await _dial(lst.port, client_context(impostor))
    server_says = await lst.wait_refusal()
    assert server_says.startswith(
        f"peer certificate is not signed by the trusted CA bundle {pki.server.trust}"
    )
    client_says = describe_tls_error(exc_info.value, impostor)
    assert "refused" in client_says, client_says
    assert lst.accepted == []


async def test_server_cert_from_another_ca_refused(pki: CertSet, rogue: CertSet, listen) -> None:
    impostor = TLSConfig(rogue.server.cert, rogue.server.key, pki.server.trust, "dp-dialer.cluster-a")
    lst = await listen(impostor)
    cfg = pki.client_config()
    with pytest.raises(ssl.SSLCertVerificationError) as exc_info:
        await _dial(lst.port, client_context(cfg))
    reason = describe_tls_error(exc_info.value, cfg)
    assert reason.startswith(f"peer certificate is not signed by the trusted CA bundle {pki.client.trust} (")
    assert lst.accepted == []


async def test_client_refuses_wrong_server_name(pki: CertSet, listen) -> None:
    lst = await listen(pki.server_config())
    cfg = pki.client_config("dp-listener.cluster-z")
    with pytest.raises(PeerNameMismatch) as exc_info:
        await _dial(lst.port, client_context(cfg))
    assert isinstance(exc_info.value, ssl.SSLCertVerificationError)
    assert exc_info.value.expected == "dp-listener.cluster-z"
    assert exc_info.value.presented == ["dp-listener.cluster-b", "127.0.0.1"]
    assert describe_tls_error(exc_info.value, cfg) == (
        "peer name mismatch: expected dp-listener.cluster-z, got ['dp-listener.cluster-b', '127.0.0.1']"
    )
    assert lst.accepted == []


async def test_server_refuses_wrong_client_name_in_handshake(pki: CertSet, listen) -> None:
    lst = await listen(pki.server_config("dp-dialer.cluster-z"))
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _dial(lst.port, client_context(pki.client_config()))
    assert (
        await lst.wait_refusal()
        == "peer name mismatch: expected dp-dialer.cluster-z, got ['dp-dialer.cluster-a']"
    )
    assert lst.accepted == []


async def test_server_checks_client_name_with_verify_peer_name(pki: CertSet, listen) -> None:
    verdicts: list[str] = []

    async def check(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lst: Listener) -> None:
        verdicts.append(verify_peer_name(writer, "dp-dialer.cluster-a"))
        try:
            verify_peer_name(writer.transport, "dp-dialer.cluster-z")
        except PeerNameMismatch as exc:
            verdicts.append(str(exc))
        writer.write(b"welcome")
        await writer.drain()

    lst = await listen(pki.server_config(peer_name=None), check)  # any client of the CA; checked by hand
    assert await _dial(lst.port, client_context(pki.client_config())) == b"welcome"
    assert verdicts == [
        "dp-dialer.cluster-a",
        "peer name mismatch: expected dp-dialer.cluster-z, got ['dp-dialer.cluster-a']",
    ]


async def test_no_client_certificate_refused(pki: CertSet, listen) -> None:
    lst = await listen(pki.server_config())
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _dial(lst.port, _raw_client_context(pki, with_cert=False))
    assert await lst.wait_refusal() == "peer presented no certificate"


async def test_tls12_only_client_refused(pki: CertSet, listen) -> None:
    lst = await listen(pki.server_config())
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _dial(lst.port, _raw_client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))
    assert (await lst.wait_refusal()).startswith("TLS version too old")


async def test_plaintext_peer_refused(pki: CertSet, listen) -> None:
    lst = await listen(pki.server_config())
    reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
    writer.write(b"DPLANE hello in plaintext\r\n" * 20)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert (await lst.wait_refusal()).startswith("peer does not speak TLS")


async def test_server_cert_cannot_act_as_client(pki: CertSet, listen) -> None:
    """The EKUs matter: a serverAuth-only certificate is refused as a client certificate."""
    lst = await listen(pki.server_config(peer_name=None))
    wrong_role = TLSConfig(pki.server.cert, pki.server.key, pki.client.trust, "dp-listener.cluster-b")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _dial(lst.port, client_context(wrong_role))
    assert (await lst.wait_refusal()).startswith("peer certificate is not valid for its role")


def test_uvloop_mutual_auth_and_refusal(pki: CertSet) -> None:
    """The pinned contexts work on uvloop (the project's production loop) too, on both sides."""

    async def scenario() -> tuple[bytes, list[str]]:
        refusals: list[str] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(peer_fingerprint(writer).encode()[:7])
            await writer.drain()
            writer.close()

        ctx = server_context(pki.server_config(), on_refusal=lambda reason, exc: refusals.append(reason))
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        got = await _dial(port, client_context(pki.client_config()))
        with pytest.raises(PeerNameMismatch):  # the dialer refuses the listener's name
            await _dial(port, client_context(pki.client_config("someone-else")))
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await _dial(port, _raw_client_context(pki, with_cert=False))  # the listener refuses
        for _ in range(100):
            if refusals:
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return got, refusals

    got, refusals = uvloop.run(scenario())
    assert got == pki.client.fingerprint[:7].encode()
    assert refusals == ["peer presented no certificate"]


def test_blocking_sockets_enforce_the_pinned_name(pki: CertSet) -> None:
    """wrap_socket (no asyncio) gets the same in-handshake name check."""
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context(pki.server_config()).wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(PeerNameMismatch, match="expected elsewhere, got"):
        client_context(pki.client_config("elsewhere")).wrap_socket(b, server_hostname="x")
    b.close()
    t.join(5)


# --------------------------------------------------------------------------- configuration and wording


def test_config_reports_missing_and_bad_files(pki: CertSet, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"TLS certificate .*nope.crt does not exist"):
        TLSConfig.from_paths(tmp_path / "nope.crt", pki.client.key, pki.client.trust, "x")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match=r"trusted CA bundle .*junk.pem is not a PEM file"):
        TLSConfig.from_paths(pki.client.cert, pki.client.key, junk, "x")
    with pytest.raises(TLSConfigError, match="is not a regular file"):
        TLSConfig.from_paths(pki.client.cert, tmp_path, pki.client.trust, "x")
    with pytest.raises(TLSConfigError, match="peer name must be a non-empty string"):
        TLSConfig.from_paths(pki.client.cert, pki.client.key, pki.client.trust, "")
    mismatched = TLSConfig(pki.client.cert, pki.server.key, pki.client.trust, "x")
    with pytest.raises(TLSConfigError, match="the private key does not belong to the certificate"):
        client_context(mismatched)


def test_config_rules(pki: CertSet, tmp_path: Path) -> None:
    cfg = TLSConfig.from_paths(str(pki.client.cert), str(pki.client.key), str(pki.client.trust), None)
    assert isinstance(cfg.cert, Path)
    with pytest.raises(TLSConfigError, match="peer_name is required"):
        client_context(cfg)
    server_context(TLSConfig(pki.server.cert, pki.server.key, pki.server.trust, None))  # any client of the CA
    plain = TLSConfig(tmp_path / "a", tmp_path / "b", tmp_path / "c", None, plaintext=True)  # files unchecked
    with pytest.raises(TLSConfigError, match="plaintext"):
        server_context(plain)
    ctx = client_context(pki.client_config())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert len(ctx.get_ca_certs()) == 1  # only the pinned bundle: no system store
    assert server_context(pki.server_config()).verify_mode == ssl.CERT_REQUIRED


def test_warn_plaintext(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("dataplane.test")
    with caplog.at_level(logging.WARNING):
        warn_plaintext(log, "10.0.0.2:7000")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "PLAINTEXT" in record.getMessage() and "10.0.0.2:7000" in record.getMessage()
    assert "neither encrypted nor authenticated" in record.getMessage()


def test_peer_names_from_getpeercert_dict() -> None:
    cert = {
        "subject": ((("organizationName", "dataplane"),), (("commonName", "a.example"),)),
        "subjectAltName": (
            ("DNS", "a.example"),
            ("DNS", "b.example"),
            ("IP Address", "2001:DB8:0:0:0:0:0:1\n"),
        ),
    }
    assert peer_names(cert) == ["a.example", "b.example", "2001:db8::1"]
    assert peer_names({}) == []


def test_describe_tls_error_wording() -> None:
    def verr(code: int, message: str) -> ssl.SSLCertVerificationError:
        exc = ssl.SSLCertVerificationError(1, message)
        exc.verify_code = code
        exc.verify_message = message
        return exc

    def serr(reason: str) -> ssl.SSLError:
        exc = ssl.SSLError(1, reason)
        exc.reason = reason
        return exc

    assert describe_tls_error(verr(10, "certificate has expired")) == "peer certificate has expired"
    assert describe_tls_error(verr(9, "certificate is not yet valid")).startswith(
        "peer certificate is not yet valid"
    )
    assert describe_tls_error(verr(20, "unable to get local issuer certificate")).startswith(
        "peer certificate is not signed by the trusted CA bundle"
    )
    assert describe_tls_error(serr("TLSV13_ALERT_CERTIFICATE_REQUIRED")).startswith(
        "peer requires a client certificate and we presented none"
    )
    assert describe_tls_error(serr("TLSV1_ALERT_UNKNOWN_CA")).startswith("peer refused our certificate")
    assert describe_tls_error(serr("TLSV1_ALERT_PROTOCOL_VERSION")).startswith("TLS version too old")
    assert describe_tls_error(asyncio.IncompleteReadError(b"", 7)).startswith("peer closed the connection")
    assert describe_tls_error(TimeoutError()).startswith("TLS handshake timed out")
    assert describe_tls_error(NoPeerCertificate()) == "peer presented no certificate"
    assert describe_tls_error(ConnectionRefusedError(111, "Connection refused")).startswith(
        "connection refused"
    )
    with pytest.raises(TypeError):
        peer_fingerprint(object())
