"""The ``meshlayer`` command."""
