"""meshlayer: a service mesh that treats the mesh as a network layer."""

__version__ = "0.1.0"
