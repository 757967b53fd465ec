"""The event fan-out never waits for a subscriber: a full queue drops the
oldest events and says how many."""

from __future__ import annotations

import asyncio

from core.events import Events


async def test_a_full_queue_keeps_the_newest_and_counts_what_it_dropped() -> None:
    hub = Events()
    hub.bind(asyncio.get_running_loop())
    sub = hub.subscribe(maxsize=3)
    for n in range(10):
        hub.publish("queued", id=n)
    assert sub.lagged
    assert sub.take_dropped() == 7
    assert sub.take_dropped() == 0
    got = [await sub.get() for _ in range(3)]
    assert [e.data["id"] for e in got if e is not None] == [7, 8, 9]


async def test_a_subscription_gets_only_the_kinds_it_asked_for() -> None:
    hub = Events()
    hub.bind(asyncio.get_running_loop())
    sub = hub.subscribe(maxsize=10, kinds=frozenset({"removed"}))
    hub.publish("log", text="x")
    hub.publish("removed", id=1)
    event = await sub.get()
    assert event is not None
    assert (event.kind, event.data) == ("removed", {"id": 1})
    sub.close()
    assert await sub.get() is None
