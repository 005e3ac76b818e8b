"""The header block in one piece: where a head ends, when llhttp says it has.

Theory of operation: httptools calls Python once per header field when its
protocol object has an ``on_header`` method, and not at all when it has none;
llhttp validates the head just the same either way (the strictness lives in
its state machine, not in the callbacks). In block mode the parsers give
httptools a ``Callbacks`` object without ``on_header`` (nor ``on_url``,
``on_status``, ``on_message_begin``): llhttp checks every byte of the head and
calls ``on_headers_complete`` once, and the parser then walks the head, which
llhttp has just accepted, row by row itself (``scan_fields``).

Because llhttp accepted the head, its shape is known: a start line, then
``name ":" OWS value CRLF`` rows with token names and values free of CR and
LF (obs-fold and bare CR/LF are refused), then an empty line: the first CR
after a row's start ends it, and a row that starts with CR is the empty line.
Values are cut as llhttp cuts them: leading spaces and tabs dropped, trailing
ones kept.

The walk makes no object per row for the usual fields: consecutive rows that
travel on as they came (``name ": " value``, of a kind that is forwarded) are
handed on as one slice of the head, CRLFs included, so a head of plain fields
costs one slice however many rows it has; only the rows whose values the
parser needs (framing, Host, Connection ...) are cut out, and the full list
of fields (``headers``) is made from the block only when someone asks.

Block mode is what the mypyc build uses (``native`` tells a module how it
runs): there a call from C into compiled code is dear and the rows are walked
by index loops that compile to a few instructions per byte (a ``bytes`` method
is a generic call costing about a thousand). Interpreted, the other way round:
httptools' C splitting plus one Python call per field is cheaper than any
splitting in Python, so interpreted parsers take heads field by field.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from meshlayer.proxy.codec.fields import DROPPED, EXPECT, HOST, PLAIN, KindTable

if TYPE_CHECKING:  # annotations only: nothing to import at run time, compiled or not
    from mypy_extensions import i64

END: Final = b"\r\n\r\n"
"""The end of a header (or trailer) section."""


def native(probe: Callable[[], None]) -> bool:
    """Whether ``probe``, a module-level function, was compiled (mypyc makes
    module functions native builtins rather than Python functions)."""
    return not isinstance(probe, types.FunctionType)


def skip_blank(data: bytes, pos: int) -> int:
    """The first index at or after ``pos`` that is not CR or LF (llhttp skips
    them between messages)."""
    n = len(data)
    while pos < n and data[pos] in (13, 10):
        pos += 1
    return pos


def take_head(carry: bytearray, data: bytes, mark: int) -> tuple[bytes, int]:
    """The head llhttp has just completed, and the index in ``data`` just past it.

    ``carry`` holds the head's first bytes when it began in an earlier feed
    (leading blank lines already dropped; the caller empties it afterwards),
    else the head starts at ``mark`` in ``data``, after any blank lines.
    """
    if carry:
        tail = bytes(carry[-3:])
        j = (tail + data[:3]).find(END)
        end = j + 4 - len(tail) if j >= 0 else data.find(END) + 4
        return bytes(carry) + data[:end], end
    mark = skip_blank(data, mark)
    end = data.find(END, mark) + 4
    return data[mark:end], end


def take_fields(
    carry: bytearray,
    data: bytes,
    mark: int,
    kinds: KindTable,
    lines: list[bytes],
    wanted: list[bytes],
    wanted_kinds: list[int],
) -> tuple[bytes, bytes, int, int, int]:
    """The head llhttp has just completed, walked: its start line, the head block,
    where its first row starts in the block, the index in ``data`` just past the
    head, and the number of rows; ``lines``, ``wanted`` and ``wanted_kinds`` filled as by
    ``scan_fields``. The head is at ``mark`` in ``data`` (the usual case), or began
    in ``carry`` or after blank lines (``take_head``; ``carry`` is emptied)."""
    if carry or data[mark] == 13 or data[mark] == 10:
        block, past = take_head(carry, data, mark)
        carry.clear()
        eol = line_end(block, 0)
        _, count = scan_fields(block, eol + 2, kinds, lines, wanted, wanted_kinds)
        return block[:eol], block, eol + 2, past, count
    eol = line_end(data, mark)
    past, count = scan_fields(data, eol + 2, kinds, lines, wanted, wanted_kinds)
    block = data if mark == 0 and past == len(data) else data[mark:past]
    return data[mark:eol], block, eol + 2 - mark, past, count


def line_end(data: bytes, pos: int) -> int:
    """The index of the CR ending the line that starts at ``pos`` (in a head llhttp
    has accepted, every line ends in CRLF and holds no other CR)."""
    i: i64 = pos
    while data[i] != 13:
        i += 1
    return int(i)


def scan_fields(
    data: bytes,
    pos: int,
    kinds: KindTable,
    lines: list[bytes],
    wanted: list[bytes],
    wanted_kinds: list[int],
) -> tuple[int, int]:
    """Walk the field rows of an accepted head from ``pos`` (the first row, just
    after the start line) through the empty line; return the index just past the
    head and the number of rows.

    ``lines`` gets what travels on, in order: each run of consecutive canonical rows
    (``name ": " value``) whose kind travels as it came (PLAIN, HOST, EXPECT) as one
    slice, rows joined by CRLF as received; such a row that is not canonical,
    rewritten as llhttp cuts it (``name ": " value``). ``wanted`` gets every row
    whose value the parser needs (any kind but PLAIN and DROPPED), as received, and
    ``wanted_kinds`` its kind (the classification is not done again).
    """
    i: i64 = pos
    run: i64 = -1  # where the current run of rows travelling as received starts
    run_end: i64 = 0
    rows = 0
    while data[i] != 13:  # a row; the empty line starts with CR
        start = i
        while data[i] != 58:
            i += 1
        colon = i
        c = data[i + 1]
        canon = c == 32
        if canon:
            c = data[i + 2]
            canon = c != 32 and c != 9
        i += 1
        while data[i] != 13:
            i += 1
        rows += 1
        kind = kinds.kind_at(data, int(start), int(colon))
        if kind in (PLAIN, HOST, EXPECT):
            if canon:
                if run < 0:
                    run = start
                run_end = i
            else:
                if run >= 0:
                    lines.append(data[run:run_end])
                    run = -1
                lines.append(data[start:colon] + b": " + data[colon + 1 : i].lstrip(b" \t"))
        elif run >= 0:
            lines.append(data[run:run_end])
            run = -1
        if kind != PLAIN and kind != DROPPED:
            wanted.append(data[start:i])
            wanted_kinds.append(kind)
        i += 2
    if run >= 0:
        lines.append(data[run:run_end])
    return int(i) + 2, rows


V11: Final = b"1.1"
V10: Final = b"1.0"


def version_at(line: bytes, end: int) -> bytes | None:
    """The HTTP version whose three bytes ``x.y`` end at ``end`` in a start line:
    ``V11``, ``V10`` (shared objects), or None for any other. By index, without
    slicing and hashing the three bytes."""
    if end < 3 or line[end - 3] != 49 or line[end - 2] != 46:  # "1."
        return None
    minor = line[end - 1]
    return V11 if minor == 49 else (V10 if minor == 48 else None)


def cut_row(row: bytes) -> tuple[int, bool]:
    """Where a field row's name ends (its colon), and whether the row is
    canonical: ``name ": " value``, one space before a value that does not start
    with another space or tab (the row can be forwarded as it came). By index:
    compiled, ``bytes`` methods are slow generic calls."""
    i: i64 = 0  # a machine integer when compiled: the loop is a few instructions a byte
    while row[i] != 58:
        i += 1
    n: i64 = len(row)
    canon = i + 1 < n and row[i + 1] == 32
    if canon and i + 2 < n:
        c = row[i + 2]
        canon = c != 32 and c != 9
    return int(i), canon


class Callbacks:
    """The protocol object httptools is given: it looks each callback up once, by
    name, and never calls one that is not set, so a parser sets only those it wants
    (block mode: no ``on_header``, ``on_url``, ``on_status``, ``on_message_begin``)."""

    __slots__ = (
        "on_body",
        "on_header",
        "on_headers_complete",
        "on_message_begin",
        "on_message_complete",
        "on_status",
        "on_url",
    )

    on_body: Callable[[bytes], None]
    on_header: Callable[[bytes, bytes], None]
    on_headers_complete: Callable[[], None]
    on_message_begin: Callable[[], None]
    on_message_complete: Callable[[], None]
    on_status: Callable[[bytes], None]
    on_url: Callable[[bytes], None]
