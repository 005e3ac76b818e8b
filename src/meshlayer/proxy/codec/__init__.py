"""Sans-I/O HTTP/1.1: bytes in, events out; events in, bytes out.

Nothing under this package imports asyncio or touches a socket.
"""

from meshlayer.proxy.codec.errors import ProtocolError
from meshlayer.proxy.codec.events import (
    Body,
    EndOfMessage,
    Event,
    RequestHead,
    ResponseHead,
    TunnelData,
)
from meshlayer.proxy.codec.request import RequestParser
from meshlayer.proxy.codec.response import ResponseParser

__all__ = [
    "Body",
    "EndOfMessage",
    "Event",
    "ProtocolError",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
    "TunnelData",
]
