"""Peer verification (proxy/tls.py) and the identity client's pure parts (proxy/identity.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshlayer.proxy.identity import issuer_fingerprint, make_csr, renew_delay
from meshlayer.proxy.tls import PeerRejected, control_id, verify_peer

TD = "meshlayer.local"


def _cert(
    uris: list[str],
    ca: bool = False,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Name | None = None,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if uris:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return b.sign(issuer_key or key, hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_accepts_a_workload_id_of_the_trust_domain() -> None:
    peer = f"spiffe://{TD}/ns/default/sa/catalog"
    assert verify_peer(_der(_cert([peer])), TD) == peer
    assert verify_peer(_der(_cert([peer])), TD, expected=peer) == peer


@pytest.mark.parametrize(
    ("uris", "ca", "expected", "reason"),
    [
        ([f"spiffe://{TD}/ns/default/sa/a"], True, None, "ca-as-leaf"),
        ([], False, None, "no-spiffe-id"),
        (
            [f"spiffe://{TD}/ns/default/sa/a", f"spiffe://{TD}/ns/default/sa/b"],
            False,
            None,
            "no-spiffe-id",
        ),
        (["spiffe://other.local/ns/default/sa/a"], False, None, "wrong-trust-domain"),
        (["https://example.com/"], False, None, "bad-spiffe-id"),
        ([f"spiffe://{TD}/sa/a"], False, None, "bad-spiffe-id"),
        ([f"spiffe://{TD}/ns/default/sa/a/../b"], False, None, "bad-spiffe-id"),
        (
            [f"spiffe://{TD}/ns/default/sa/a"],
            False,
            f"spiffe://{TD}/ns/default/sa/b",
            "wrong-identity",
        ),
    ],
)
def test_rejects(uris: list[str], ca: bool, expected: str | None, reason: str) -> None:
    with pytest.raises(PeerRejected) as err:
        verify_peer(_der(_cert(uris, ca=ca)), TD, expected)
    assert err.value.reason == reason


def test_rejects_no_certificate_and_garbage() -> None:
    with pytest.raises(PeerRejected, match="no certificate"):
        verify_peer(None, TD)
    with pytest.raises(PeerRejected) as err:
        verify_peer(b"not a certificate", TD)
    assert err.value.reason == "bad-certificate"


def test_control_id() -> None:
    assert control_id(TD) == f"spiffe://{TD}/ns/meshlayer/sa/control"
    assert verify_peer(_der(_cert([control_id(TD)])), TD, control_id(TD)) == control_id(TD)


def test_csr_names_the_service_and_keeps_the_key() -> None:
    key_pem, csr_pem = make_csr("catalog", TD)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TD}/ns/default/sa/catalog"
    ]
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert b"PRIVATE KEY" not in csr_pem


def test_renewal_at_seventy_percent_with_jitter() -> None:
    delays = [renew_delay(1000.0, 1100.0, 1000.0) for _ in range(500)]
    assert all(60.0 <= d <= 80.0 for d in delays)
    assert max(delays) - min(delays) > 10  # jittered, not one instant
    assert renew_delay(1000.0, 1100.0, 1095.0) == 0.0  # overdue: now


def test_issuer_fingerprint_picks_the_signing_root() -> None:
    k1, k2 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    n1 = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r1")])
    n2 = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r2")])
    now = dt.datetime.now(dt.UTC)

    def root(key: ec.EllipticCurvePrivateKey, name: x509.Name) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )

    r1, r2 = root(k1, n1), root(k2, n2)
    leaf = _cert([f"spiffe://{TD}/ns/default/sa/a"], issuer_key=k2, issuer=n2)
    pems = [r.public_bytes(serialization.Encoding.PEM).decode() for r in (r1, r2)]
    fp = issuer_fingerprint(leaf, pems)
    assert fp and fp == issuer_fingerprint(leaf, pems[1:])
    assert issuer_fingerprint(leaf, pems[:1]) == ""
