"""``dataplane certs init`` and :func:`dataplane.certs.init_certs`: files, contents, refusals, the CLI."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from dataplane import __version__
from dataplane.certs import CertsExistError, InvalidNameError, init_certs, load_cert_set
from dataplane.cli import main

REPO = Path(__file__).resolve().parents[1]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _one_line_error(err: str, prefix: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prefix}: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- the library


def test_init_certs_contents(tmp_path: Path) -> None:
    cs = init_certs(tmp_path / "pki", server_names=["dp.cluster-b.example", "10.0.0.7"], days=30)
    ca = _cert(cs.cas[0].cert)
    server, client = _cert(cs.server.cert), _cert(cs.client.cert)
    # the CA
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (
        isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    )
    # the leaves: signed by the CA, with their names, roles and validity
    for leaf in (server, client):
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30  # 30 days + 5 min skew
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dp.cluster-b.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert server.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "dp.cluster-b.example"
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    # single CA: both sides trust it
    assert cs.server.trust.read_bytes() == cs.client.trust.read_bytes() == cs.cas[0].cert.read_bytes()
    # private keys are 0600, the directory 0700
    for key in (cs.cas[0].key, cs.server.key, cs.client.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cs.directory.stat().st_mode) == 0o700
    # the manifest says which file is what, and reads back
    manifest = json.loads(cs.manifest.read_text())
    assert manifest["server"]["names"] == ["dp.cluster-b.example", "10.0.0.7"]
    assert manifest["server"]["sha256"] == cs.server.fingerprint
    assert set(manifest["files"]) == {p.name for p in cs.directory.iterdir()}
    assert load_cert_set(cs.directory) == cs
    assert "server.key" in cs.readme.read_text()


def test_init_certs_two_cas_cross_trust(tmp_path: Path) -> None:
    cs = init_certs(tmp_path, two_cas=True)
    ca_a, ca_b = cs.cas
    assert (ca_a.name, ca_b.name) == ("cluster-a", "cluster-b")
    _cert(cs.client.cert).verify_directly_issued_by(_cert(ca_a.cert))
    _cert(cs.server.cert).verify_directly_issued_by(_cert(ca_b.cert))
    assert cs.server.trust.read_bytes() == ca_a.cert.read_bytes()  # the listener trusts cluster A's CA
    assert cs.client.trust.read_bytes() == ca_b.cert.read_bytes()  # the dialer trusts cluster B's CA
    assert ca_a.cert.read_bytes() != ca_b.cert.read_bytes()


def test_init_certs_refuses_overwrite_and_bad_values(tmp_path: Path) -> None:
    cs = init_certs(tmp_path)
    before = cs.server.cert.read_bytes()
    with pytest.raises(CertsExistError) as exc_info:
        init_certs(tmp_path)
    assert cs.server.cert in exc_info.value.existing
    assert cs.server.cert.read_bytes() == before
    assert init_certs(tmp_path, force=True).server.fingerprint != cs.server.fingerprint
    for bad in (["has space"], ["*.wild.example"], ["-x.example"], [""], []):
        with pytest.raises(InvalidNameError):
            init_certs(tmp_path / "x", server_names=bad)
    with pytest.raises(InvalidNameError):
        init_certs(tmp_path / "x", days=0)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the command line


def test_cli_certs_init_creates_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "pki"
    rc = main(
        ["certs", "init", str(out_dir), "--server-name", "dp-b.example", "--client-name", "dp-a.example"]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    cs = load_cert_set(out_dir)
    assert cs.server.names == ("dp-b.example",) and cs.client.names == ("dp-a.example",)
    for path, _ in cs.files():
        assert path.is_file()
        assert path.name in out  # every created file is listed
    assert f"created {len(cs.files())} files in {out_dir}" in out
    assert cs.server.fingerprint in out and cs.client.fingerprint in out


def test_cli_two_cas_and_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", str(tmp_path), "--two-cas", "--days", "7"]) == 0
    out = capsys.readouterr().out
    assert "cluster-a-ca.crt" in out and "cluster-b-ca.crt" in out and "valid 7 days" in out
    assert load_cert_set(tmp_path).two_cas


def test_cli_refuses_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", str(tmp_path)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert main(["certs", "init", str(tmp_path)]) == 1
    line = _one_line_error(capsys.readouterr().err, "dataplane certs init")
    assert "refusing to overwrite" in line and "--force" in line and "server.key" in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert main(["certs", "init", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "server.key").read_bytes() != before["server.key"]


def test_cli_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["certs", "--help"], ["certs", "init", "--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "dataplane certs init ./pki" in out, argv
    assert main(["certs", "init", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--two-cas", "--server-name", "--client-name", "--days", "--force"):
        assert option in out


@pytest.mark.parametrize(
    ("argv", "prog", "words"),
    [
        (["certs", "init"], "dataplane certs init", "required: DIR"),
        (["certs", "init", "d", "--days", "0"], "dataplane certs init", "--days"),
        (["certs", "init", "d", "--days", "soon"], "dataplane certs init", "not a whole number"),
        (
            ["certs", "init", "d", "--server-name", "bad name"],
            "dataplane certs init",
            "invalid certificate name",
        ),
        (["certs", "init", "d", "--two-cas", "--ca-name", "x"], "dataplane certs init", "--ca-name"),
        (["certs", "init", "d", "--bogus"], "dataplane", "unrecognized arguments: --bogus"),
        (["certs"], "dataplane certs", "required: COMMAND"),
        (["nonsense"], "dataplane", "invalid choice"),
        ([], "dataplane", "required: COMMAND"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv, prog, words
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert words in _one_line_error(err, prog)
    assert not (tmp_path / "d").exists()


def test_cli_failure_exits_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["certs", "init", str(blocker)]) == 1
    assert "is not a directory" in _one_line_error(capsys.readouterr().err, "dataplane certs init")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dataplane {__version__}"


def test_python_dash_m_dataplane(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "dataplane", "--version"], capture_output=True, text=True, cwd=REPO
    )
    assert ok.returncode == 0 and ok.stdout.strip() == f"dataplane {__version__}"
    bad = subprocess.run(
        [sys.executable, "-m", "dataplane", "certs", "init", str(tmp_path), "--days", "-3"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    _one_line_error(bad.stderr, "dataplane certs init")
