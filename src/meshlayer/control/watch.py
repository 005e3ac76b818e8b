"""The watch hub: one serialized snapshot per mesh version, fanned out to every stream.

Theory of operation
-------------------
One task follows ``store.changes()``. For each new version it reads one
snapshot and encodes it once into a :class:`Frame`: the server-sent event
(``event: snapshot``, ``id``, ``data``) already framed as an HTTP chunk.
Every watch stream then writes those same bytes.

Each stream has a ``wake`` event and remembers the version it last sent.
Publishing a frame only sets the events; each stream's task wakes, writes
the hub's *current* frame if it is newer than what it sent, and awaits the
transport's drain. A slow client therefore never holds up the others and is
never queued a backlog: when its drain returns it gets the newest frame and
skips the ones in between (coalescing). A client that takes no bytes for
``STALL`` seconds while data waits is dropped (it reconnects and gets the
current snapshot). An idle stream writes a ``: keep-alive`` comment every
``keepalive`` seconds.

So that every control process sharing the store can tell whether a sidecar
is connected, a stream records itself in the store when it opens
(``set_stream``, as ``<hub id>#<n>``) and clears that record when it closes
(``clear_stream``, only if still its own: a newer stream elsewhere stays).
These writes run beside the stream and never raise the mesh version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from meshlayer.control.http import StreamOut, frame_chunk
from meshlayer.control.store import Snapshot, Store, StoreError

log = logging.getLogger("meshlayer.control.watch")

KEEPALIVE = frame_chunk(b": keep-alive\n\n")
RECHECK = 2.0
"""Seconds without a change notice after which the hub asks the store's version
itself (a safety net: notices are the fast path)."""
STALL = 30.0
"""A stream whose client takes no bytes for this long is closed (it reconnects)."""


class StalledError(Exception):
    """A watch client stopped reading."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One snapshot event, encoded once."""

    version: int
    chunk: bytes
    """The SSE event framed as one HTTP chunk."""
    made: float
    """``time.monotonic()`` when the hub published it."""


Decorate = Callable[[dict[str, Any]], Awaitable[None]]
"""Adds to a snapshot's JSON before it is encoded (the server adds ``trust``)."""


def encode(snap: Snapshot, doc: dict[str, Any] | None = None) -> Frame:
    """The frame of a snapshot (``doc``: its JSON, if already made and decorated)."""
    data = json.dumps(doc if doc is not None else snap.to_json(), separators=(",", ":"))
    event = f"event: snapshot\nid: {snap.version}\ndata: {data}\n\n".encode()
    return Frame(snap.version, frame_chunk(event), time.monotonic())


class _Watcher:
    __slots__ = ("out", "sent", "sidecar", "wake")

    def __init__(self, sidecar: str, out: StreamOut) -> None:
        self.sidecar = sidecar
        self.out = out
        self.sent = -1
        self.wake = asyncio.Event()


