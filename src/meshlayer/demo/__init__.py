"""The demo mesh: a small shop (frontend, catalog, reviews) on its own control plane.

``meshlayer demo`` (:mod:`meshlayer.demo.run`) starts it, sends traffic and
prints a summary; :mod:`meshlayer.demo.mesh` holds the mesh config it applies
and reads the control plane's status; :mod:`meshlayer.demo.load` the load
generator and the metrics it reads; :mod:`meshlayer.demo.procs` the child
processes; :mod:`meshlayer.demo.services` the three apps, plain stdlib HTTP
servers that know service names only, never replica addresses.
"""
