"""meshlayer.control.ca and .tokens over a real SqliteStore: CSR checks, leaf contents,
rotation state, compare-and-set between two stores on one file, join tokens."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlayer.control.ca import (
    CAError,
    CAState,
    CertificateAuthority,
    check_csr,
    is_ca,
    load_root,
    new_root,
    parse_spiffe_id,
    spiffe_id,
    uri_sans,
)
from meshlayer.control.sqlite import SqliteStore
from meshlayer.control.tokens import (
    TokenError,
    admin_token_matches,
    create_join_token,
    load_admin_token,
    peek_join_token,
    redeem_join_token,
    state_dir_for,
    token_hash,
)

T = TypeVar("T")
ID = "spiffe://meshlayer.local/ns/default/sa/catalog"


def run(body: Callable[[SqliteStore], Awaitable[T]], path: Path) -> T:
    async def main() -> T:
        store = SqliteStore(path / "s.db")
        await store.open()
        try:
            return await asyncio.wait_for(body(store), 20)
        finally:
            await store.close()

    return asyncio.run(main())


def csr(key: Any, names: list[x509.GeneralName] | None, ca: bool = False) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "t")])
    )
    if names is not None:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


P256 = ec.generate_private_key(ec.SECP256R1())


def test_spiffe_ids() -> None:
    assert spiffe_id("td", "a") == "spiffe://td/ns/default/sa/a"
    assert parse_spiffe_id(ID) == ("meshlayer.local", "default", "catalog")
    for bad in [
        "http://x/ns/a/sa/b",
        "spiffe://td",
        "spiffe://td/ns/a/sa/",
        "spiffe:///ns/a/sa/b",
        "spiffe://td/ns/a/sa/b/c",
        "spiffe://td/ns/a/xx/b",
    ]:
        assert parse_spiffe_id(bad) is None, bad


def test_check_csr_accepts_one_uri_san_with_p256_or_rsa2048() -> None:
    _, got = check_csr(csr(P256, [x509.UniformResourceIdentifier(ID)]))
    assert got == ID
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert check_csr(csr(rsa_key, [x509.UniformResourceIdentifier(ID)]))[1] == ID


@pytest.mark.parametrize(
    ("what", "pem", "words"),
    [
        ("two URIs", csr(P256, [x509.UniformResourceIdentifier(ID)] * 2), "exactly one"),
        ("DNS only", csr(P256, [x509.DNSName("catalog")]), "exactly one"),
        ("no SAN", csr(P256, None), "one URI SAN"),
        ("CA", csr(P256, [x509.UniformResourceIdentifier(ID)], ca=True), "CA"),
        (
            "P-384",
            csr(ec.generate_private_key(ec.SECP384R1()), [x509.UniformResourceIdentifier(ID)]),
            "P-256",
        ),
        (
            "RSA 1024",
            csr(
                rsa.generate_private_key(public_exponent=65537, key_size=1024),
                [x509.UniformResourceIdentifier(ID)],
            ),
            "2048",
        ),
        ("garbage", b"not a csr", "PEM"),
    ],
)
def test_check_csr_refuses(what: str, pem: bytes, words: str) -> None:
    with pytest.raises(CAError) as err:
        check_csr(pem)
    assert err.value.status == 400 and words in err.value.message, (what, err.value.message)


def test_check_csr_refuses_a_bad_signature() -> None:
    good = x509.load_pem_x509_csr(csr(P256, [x509.UniformResourceIdentifier(ID)]))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="signature"):
        check_csr(tampered)


def test_leaf_contents(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        ca = CertificateAuthority(store, "meshlayer.local", cert_ttl=30)
        state, created = await ca.load()
        assert created and state.generation == 1 and len(state.roots) == 1
        parsed, ident = check_csr(csr(P256, [x509.UniformResourceIdentifier(ID)]))
        issued = ca.sign(parsed, ident)
        leaf = issued.cert
        assert uri_sans(leaf) == [ID] and not is_ca(leaf)
        assert issued.issuer == state.signing
        leaf.verify_directly_issued_by(state.signer.cert)
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and not ku.key_cert_sign
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        life = leaf.not_valid_after_utc.timestamp() - time.time()
        assert 28 < life <= 30
        root = state.signer.cert
        assert is_ca(root)
        bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.path_length == 0
        assert root.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=3600)
        assert ca.issuer_of(leaf) == state.signing

    run(body, tmp_path)


def test_two_stores_on_one_file_share_one_ca_and_its_rotation(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        other = SqliteStore(tmp_path / "s.db")
        await other.open()
        try:
            a, b = CertificateAuthority(store), CertificateAuthority(other)
            (sa, created_a), (sb, created_b) = await asyncio.gather(a.load(), b.load())
            assert [created_a, created_b].count(True) == 1  # compare-and-set: one wins
            assert sa.signing == sb.signing
            before = await store.version()
            added = await a.add_root()
            assert await store.version() > before  # watch streams push the new bundle
            assert len(added.roots) == 2 and added.signing == sa.signing
            with pytest.raises(CAError) as err:
                await b.add_root()
            assert err.value.status == 409
            with pytest.raises(CAError):
                await b.retire()  # not switched yet
            switched = await b.switch()
            assert switched.generation == 2 and switched.signing == added.roots[1].fingerprint
            assert (await a.refresh()).signing == switched.signing
            retired = await a.retire()
            assert [r.fingerprint for r in retired.roots] == [switched.signing]
            back = CAState.from_bytes(retired.to_bytes())
            assert back.to_bytes() == retired.to_bytes() and back.signing == retired.signing
        finally:
            await other.close()

    run(body, tmp_path)


def test_supplied_root_is_stored_and_checked(tmp_path: Path) -> None:
    root = new_root("meshlayer.local")
    cert_pem = root.cert.public_bytes(serialization.Encoding.PEM)
    key_pem = root.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    loaded = load_root(cert_pem, key_pem)
    assert loaded.fingerprint == root.fingerprint
    with pytest.raises(ValueError, match="does not match"):
        load_root(
            cert_pem,
            new_root("x").key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    with pytest.raises(ValueError, match="--ca-cert"):
        load_root(b"nope", key_pem)

    async def body(store: SqliteStore) -> None:
        state, _ = await CertificateAuthority(store, supplied=loaded).load()
        assert state.signing == root.fingerprint
        # a later start with another root keeps the stored one
        again, created = await CertificateAuthority(store, supplied=new_root("y")).load()
        assert not created and again.signing == root.fingerprint

    run(body, tmp_path)


def test_join_tokens_are_reusable_or_single_use_hashed_and_expire(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        token, expires = await create_join_token(store, "catalog", 60)
        # never read as an option on a command line (`--token -x...` was a usage error)
        assert token.startswith("mlj_") and len(token) >= 4 + 43 and expires > time.time() + 50
        assert (await peek_join_token(store, token)).service == "catalog"
        for _ in range(3):  # reusable until it expires, for its one service
            assert (await redeem_join_token(store, token)).service == "catalog"
        once, _ = await create_join_token(store, "catalog", 60, single_use=True)
        results = await asyncio.gather(
            *(redeem_join_token(store, once) for _ in range(5)), return_exceptions=True
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, TokenError) for r in results if isinstance(r, BaseException))
        with pytest.raises(TokenError, match="already used"):
            await peek_join_token(store, once)
        with pytest.raises(TokenError, match="unknown"):
            await peek_join_token(store, "nope")
        short, _ = await create_join_token(store, "catalog", 0.05)
        await asyncio.sleep(0.1)
        with pytest.raises(TokenError, match="expired"):
            await redeem_join_token(store, short)
        # only the hash is stored
        raw = await store.get_blob("token/" + token_hash(token))
        assert raw is not None and token.encode() not in raw

    run(body, tmp_path)


def test_admin_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLAYER_ADMIN_TOKEN", raising=False)
    state = state_dir_for(f"sqlite:{tmp_path / 'st' / 'c.db'}")
    assert state == tmp_path / "st"
    token, path = load_admin_token(state)
    assert token.startswith("mla_")
    assert path == state / "admin-token" and path.stat().st_mode & 0o777 == 0o600
    assert load_admin_token(state) == (token, path)  # kept across restarts
    monkeypatch.setenv("MESHLAYER_ADMIN_TOKEN", "from-env")
    assert load_admin_token(state) == ("from-env", None)
    assert admin_token_matches(token, f"Bearer {token}") is True
    assert admin_token_matches(token, "Bearer wrong") is False
    assert admin_token_matches(token, None) is None
    assert admin_token_matches(token, f"Basic {token}") is None