class WatchHub:
    """Follows the store and serves watch streams."""

    def __init__(
        self, store: Store, keepalive: float = 5.0, decorate: Decorate | None = None
    ) -> None:
        self.store = store
        self.decorate = decorate
        self.keepalive = keepalive
        self.frame: Frame | None = None
        self._watchers: set[_Watcher] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self.id = uuid.uuid4().hex[:12]
        """This control process's id in stream records."""
        self._streams = 0
        self._marks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="watch-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._marks:  # let closed streams clear their records (bounded)
            await asyncio.wait(set(self._marks), timeout=1.0)
        for task in list(self._marks):
            task.cancel()

    def _mark(
        self, sidecar: str, holder: str, after: asyncio.Task[None] | None
    ) -> asyncio.Task[None]:
        """Record (``after`` None) or clear (once ``after``, the record, is done) a stream."""

        async def run() -> None:
            try:
                if after is None:
                    await self.store.set_stream(sidecar, holder)
                else:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(after)
                    await self.store.clear_stream(sidecar, holder)
            except StoreError as exc:
                log.warning("sidecar %s: cannot record its watch stream: %s", sidecar, exc)

        task = asyncio.create_task(run(), name=f"stream-mark-{holder}")
        self._marks.add(task)
        task.add_done_callback(self._marks.discard)
        return task

    def connected(self) -> Counter[str]:
        """Open watch streams per sidecar id on this process."""
        return Counter(w.sidecar for w in self._watchers)

    async def _refresh(self, at_least: int | None = None) -> None:
        """Read and publish the store's snapshot, unless the current frame is already
        at ``at_least`` (None: read anyway)."""
        async with self._lock:  # one snapshot read at a time; late callers reuse it
            if at_least is not None and self.frame and self.frame.version >= at_least:
                return
            snap = await self.store.snapshot()
            doc = None
            if self.decorate is not None:
                doc = snap.to_json()
                await self.decorate(doc)
            self._publish(snap, doc)

    def _publish(self, snap: Snapshot, doc: dict[str, Any] | None = None) -> None:
        if self.frame is None or snap.version > self.frame.version:
            self.frame = encode(snap, doc)
            self._ready.set()
            for w in self._watchers:
                w.wake.set()
            log.debug("published version %d to %d watchers", snap.version, len(self._watchers))

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            changes = self.store.changes()
            notice: asyncio.Future[int] | None = None
            try:
                await self._refresh()
                while True:
                    # a change notice, or a look at the version now and then; the
                    # pending anext is kept, never cancelled (that would end a generator)
                    if notice is None:
                        notice = asyncio.ensure_future(anext(changes))
                    done, _ = await asyncio.wait({notice}, timeout=RECHECK)
                    if done:
                        version, notice = notice.result(), None
                    else:
                        version = await self.store.version()
                    if self.frame is None or version > self.frame.version:
                        await self._refresh(version)
                    backoff = 0.1
            except (StoreError, StopAsyncIteration) as exc:
                log.warning("watch hub: store failed: %r; retrying in %.1fs", exc, backoff)
            except Exception:  # keep pushing whatever the store did
                log.exception("watch hub: unexpected error; retrying in %.1fs", backoff)
            finally:
                if notice is not None:
                    notice.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    @staticmethod
    async def _flush(out: StreamOut) -> None:
        if not out.buffered():  # the usual case: the kernel took it all
            return
        try:
            await asyncio.wait_for(out.drain(), STALL)
        except TimeoutError:
            raise StalledError from None

    async def serve(self, sidecar: str, out: StreamOut) -> None:
        """Run one watch stream until the client leaves (the caller cancels us)."""
        await self._ready.wait()
        try:  # a client that just wrote expects to see its write in the first snapshot
            await self._refresh(await self.store.version())
        except StoreError as exc:
            log.warning("watch: store failed at connect: %s", exc)
        w = _Watcher(sidecar, out)
        self._watchers.add(w)
        self._streams += 1
        holder = f"{self.id}#{self._streams}"
        opened = self._mark(sidecar, holder, None)
        log.info("sidecar %s connected (watch streams: %d)", sidecar, len(self._watchers))
        try:
            while True:
                w.wake.clear()
                frame = self.frame
                if frame is not None and frame.version > w.sent:
                    out.write_framed(frame.chunk)
                    w.sent = frame.version
                    await self._flush(out)
                    continue
                try:
                    await asyncio.wait_for(w.wake.wait(), self.keepalive)
                except TimeoutError:
                    out.write_framed(KEEPALIVE)
                    await self._flush(out)
        except StalledError:
            log.warning("sidecar %s: watch stream took no data for %gs; closing it", sidecar, STALL)
        finally:
            self._watchers.discard(w)
            self._mark(sidecar, holder, opened)
            log.info("sidecar %s disconnected (watch streams: %d)", sidecar, len(self._watchers))
