"""Per-class socket marks: DSCP, ``SO_PRIORITY`` and TCP congestion control.

Theory of operation: each priority class's upstream sockets carry the class's
marks, so the layers below the mesh can honour the class too:

- **DSCP** goes in the IP header (``IP_TOS`` for IPv4, ``IPV6_TCLASS`` for
  IPv6; the code point sits in the upper six bits, so the byte is
  ``dscp << 2`` and the ECN bits stay the kernel's). Routers and the host's
  ``tc`` filters (``meshlayer net qos``) classify on it.
- **SO_PRIORITY** is the packet's ``skb->priority`` on this host, which
  qdiscs may use to pick a band. Linux resets it from the TOS byte when
  ``IP_TOS`` is set, so it is set *after* the DSCP. Values 0..6 are free;
  7..15 need CAP_NET_ADMIN (or CAP_NET_RAW on recent kernels; EPERM otherwise).
- **TCP_CONGESTION** picks the congestion control algorithm of a TCP socket.
  Unprivileged processes may only pick those in
  ``/proc/sys/net/ipv4/tcp_allowed_congestion_control``; CAP_NET_ADMIN may
  pick any loaded one (``tcp_available_congestion_control``).

Marks are best effort on the request path: a mark the kernel refuses is
logged once (per mark and value) and skipped, and the socket works unmarked
(``strict=True`` raises :class:`MarkError` instead, for diagnostics and
tests). The allowed algorithms are read once and cached; so is every refusal,
so a refused mark costs one failed syscall per process, not one per socket.

A sidecar calls :func:`warn_class_marks` on every config, so a class whose
congestion control or SO_PRIORITY this host will not apply is named in one
warning before any traffic, not discovered per socket.

Response direction. Marks on upstream sockets govern only the bytes the
sidecar sends upstream (requests, uploads); the response bytes of a class
(downloads, the common batch case) leave on the *client's* socket, accepted by
a listener with the kernel's defaults. So once an exchange knows its class the
listener's connection is re-marked with :func:`remark` (the server side calls
it only when the class's marks differ from what that socket carries, so a
connection whose requests keep one class pays once). ``TCP_CONGESTION`` may
be changed on an established socket (Linux re-initialises the algorithm's
state; it costs about as much as setting it before connect, ~1 us), and going
back to "the kernel's default" sets the default's name explicitly.

No asyncio here: the connection pool takes a new upstream socket from
:func:`marked_socket` (or calls :func:`apply_marks` on its own) *before*
connecting it, so the SYN already carries the DSCP, and then hands the
connected socket to the event loop.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, Protocol

from meshlayer.config.model import PriorityClass

log = logging.getLogger("meshlayer.netmarks")

ALLOWED_CC_PATH = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
AVAILABLE_CC_PATH = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
_TCP_CA_NAME_MAX = 16
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


class Marks(Protocol):
    """What a socket is marked with; a :class:`~meshlayer.config.model.PriorityClass` is one."""

    @property
    def dscp(self) -> int: ...
    @property
    def so_priority(self) -> int: ...
    @property
    def congestion_control(self) -> str | None: ...


class SocketMarks(NamedTuple):
    """Marks as read back from a socket (or given explicitly)."""

    dscp: int
    """DSCP code point, 0..63."""
    so_priority: int
    """``SO_PRIORITY``."""
    congestion_control: str | None
    """``TCP_CONGESTION`` of a TCP socket; None for other sockets (or unchanged)."""


class MarkError(OSError):
    """The kernel refused a mark (only raised with ``strict=True``)."""


_cc_allowed: frozenset[str] | None = None
_refused: set[tuple[str, object]] = set()
_warned: set[str] = set()


def allowed_congestion_control(refresh: bool = False) -> frozenset[str]:
    """The algorithms any process may set (cached; empty when the file is unreadable)."""
    global _cc_allowed
    if _cc_allowed is None or refresh:
        _cc_allowed = _read_names(ALLOWED_CC_PATH)
    return _cc_allowed


def available_congestion_control() -> frozenset[str]:
    """The algorithms the kernel has loaded (CAP_NET_ADMIN may set any of them)."""
    return _read_names(AVAILABLE_CC_PATH)


def check_congestion_control(name: str) -> str | None:
    """Why sockets cannot use congestion control ``name`` here, or None when they can.

    A sidecar calls this for each class at start and on each new config and logs
    the answer as a warning: a class with an unusable algorithm still works, on
    the kernel's default.
    """
    allowed = allowed_congestion_control()
    if name in allowed:
        return None
    available = available_congestion_control()
    if name in available and has_net_admin():
        return None
    where = "loaded" if name in available else "not loaded (modprobe tcp_" + name + ")"
    return (
        f"TCP congestion control {name!r} is {where} and not in "
        f"{ALLOWED_CC_PATH} ({' '.join(sorted(allowed)) or 'unreadable'}); "
        "its sockets keep the kernel default"
    )


def class_mark_problems(classes: Iterable[PriorityClass]) -> list[str]:
    """What this host will not apply of the classes' marks, one message per problem."""
    problems = []
    privileged = None
    for cls in sorted(classes, key=lambda c: c.name):
        if cls.congestion_control:
            why = check_congestion_control(cls.congestion_control)
            if why:
                problems.append(f"PriorityClass/{cls.name}: congestionControl: {why}")
        if cls.so_priority > 6:
            if privileged is None:  # Linux 6.x lets CAP_NET_RAW set it too
                privileged = has_net_admin() or _has_capability(CAP_NET_RAW)
            if not privileged:
                problems.append(
                    f"PriorityClass/{cls.name}: soPriority: {cls.so_priority} needs CAP_NET_ADMIN "
                    "(or CAP_NET_RAW); its sockets keep the kernel's priority"
                )
    return problems


