"""Live reload: watchdog tells us a configuration file changed; after a short
quiet time the core reloads, as if it had been sent HUP.

Watched: control/, alias/, users/ (assign) and etc/ (tcp.smtp, tcp.pop3).
Editors save in many ways (write in place, write a temporary and rename it
over, delete and create) and often in bursts, so events only mark "something
changed" and the reload runs DEBOUNCE seconds after the last of them. What
the core writes itself (the compiled cdbs and their temporaries) is ignored,
or every compile would trigger another reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from core.paths import QmailRoot

DEBOUNCE = 0.25  # seconds of quiet after the last change before reloading
OURS = (".cdb", ".tmp", ".lock")  # files the core writes into the watched directories
USERS = ("assign", "passwd")  # in users/, the rest is ours (cdb) or not configuration


class _Handler(FileSystemEventHandler):
    def __init__(self, changed: Callable[[str], None]) -> None:
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            name = os.fsdecode(path)
            base = os.path.basename(name)
            if not name or name.endswith(OURS) or base.startswith("."):
                continue
            if os.path.basename(os.path.dirname(name)) == "users" and base not in USERS:
                continue
            self.changed(name)


class Watcher:
    """Calls `reload(paths)` on the event loop after changes settle."""

    def __init__(
        self,
        root: QmailRoot,
        loop: asyncio.AbstractEventLoop,
        reload: Callable[[set[str]], None],
    ) -> None:
        self.root = root
        self.loop = loop
        self.reload = reload
        self._pending: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._observer = Observer()

    def start(self) -> None:
        handler = _Handler(self._changed_from_thread)
        for directory in (self.root.control, self.root.alias, self.root.users, self.root.etc):
            if directory.is_dir():
                self._observer.schedule(handler, str(directory), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(RuntimeError):
            self._observer.stop()
            self._observer.join(5)

    def _changed_from_thread(self, path: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self.loop.call_soon_threadsafe(self._changed, path)

    def _changed(self, path: str) -> None:
        self._pending.add(path)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(DEBOUNCE, self._fire)

    def _fire(self) -> None:
        self._timer = None
        paths, self._pending = self._pending, set()
        self.reload(paths)
