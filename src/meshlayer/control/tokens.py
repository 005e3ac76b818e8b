"""Join tokens (a sidecar's first certificate) and the admin token (the write API).

Theory of operation
-------------------
A **join token** is 32 random bytes, URL-safe base64, bound to one service
and an expiry. The store keeps only its SHA-256 (blob ``token/<hex>``) with
the service, the expiry, whether it is single-use and whether it was used;
the token itself is shown once, to the operator who created it.

By default a token is **reusable until it expires** (as Kubernetes bootstrap
tokens): a sidecar keeps its key in memory only, so after a restart, or after
its certificate expired while the control plane was away, it proves itself
again with the same token. What a token can buy never changes: certificates
for its one service. A ``--single-use`` token buys one certificate;
redeeming it is a compare-and-set from unused to used, so two callers racing
with one token cannot both win.

The **admin token** guards the control plane's writes. It comes from
``MESHLAYER_ADMIN_TOKEN`` when the control plane starts; otherwise it is read
from, or generated into, the file ``admin-token`` (mode 0600) in the
control plane's state folder. Only its location is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from meshlayer.control.store import Store

ADMIN_ENV = "MESHLAYER_ADMIN_TOKEN"
ADMIN_FILE = "admin-token"
DEFAULT_STATE_DIR = Path(".meshlayer")
DEFAULT_TOKEN_TTL = 86400.0
MAX_TOKEN_TTL = 365 * 86400.0


class TokenError(Exception):
    """A join token that cannot be used; ``status`` 401 (unknown, used up, expired)."""

    status = 401
    reason = "bad-token"


@dataclass(frozen=True, slots=True)
class JoinToken:
    """What the store knows of a join token."""

    service: str
    expires: float
    used: bool = False
    single_use: bool = False
    """One certificate only; otherwise any number until ``expires``."""

    def to_bytes(self) -> bytes:
        doc = {
            "service": self.service,
            "expires": self.expires,
            "used": self.used,
            "singleUse": self.single_use,
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> JoinToken:
        doc = json.loads(raw)
        return cls(
            str(doc["service"]),
            float(doc["expires"]),
            bool(doc["used"]),
            bool(doc.get("singleUse", True)),  # records from before reusable tokens
        )


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _blob(token: str) -> str:
    return f"token/{token_hash(token)}"


def new_token(kind: str) -> str:
    """A fresh secret: ``ml<kind>_`` and 256 random bits, URL-safe. The prefix names
    what it is (for people and secret scanners) and keeps a token from starting with
    ``-``, which a command line would read as an option (``--token -x...``)."""
    return f"ml{kind}_{secrets.token_urlsafe(32)}"


async def create_join_token(
    store: Store, service: str, ttl: float = DEFAULT_TOKEN_TTL, single_use: bool = False
) -> tuple[str, float]:
    """A new token for ``service``; (token, expiry as unix time)."""
    token = new_token("j")
    expires = time.time() + ttl
    rec = JoinToken(service, expires, single_use=single_use)
    if not await store.put_blob(_blob(token), rec.to_bytes(), None):
        raise RuntimeError("token collision")  # 2**-256; never
    return token, expires


USED_UP = "join token: already used (a single-use token gets one certificate)"


async def _load(store: Store, token: str) -> tuple[bytes, JoinToken]:
    """The stored bytes and record of a token that can still be used; TokenError."""
    raw = await store.get_blob(_blob(token)) if token else None
    if raw is None:
        raise TokenError("join token: unknown")
    rec = JoinToken.from_bytes(raw)
    if rec.single_use and rec.used:
        raise TokenError(USED_UP)
    if rec.expires <= time.time():
        raise TokenError("join token: expired")
    return raw, rec


async def peek_join_token(store: Store, token: str) -> JoinToken:
    """The token's record if it can still be used; TokenError otherwise."""
    return (await _load(store, token))[1]


async def redeem_join_token(store: Store, token: str) -> JoinToken:
    """Spend one use of the token; its record. TokenError if it cannot be used.
    A reusable token stays as it is; a single-use one is marked used (once)."""
    raw, rec = await _load(store, token)
    if rec.single_use:
        used = JoinToken(rec.service, rec.expires, used=True, single_use=True).to_bytes()
        if not await store.put_blob(_blob(token), used, raw):
            raise TokenError(USED_UP)
    return rec


def state_dir_for(store_url: str) -> Path:
    """The control plane's state folder: the SQLite file's folder, else ``./.meshlayer``."""
    if store_url.startswith("sqlite:"):
        path = store_url[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
        return Path(path).parent
    return DEFAULT_STATE_DIR


def load_admin_token(state_dir: Path) -> tuple[str, Path | None]:
    """(admin token, file it came from or was written to; None when from the env)."""
    env = os.environ.get(ADMIN_ENV, "").strip()
    if env:
        return env, None
    path = state_dir / ADMIN_FILE
    try:
        text = path.read_text().strip()
        if text:
            return text, path
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    token = new_token("a")
    tmp = path.with_name(f".{ADMIN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    try:  # another control process may have written one first: keep theirs
        os.link(tmp, path)
    except FileExistsError:
        token = path.read_text().strip()
    finally:
        tmp.unlink()
    return token, path


def admin_token_matches(expected: str, header: str | None) -> bool | None:
    """None: no bearer token sent; else whether it is the admin token."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return hmac.compare_digest(value.strip().encode(), expected.encode())


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header, or ''."""
    if not header:
        return ""
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""
