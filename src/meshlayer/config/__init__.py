"""Typed config resources shared by both planes, and their validation."""

from meshlayer.config.classification import ClassificationRule
from meshlayer.config.errors import ConfigError
from meshlayer.config.load import load_documents, load_file, parse_documents
from meshlayer.config.model import (
    AuthorizationPolicy,
    BackendRef,
    CircuitBreaker,
    Endpoint,
    HeaderMatch,
    HTTPRoute,
    MeshConfig,
    MeshSettings,
    OutlierDetection,
    PathMatch,
    PriorityClass,
    RetryPolicy,
    RouteMatch,
    RouteRetry,
    RouteRule,
    Service,
    Timeouts,
)

__all__ = [
    "AuthorizationPolicy",
    "BackendRef",
    "CircuitBreaker",
    "ClassificationRule",
    "ConfigError",
    "Endpoint",
    "HTTPRoute",
    "HeaderMatch",
    "MeshConfig",
    "MeshSettings",
    "OutlierDetection",
    "PathMatch",
    "PriorityClass",
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
