"""meshlayer control plane: API, registry, stores."""
