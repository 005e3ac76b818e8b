"""Typed config resources shared by both planes, and their validation."""

from meshlayer.config.errors import ConfigError
from meshlayer.config.load import load_documents, load_file, parse_documents
from meshlayer.config.model import (
    BackendRef,
    CircuitBreaker,
    Endpoint,
    HeaderMatch,
    HTTPRoute,
    MeshConfig,
    OutlierDetection,
    PathMatch,
    RetryPolicy,
    RouteMatch,
    RouteRetry,
    RouteRule,
    Service,
    Timeouts,
)

__all__ = [
    "BackendRef",
    "CircuitBreaker",
    "ConfigError",
    "Endpoint",
    "HTTPRoute",
    "HeaderMatch",
    "MeshConfig",
    "OutlierDetection",
    "PathMatch",
    "RetryPolicy",
    "RouteMatch",
    "RouteRetry",
    "RouteRule",
    "Service",
    "Timeouts",
    "load_documents",
    "load_file",
    "parse_documents",
]
