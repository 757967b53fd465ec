"""The activity log: log/current with multilog's TAI64N labels, qmail's wording.

The only writer under log/. Lines go to log/current (rotated like multilog:
when it passes `max_size` it becomes `@TAI64N.s` and the oldest rotated files
beyond `keep` are removed), optionally to standard error, and to event
subscribers.

Lines are written by a thread of their own, in batches: a write to a file
system busy with fsyncs can take milliseconds, and the event loop must not
wait for it (multilog buffers the same way behind qmail-send's pipe).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

from core.clock import Clock, SystemClock
from core.events import Events
from core.timefmt import tai64n

FLUSH_INTERVAL = 0.05  # seconds a line may wait before it is written


def safe(text: str) -> str:
    """qmail-send's safe printing, byte by byte: newline -> '/', '%' and every byte
    outside 33..126 -> '_'."""
    out = []
    for b in text.encode("utf-8", "surrogateescape"):
        if b == 0x0A:
            out.append("/")
        elif b == 0x25 or not 33 <= b <= 126:
            out.append("_")
        else:
            out.append(chr(b))
    return "".join(out)


def printable(text: str) -> str:
    """For free text (alerts, warnings): keep spaces, make control bytes visible."""
    return "".join(ch if 32 <= ord(ch) < 127 else "_" if ch != "\n" else "/" for ch in text)


class Log:
    def __init__(
        self,
        directory: Path,
        *,
        clock: Clock | None = None,
        events: Events | None = None,
        stderr: bool = False,
        max_size: int = 1_000_000,
        keep: int = 10,
    ) -> None:
        self.directory = directory
        self.clock = clock or SystemClock()
        self.events = events
        self.stderr = stderr
        self.max_size = max_size
        self.keep = keep
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._pending: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closing = False

    @property
    def current(self) -> Path:
        return self.directory / "current"

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    def line(self, text: str) -> None:
        now = self.clock.now()
        label = tai64n(now)
        with self._cond:
            self._pending.append((label, f"{label} {text}\n".encode("utf-8", "replace")))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="log", daemon=True)
                self._writer.start()
            # No notify: waking the writer for every line costs a context switch each;
            # it wakes by itself every FLUSH_INTERVAL and takes what has gathered.
        if self.events is not None:
            self.events.publish("log", when=now, text=text)

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait(FLUSH_INTERVAL)
                if not self._closing:
                    self._cond.wait(FLUSH_INTERVAL)  # let a batch gather
                batch, self._pending = self._pending, []
                closing = self._closing
            if batch:
                self._write(batch)
            if closing and not batch:
                return

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        with self._lock:
            try:
                if self._fd < 0:
                    self._open()
                data = b"".join(line for _, line in batch)
                if self._size + len(data) > self.max_size and self._size > 0:
                    self._rotate(batch[0][0])
                os.write(self._fd, data)
                self._size += len(data)
            except OSError as e:
                # The log must never stop the mail: say so where someone may see it.
                sys.stderr.write(f"qmailtui: unable to write {self.current}: {e.strerror}\n")
        if self.stderr:
            sys.stderr.write(b"".join(line for _, line in batch).decode("utf-8", "replace"))
            sys.stderr.flush()

    def flush(self) -> None:
        """Write every line logged so far (the writer thread may still hold some)."""
        with self._cond:
            batch, self._pending = self._pending, []
        if batch:
            self._write(batch)

    def _rotate(self, label: str) -> None:
        os.close(self._fd)
        self._fd = -1
        os.replace(self.current, self.directory / f"{label}.s")
        old = sorted(p for p in self.directory.iterdir() if p.name.startswith("@"))
        for path in old[: max(0, len(old) - self.keep)]:
            with contextlib.suppress(OSError):
                path.unlink()
        self._open()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
            writer = self._writer
        if writer is not None:
            writer.join(timeout=10)
        self.flush()
        with self._cond:
            self._writer = None
            self._closing = False
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_lines(directory: Path, needle: str | None = None, limit: int = 2000) -> list[str]:
    """Lines of the rotated files and current, oldest first, optionally filtered."""
    files = sorted(p for p in directory.glob("@*.s"))
    files.append(directory / "current")
    found: list[str] = []
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            for raw in path.read_text("utf-8", "replace").splitlines():
                if needle is None or needle in raw:
                    found.append(raw)
    return found[-limit:]
