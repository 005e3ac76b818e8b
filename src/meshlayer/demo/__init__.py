"""The demo mesh: a small shop (frontend, catalog, reviews), each instance with a sidecar.

``meshlayer demo`` (:mod:`meshlayer.demo.run`) starts it, sends traffic and
prints a summary; :mod:`meshlayer.demo.services` holds the three apps, plain
stdlib HTTP servers that know service names only, never replica addresses.
"""
