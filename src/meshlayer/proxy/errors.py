"""Errors the mesh itself answers with.

Every response the sidecar makes up (rather than relays) carries
``x-meshlayer-error: <reason>`` and a short JSON body naming the cause, so a
user can tell a mesh 503 from an app 503.
"""

from __future__ import annotations

import json
from http import HTTPStatus


class MeshError(Exception):
    """A request the mesh answers itself. ``reason`` is a short stable token."""

    def __init__(
        self, status: int, reason: str, message: str, retry_after: int = 0, policy: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.policy = policy
        """The AuthorizationPolicy behind a ``denied`` (``x-meshlayer-policy``), else ""."""


def render(
    status: int,
    reason: str,
    message: str,
    sidecar: str,
    close: bool,
    request_id: bytes = b"",
    retry_after: int = 0,
    policy: str = "",
) -> bytes:
    """The whole response for a mesh error, ready to write."""
    fields: dict[str, object] = {
        "error": reason,
        "status": status,
        "message": message,
        "sidecar": sidecar,
    }
    if policy:
        fields["policy"] = policy
    body = json.dumps(fields, separators=(",", ":")).encode()
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"x-meshlayer-error: {reason}",
        "content-type: application/json",
        f"content-length: {len(body) + 1}",
    ]
    if request_id:
        lines.append(f"x-request-id: {request_id.decode('latin-1')}")
    if retry_after:
        lines.append(f"retry-after: {retry_after}")
    if policy:
        lines.append(f"x-meshlayer-policy: {policy}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body + b"\n"
