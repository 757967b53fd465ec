"""Typed events of a running core, fanned out to bounded subscriber queues.

The core never waits for a reader: each subscriber has a bounded queue; when
it is full the oldest event is dropped and the subscription is marked
`lagged`, so the reader knows to re-read a snapshot.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "log", "queued", "removed", "delivery-started", ...
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Subscription:
    def __init__(self, hub: Events, maxsize: int, kinds: frozenset[str] | None = None) -> None:
        self._hub = hub
        self.kinds = kinds  # None: every kind
        self._items: collections.deque[Event] = collections.deque(maxlen=maxsize)
        self._ready = asyncio.Event()
        self.lagged = False
        self.closed = False
        self._dropped = 0

    def _put(self, event: Event) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        if len(self._items) == self._items.maxlen:
            self.lagged = True  # the deque drops the oldest for us
            self._dropped += 1
        self._items.append(event)
        self._ready.set()

    def take_dropped(self) -> int:
        """How many events were dropped since the last call."""
        dropped, self._dropped = self._dropped, 0
        return dropped

    async def get(self) -> Event | None:
        """The next event, or None once the subscription is closed."""
        while not self._items:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    async def stream(self) -> AsyncIterator[Event]:
        """The events as they come, with a `lagged` event ({"dropped": N})
        first whenever this reader fell behind; ends when closed."""
        while (event := await self.get()) is not None:
            if self.lagged:
                self.lagged = False
                yield Event("lagged", {"dropped": self.take_dropped()})
            yield event

    def drain(self) -> list[Event]:
        items = list(self._items)
        self._items.clear()
        return items

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._hub.unsubscribe(self)


class Events:
    """The fan-out. publish() may be called from any thread."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()

    def subscribe(self, maxsize: int = 2000, kinds: frozenset[str] | None = None) -> Subscription:
        sub = Subscription(self, maxsize, kinds)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, kind: str, **data: Any) -> None:
        if not self._subs:
            return
        event = Event(kind, data)
        if self._loop is not None and threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._deliver, event)
        else:
            self._deliver(event)

    def _deliver(self, event: Event) -> None:
        for sub in list(self._subs):
            sub._put(event)
