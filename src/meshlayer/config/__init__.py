"""Typed config resources shared by both planes, and their validation."""

from meshlayer.config.errors import ConfigError
from meshlayer.config.load import load_documents, load_file, parse_documents
from meshlayer.config.model import (
    CircuitBreaker,
    Endpoint,
    MeshConfig,
    OutlierDetection,
    RetryPolicy,
    Service,
    Timeouts,
)

__all__ = [
    "CircuitBreaker",
    "ConfigError",
    "Endpoint",
    "MeshConfig",
    "OutlierDetection",
    "RetryPolicy",
    "Service",
    "Timeouts",
    "load_documents",
    "load_file",
    "parse_documents",
]
