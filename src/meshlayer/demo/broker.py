"""The demo's own RabbitMQ: a private node on the demo's ports, in its state directory.

Theory of operation: the demo never touches a system broker. Its node is
started by :mod:`meshlayer.rabbitmq`, the one broker starter (the tests use
it too): first its own Erlang port mapper (``epmd -port P`` in the
foreground, a child the demo stops by PID), and once that answers, Debian's
``rabbitmq-server`` script with every path and port in the environment. This
module only says where: AMQP, distribution and epmd on ``--port-base`` + 5,
6 and 7 (:mod:`meshlayer.demo.layout`), Mnesia, logs and ``HOME`` (the
Erlang cookie) under ``STATE_DIR/rabbitmq/``, and a node name of its own.
The script runs the broker as its child and passes SIGTERM on, so stopping
the script by PID stops the broker.

Each run starts from an empty Mnesia directory: the queue is declared anew,
and no message of a previous run is delivered.

Without ``rabbitmq-server`` (or ``epmd``, or pika), :func:`find_broker` says
why and the demo runs without emails.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from meshlayer.demo.layout import AMQP_DIST_OFFSET, EPMD_OFFSET, amqp_port
from meshlayer.rabbitmq import ERL_ARGS, SERVER_PATHS, START_TIMEOUT, BrokerPlan, find_tools

__all__ = ["ERL_ARGS", "SERVER_PATHS", "START_TIMEOUT", "BrokerPlan", "find_broker"]


def find_broker(base: int, root: Path) -> BrokerPlan | str:
    """The plan to start the demo's broker, or why there is none."""
    if importlib.util.find_spec("pika") is None:
        return "pika is not installed (pip install 'meshlayer[amqp]')"
    tools = find_tools()
    if isinstance(tools, str):
        return tools
    server, epmd = tools
    return BrokerPlan(
        server,
        epmd,
        root,
        node=f"meshlayer-demo-{base}@localhost",
        port=amqp_port(base),
        dist_port=base + AMQP_DIST_OFFSET,
        epmd_port=base + EPMD_OFFSET,
    )
