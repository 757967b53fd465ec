"""The client library's doors agree: a core embedded in this process, asked
in-process and over its control socket, gives the same answers and the same
event stream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.paths import QmailRoot
from qmailtui.client import SocketClient, embedded
from tests.e2e.conftest import make_user, qmailtui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def until_removed(stream: Any) -> list[str]:
    kinds: list[str] = []
    async for item in stream:
        kinds.append(item["event"])
        if item["event"] == "removed":
            return kinds
    return kinds


async def test_an_embedded_core_answers_in_process_and_on_its_socket(root: QmailRoot) -> None:
    make_user(root, "alice")
    (root.control / "smtproutes").write_text(":127.0.0.1:1\n")
    async with embedded(root) as inside:
        outside = await SocketClient.connect(root)
        assert outside is not None
        try:
            here = await inside.call("snapshot")
            there = await outside.call("snapshot")
            for answer in (here, there):
                answer.pop("config")
            assert here == there
            assert here["running"] is True
            local = asyncio.ensure_future(until_removed(inside.events(["queued", "removed"])))
            remote = asyncio.ensure_future(until_removed(outside.events(["queued", "removed"])))
            await asyncio.sleep(0.2)  # both subscribed
            done = await asyncio.to_thread(
                qmailtui, "inject", "alice@mx.example.org", root=root, stdin=b"Subject: x\n\nx\n"
            )
            assert done.returncode == 0, done.stderr
            kinds = await asyncio.wait_for(asyncio.gather(local, remote), 20)
            assert kinds[0] == kinds[1] == ["queued", "removed"]
        finally:
            await outside.close()
    assert not root.control_socket.exists()  # the embedded core cleaned up when it stopped
