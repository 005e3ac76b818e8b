"""``meshlayer net qos``: the host's packet scheduler for priority classes (``tc``)."""
