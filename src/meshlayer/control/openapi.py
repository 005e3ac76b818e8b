"""``GET /openapi.json``: the control-plane API as an OpenAPI 3.1 document.

Hand-written, the machine-readable twin of ``docs/control-plane.md``; the
routes live in :mod:`meshlayer.control.server`. Change the three together
(a test checks every route is described here).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from meshlayer import __version__
from meshlayer.config.load import KINDS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _err(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_KIND = {
    "name": "kind",
    "in": "path",
    "required": True,
    "description": "Kind, case-insensitive, singular or plural (Service, services, httproutes).",
    "schema": {"type": "string"},
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Sidecar id.",
    "schema": {"type": "string"},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {
                "type": "string",
                "description": "Reason token: invalid, conflict, not-found, bad-request, "
                "too-large, method-not-allowed, store-unavailable, internal.",
            },
            "message": {"type": "string"},
            "document": {"type": "string", "description": "invalid: e.g. doc#2 (Service/x)"},
            "field": {"type": "string", "description": "invalid: dotted field path"},
            "problem": {"type": "string", "description": "invalid: what is wrong"},
        },
    },
    "Document": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "meshlayer/v1"},
            "kind": {"type": "string", "enum": list(KINDS)},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "resourceVersion": {
                        "type": "integer",
                        "description": "Set by the control plane; send it back for a "
                        "conditional write (409 when stale).",
                    },
                    "labels": {"type": "object"},
                },
            },
            "spec": {
                "type": "object",
                "description": "Validated by meshlayer.config.load; unknown fields are errors.",
            },
        },
    },
    "ApplyResult": {
        "type": "object",
        "required": ["version", "results"],
        "properties": {
            "version": {"type": "integer"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "resourceVersion": {"type": "integer"},
                        "action": {"enum": ["created", "configured", "unchanged"]},
                    },
                },
            },
        },
    },
    "List": {
        "type": "object",
        "properties": {
            "version": {"type": "integer"},
            "items": {"type": "array", "items": _ref("Document")},
        },
    },
    "Version": {"type": "object", "properties": {"version": {"type": "integer"}}},
    "Registration": {
        "type": "object",
        "required": ["service", "address"],
        "properties": {
            "service": {"type": "string"},
            "address": {"type": "string", "description": "HOST:PORT of the inbound listener"},
            "ttl": {"type": "number", "default": 10, "description": "lease, seconds"},
            "sidecar": {"type": "string", "description": "id; generated when absent"},
        },
    },
    "Registry": {
        "type": "object",
        "properties": {
            "version": {"type": "integer"},
            "endpoints": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sidecar": {"type": "string"},
                        "service": {"type": "string"},
                        "address": {"type": "string"},
                        "healthy": {"type": "boolean"},
                        "expires_in": {"type": "number"},
                    },
                },
            },
            "static": {
                "type": "array",
                "description": "spec.endpoints of Services, with active health-check state",
                "items": {
                    "type": "object",
                    "properties": {
                        "service": {"type": "string"},
                        "address": {"type": "string"},
                        "meshed": {"type": "boolean"},
                        "healthy": {"type": "boolean"},
                    },
                },
            },
        },
    },
    "Report": {
        "type": "object",
        "required": ["version"],
        "properties": {
            "version": {"type": "integer"},
            "error": {"type": ["string", "null"]},
            "cert": _ref("CertReport"),
        },
    },
    "CertReport": {
        "type": "object",
        "description": "The certificate a sidecar holds now (for trust-anchor rotation).",
        "required": ["issuer", "notAfter"],
        "properties": {
            "issuer": {"type": "string", "description": "SHA-256 fingerprint of its root"},
            "notAfter": {"type": "integer", "description": "unix time"},
        },
    },
    "Certificate": {
        "type": "object",
        "properties": {
            "certificate": {"type": "string", "description": "PEM leaf"},
            "chain": {"type": "array", "items": {"type": "string"}},
            "roots": {"type": "array", "items": {"type": "string"}, "description": "bundle"},
            "expires": {"type": "integer"},
            "issuer": {"type": "string", "description": "fingerprint of the signing root"},
            "generation": {"type": "integer"},
            "mesh": {"type": ["string", "null"], "description": "mesh listener HOST:PORT"},
            "trustDomain": {"type": "string"},
            "identity": {"type": "string", "description": "the SPIFFE ID issued"},
        },
    },
    "CA": {
        "type": "object",
        "properties": {
            "trustDomain": {"type": "string"},
            "generation": {"type": "integer"},
            "roots": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "fingerprint": {"type": "string"},
                        "notAfter": {"type": "integer"},
                        "signing": {"type": "boolean"},
                        "subject": {"type": "string"},
                        "pem": {"type": "string", "description": "the root certificate"},
                    },
                },
            },
        },
    },
    "Status": {
        "type": "object",
        "properties": {
            "version": {"type": "integer"},
            "store": {
                "type": "object",
                "properties": {
                    "ok": {"type": "boolean"},
                    "detail": {"type": "string"},
                    "id": {"type": "string", "description": "the store's identity"},
                },
            },
            "sidecars": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sidecar": {"type": "string"},
                        "service": {"type": ["string", "null"]},
                        "address": {"type": ["string", "null"]},
                        "healthy": {"type": ["boolean", "null"]},
                        "applied": {"type": "integer"},
                        "error": {"type": ["string", "null"]},
                        "connected": {
                            "type": "boolean",
                            "description": "has a watch stream open on any control process",
                        },
                        "cert": {"oneOf": [_ref("CertReport"), {"type": "null"}]},
                    },
                },
            },
        },
    },
}

PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "summary": "Store reachable?",
            "responses": {"200": {"description": "ok"}, "503": {"description": "store down"}},
        }
    },
    "/openapi.json": {
        "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}
    },
    "/v1/apply": {
        "post": {
            "summary": "Create or update documents, all or nothing, at one new mesh version",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["documents"],
                            "properties": {
                                "documents": {"type": "array", "items": _ref("Document")}
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(_ref("ApplyResult"), "applied (or all unchanged)"),
                "400": _err("invalid document; nothing applied"),
                "409": _err("stale resourceVersion; nothing applied"),
                "413": _err("body too large"),
            },
        }
    },
    "/v1/resources": {
        "get": {
            "summary": "All resources",
            "responses": {"200": _json(_ref("List"), "resources of all kinds")},
        }
    },
    "/v1/resources/{kind}": {
        "get": {
            "summary": "Resources of one kind",
            "parameters": [_KIND],
            "responses": {"200": _json(_ref("List"), "resources"), "404": _err("unknown kind")},
        }
    },
    "/v1/resources/{kind}/{name}": {
        "get": {
            "summary": "One resource",
            "parameters": [_KIND, _NAME],
            "responses": {"200": _json(_ref("Document"), "the document"), "404": _err("absent")},
        },
        "delete": {
            "summary": "Delete one resource",
            "parameters": [
                _KIND,
                _NAME,
                {
                    "name": "resourceVersion",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer"},
                },
            ],
            "responses": {
                "200": _json(_ref("Version"), "deleted at this mesh version"),
                "404": _err("absent"),
                "409": _err("stale resourceVersion"),
            },
        },
    },
    "/v1/registry": {
        "get": {
            "summary": "Registered endpoints and static endpoints with their health",
            "responses": {"200": _json(_ref("Registry"), "the registry")},
        },
        "post": {
            "summary": "Register a sidecar (replaces an entry with the same id)",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("Registration")}},
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "sidecar": {"type": "string"},
                            "ttl": {"type": "number"},
                            "version": {"type": "integer"},
                        },
                    },
                    "registered",
                ),
                "400": _err("bad registration"),
            },
        },
    },
    "/v1/registry/{id}": {
        "delete": {
            "summary": "Deregister now (graceful shutdown)",
            "parameters": [_ID],
            "responses": {"200": {"description": "gone (or was)"}},
        }
    },
    "/v1/registry/{id}/renew": {
        "post": {
            "summary": "Renew a lease by its TTL",
            "parameters": [_ID],
            "responses": {
                "200": _json({"type": "object", "properties": {"ttl": {"type": "number"}}}, "ok"),
                "404": _err("lease lapsed: register again"),
            },
        }
    },
    "/v1/watch": {
        "get": {
            "summary": "Server-sent events: a snapshot now and after every mesh version change",
            "description": "event: snapshot, id: <version>, data: {version, store, resources, "
            "endpoints: {service: [{address, healthy, identity}]}, trust: {domain, roots, "
            "generation}}; coalesced; ': keep-alive' comments while idle.",
            "parameters": [
                {"name": "sidecar", "in": "query", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {
                    "description": "event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "400": _err("sidecar parameter missing"),
            },
        }
    },
    "/v1/status": {
        "get": {
            "summary": "Mesh version, store state, sidecars (applied version, errors, connected)",
            "responses": {"200": _json(_ref("Status"), "status")},
        }
    },
    "/v1/status/{id}": {
        "post": {
            "summary": "A sidecar reports the version it applied, or why it rejected one",
            "parameters": [_ID],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("Report")}},
            },
            "responses": {"204": {"description": "recorded"}, "400": _err("bad report")},
        }
    },
    "/v1/tokens": {
        "post": {
            "summary": "Create a join token for one service (admin token required)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["service"],
                            "properties": {
                                "service": {"type": "string"},
                                "ttl": {"type": "number", "description": "seconds (24h)"},
                                "singleUse": {
                                    "type": "boolean",
                                    "description": "one certificate only (default: reusable "
                                    "until it expires)",
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "token": {"type": "string"},
                            "service": {"type": "string"},
                            "expires": {"type": "integer"},
                            "singleUse": {"type": "boolean"},
                        },
                    },
                    "the token (shown once)",
                ),
                "401": _err("no admin token"),
                "403": _err("wrong admin token"),
            },
        }
    },
    "/v1/certificates": {
        "post": {
            "summary": "Sign a CSR: join token (API listener) or client certificate (mesh)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "properties": {"csr": {"type": "string"}}}
                    }
                },
            },
            "responses": {
                "200": _json(_ref("Certificate"), "issued"),
                "400": _err("bad CSR: key, SANs, CA requested"),
                "401": _err("no, unknown, used or expired join token"),
                "403": _err("the CSR asks for another identity than the caller's"),
            },
        }
    },
    "/v1/ca": {
        "get": {
            "summary": "Trust domain, roots (bundle), signing root, generation",
            "responses": {"200": _json(_ref("CA"), "the CA")},
        }
    },
    "/v1/ca/rotate": {
        "post": {
            "summary": "One trust-anchor rotation step: add, switch, retire (admin token)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["phase"],
                            "properties": {
                                "phase": {"enum": ["add", "switch", "retire"]},
                                "force": {"type": "boolean"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "phase": {"type": "string"},
                            "generation": {"type": "integer"},
                            "signing": {"type": "string"},
                            "roots": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "done",
                ),
                "409": _err(
                    "not yet: sidecars lag (waiting: [ids]) or the step does not apply now"
                ),
            },
        }
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshlayer control plane",
            "version": __version__,
            "description": "JSON over HTTP/1.1; see docs/control-plane.md.",
        },
        "paths": PATHS,
        "components": {"schemas": SCHEMAS},
    }


@functools.cache
def document_bytes() -> bytes:
    """The document, serialized once."""
    return json.dumps(document(), indent=1).encode()