def warn_class_marks(classes: Iterable[PriorityClass]) -> list[str]:
    """Log each of :func:`class_mark_problems` once per process (a sidecar calls it per config)."""
    problems = class_mark_problems(classes)
    for problem in problems:
        if problem not in _warned:
            _warned.add(problem)
            log.warning("%s", problem)
    return problems


def apply_marks(sock: socket.socket, marks: Marks, *, strict: bool = False) -> None:
    """Mark ``sock`` with a class's DSCP, SO_PRIORITY and (TCP only) congestion control.

    Call it before ``connect``. A refused mark is logged once and skipped, or
    raises :class:`MarkError` when ``strict``.
    """
    tos = (marks.dscp & 0x3F) << 2
    if sock.family == socket.AF_INET6:
        _set(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos, "dscp", marks.dscp, strict)
        try:  # a dual-stack socket's IPv4-mapped traffic uses IP_TOS
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        except OSError:
            pass
    elif sock.family == socket.AF_INET:
        _set(sock, socket.IPPROTO_IP, socket.IP_TOS, tos, "dscp", marks.dscp, strict)
    # After IP_TOS: setting the TOS resets the socket's priority.
    prio = marks.so_priority
    _set(sock, socket.SOL_SOCKET, socket.SO_PRIORITY, prio, "soPriority", prio, strict)
    cc = marks.congestion_control
    if cc and _is_tcp(sock):
        name = cc.encode()
        _set(sock, socket.IPPROTO_TCP, socket.TCP_CONGESTION, name, "congestionControl", cc, strict)


def marked_socket(family: int, marks: Marks, *, strict: bool = False) -> socket.socket:
    """A new non-blocking TCP socket carrying ``marks``, ready for ``loop.sock_connect``.

    The pool's per-class connect: ``sock = marked_socket(AF_INET, cls)``, then
    ``await loop.sock_connect(sock, addr)`` and
    ``await loop.create_connection(factory, sock=sock)``.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        apply_marks(sock, marks, strict=strict)
    except BaseException:
        sock.close()
        raise
    return sock


_cc_default: str | None = None
DEFAULT_CC_PATH = Path("/proc/sys/net/ipv4/tcp_congestion_control")


def default_congestion_control() -> str | None:
    """The kernel's default algorithm, what a socket starts with (cached; None if unreadable)."""
    global _cc_default
    if _cc_default is None:
        names = _read_names(DEFAULT_CC_PATH)
        _cc_default = next(iter(names), "")
    return _cc_default or None


def remark(sock: socket.socket, old: Marks | None, new: Marks | None) -> None:
    """Change an established socket's marks from ``old`` to ``new`` (None: the kernel's
    defaults), setting only what differs. Refusals are logged once and skipped, as in
    :func:`apply_marks`; an unknown socket family is left alone."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    dscp, prio, cc = (new.dscp, new.so_priority, new.congestion_control) if new else (0, 0, None)
    was_dscp, was_prio, was_cc = (
        (old.dscp, old.so_priority, old.congestion_control) if old else (0, 0, None)
    )
    if dscp != was_dscp:
        tos = (dscp & 0x3F) << 2
        if sock.family == socket.AF_INET6:
            _set(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos, "dscp", dscp, False)
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
            except OSError:
                pass
        else:
            _set(sock, socket.IPPROTO_IP, socket.IP_TOS, tos, "dscp", dscp, False)
        was_prio = -1  # setting the TOS reset the priority
    if prio != was_prio:
        _set(sock, socket.SOL_SOCKET, socket.SO_PRIORITY, prio, "soPriority", prio, False)
    if (cc or None) != (was_cc or None):
        name = cc or default_congestion_control()
        if name:
            _set(
                sock,
                socket.IPPROTO_TCP,
                socket.TCP_CONGESTION,
                name.encode(),
                "congestionControl",
                name,
                False,
            )


def read_marks(sock: socket.socket) -> SocketMarks:
    """The marks a socket carries now (for tests and diagnostics)."""
    if sock.family == socket.AF_INET6:
        tos = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
    else:
        tos = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS)
    priority = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY)
    cc = None
    if _is_tcp(sock):
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, _TCP_CA_NAME_MAX)
        cc = raw.split(b"\0", 1)[0].decode() or None
    return SocketMarks(tos >> 2, priority, cc)


def _set(
    sock: socket.socket,
    level: int,
    option: int,
    value: int | bytes,
    field: str,
    shown: object,
    strict: bool,
) -> None:
    key = (field, shown)
    if key in _refused and not strict:
        return
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        problem = _explain(field, shown, exc)
        if strict:
            raise MarkError(exc.errno, problem) from None
        _refused.add(key)
        log.warning("socket mark skipped: %s", problem)


def _explain(field: str, value: object, exc: OSError) -> str:
    if field == "congestionControl":
        reason = check_congestion_control(str(value))
        return reason or f"TCP congestion control {value!r} refused: {exc.strerror}"
    if field == "soPriority" and exc.errno == errno.EPERM:
        return f"SO_PRIORITY {value} needs CAP_NET_ADMIN or CAP_NET_RAW (0..6 do not)"
    return f"{field} {value!r} refused: {exc.strerror}"


def _is_tcp(sock: socket.socket) -> bool:
    return sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)


def _read_names(path: Path) -> frozenset[str]:
    try:
        return frozenset(path.read_text().split())
    except OSError:
        return frozenset()


def has_net_admin() -> bool:
    """CAP_NET_ADMIN in this process's effective capabilities."""
    return _has_capability(CAP_NET_ADMIN)


def _has_capability(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << bit))
    except (OSError, ValueError):
        pass
    return False
