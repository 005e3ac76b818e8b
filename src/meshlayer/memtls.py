"""Loading a certificate and its private key into an ``ssl.SSLContext`` from memory.

``ssl`` only reads key material from a path. Both planes keep their keys in
memory (a sidecar's key must never reach a disk), so the PEM goes through an
anonymous ``memfd`` that only this process can open, closed right after.
"""

from __future__ import annotations

import os
import ssl


def load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``ctx.load_cert_chain`` from memory: an anonymous memfd, never a file on disk."""
    fd = os.memfd_create("meshlayer-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert_pem + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
