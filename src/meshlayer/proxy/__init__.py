"""The data plane: listeners, codec, router, balancer, pool and filters."""
