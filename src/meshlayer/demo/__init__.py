"""The demo mesh: a tea shop of eight services behind the gateway, under mixed load.

``meshlayer demo`` (:mod:`meshlayer.demo.run`) starts it and shows each priority
class's traffic live; :mod:`meshlayer.demo.mesh` holds the mesh config it applies
(services, priority classes, the gateway's ClassificationRules) and reads the
control plane's status; :mod:`meshlayer.demo.services` the apps, plain stdlib HTTP
servers that know service names only and forward the class of the request they
serve; :mod:`meshlayer.demo.mail` the emails through RabbitMQ,
:mod:`meshlayer.demo.broker` the demo's own broker; :mod:`meshlayer.demo.load` the
mixed load (shoppers, a crawler, a reorder job); :mod:`meshlayer.demo.scrape` and
:mod:`meshlayer.demo.view` the metrics it reads and the live view;
:mod:`meshlayer.demo.procs` the child processes.
"""
