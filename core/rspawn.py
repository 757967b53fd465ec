"""qmail-rspawn's place: remote deliveries for the scheduler, and what an admin
needs to see of them per destination.

The scheduler hands over one message's pending recipients of one domain at
a time; they share one SMTP transaction, each with its own result (qmail
runs one qmail-remote per recipient; sharing is what lets one connection
per domain carry a mailing list). Everything runs on the event loop: a
delivery waiting on a far host costs a socket and a task, not a thread.

Per domain we keep what a stuck queue is asked about: transactions in
flight, the last reply and when, the route's addresses and whether the
timeout table has them marked down.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import mxroute, remote
from core.control import Config
from core.events import Events
from core.local import Result
from core.paths import QmailRoot
from core.queue import Queue
from core.rdns import resolver_for
from core.tcpto import Table

READ_INLINE = 256 * 1024  # a message this small is read on the loop itself
PROBE_HOLD = 600.0  # seconds a connect timeout makes a destination take one attempt at a time
KEEP_DESTINATIONS = 10000


@dataclass
class Destination:
    domain: str
    in_flight: int = 0  # SMTP transactions now
    recipients_in_flight: int = 0
    last_status: str | None = None  # K, Z or D
    last_reply: str | None = None
    last_attempt: float | None = None
    addresses: list[str] = field(default_factory=list)  # the last route's, in try order
    timed_out_at: float | None = None  # the last transaction found no address answering

    def as_dict(self, down_hosts: dict[str, float], queued: int) -> dict[str, Any]:
        down = {ip: down_hosts[ip] for ip in self.addresses if ip in down_hosts}
        return {
            "domain": self.domain,
            "in_flight": self.in_flight,
            "recipients_in_flight": self.recipients_in_flight,
            "queued": queued,
            "last_status": self.last_status,
            "last_reply": self.last_reply,
            "last_attempt": self.last_attempt,
            "addresses": list(self.addresses),
            "down_until": down,
            "timed_out_at": self.timed_out_at,
        }


def client_tls() -> ssl.SSLContext:
    """Opportunistic STARTTLS: encrypt when offered, verify nothing, as MTAs
    without DANE or MTA-STS do; a certificate problem must not stop mail."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Remote:
    def __init__(
        self,
        root: QmailRoot,
        queue: Queue,
        config: Callable[[], Config],
        *,
        events: Events,
        resolver: tuple[str, int] | None = None,
        port: int = 25,
    ) -> None:
        self.queue = queue
        self.config = config
        self.events = events
        self.port = port
        self.resolver = resolver_for(resolver)
        self.tcpto = Table(root.tcpto)
        self.tls = client_tls()
        self.destinations: dict[str, Destination] = {}

    def start(self) -> None:
        """As qmail-rspawn at start: forget which hosts were down."""
        self.tcpto.clear()

    async def deliver(
        self, recipients: list[str], sender: str, msgid: int, now: float
    ) -> list[Result]:
        """One transaction to the domain of `recipients` (all the same)."""
        domain = recipients[0].rpartition("@")[2]
        dest = self.destinations.setdefault(domain.lower(), Destination(domain.lower()))
        if (
            dest.in_flight
            and dest.timed_out_at is not None
            and now - dest.timed_out_at < PROBE_HOLD
        ):
            # Its hosts did not answer last time and an attempt is under way:
            # waiting another timeoutconnect here would only hold a slot.
            ago = int(now - dest.timed_out_at)
            text = (
                f"{remote.NO_CONNECTION}Not tried: connecting to {dest.domain} timed out"
                f" {ago} seconds ago, and another attempt is under way.\n"
            )
            return [Result("Z", text) for _ in recipients]
        dest.in_flight += 1
        dest.recipients_in_flight += len(recipients)
        self._publish(dest)
        watch = _Watch(self.tcpto)
        try:
            results = await self._deliver(dest, domain, recipients, sender, msgid, watch)
        finally:
            dest.in_flight -= 1
            dest.recipients_in_flight -= len(recipients)
        if results:
            # the most telling reply: a failure or deferral over a success
            worst = max(results, key=lambda r: "KZD".index(r.status))
            dest.last_status, dest.last_reply = worst.status, worst.text.rstrip("\n")
        dest.last_attempt = now
        if watch.answered:
            dest.timed_out_at = None
        elif watch.timeouts:
            dest.timed_out_at = now
        self._publish(dest)
        if len(self.destinations) > KEEP_DESTINATIONS:
            self._forget_oldest()
        return [Result(r.status, r.text) for r in results]

    async def _deliver(
        self,
        dest: Destination,
        domain: str,
        recipients: list[str],
        sender: str,
        msgid: int,
        watch: _Watch,
    ) -> list[remote.Delivered]:
        config = self.config()
        helohost = config.helohost or config.me
        if helohost is None:
            text = "Unable to read control files. (#4.3.0)\n"
            return [remote.Delivered(r, "Z", text) for r in recipients]
        answer = await mxroute.find(config, domain, self.resolver, self.port)
        dest.addresses = [c.ip for c in answer.candidates]
        try:
            message = await self._read(msgid)
        except OSError:
            text = "Unable to read message. (#4.3.0)\n"
            return [remote.Delivered(r, "Z", text) for r in recipients]
        return await remote.deliver(
            answer,
            sender,
            recipients,
            message,
            helohost=helohost,
            timeoutconnect=config.timeoutconnect,
            timeoutremote=config.timeoutremote,
            tls=self.tls,
            tcpto=watch,
        )

    async def _read(self, msgid: int) -> bytes:
        import asyncio

        if self.queue.message_size(msgid) <= READ_INLINE:
            return self.queue.read_message(msgid)
        return await asyncio.to_thread(self.queue.read_message, msgid)

    def _forget_oldest(self) -> None:
        """Keep the table bounded: the idle destinations tried longest ago go."""
        idle = sorted(
            (d for d in self.destinations.values() if not d.in_flight),
            key=lambda d: d.last_attempt or 0.0,
        )
        for d in idle[: len(self.destinations) - KEEP_DESTINATIONS // 2]:
            del self.destinations[d.domain]

    def _publish(self, dest: Destination) -> None:
        self.events.publish(
            "destination",
            domain=dest.domain,
            in_flight=dest.in_flight,
            recipients_in_flight=dest.recipients_in_flight,
            last_status=dest.last_status,
            last_reply=dest.last_reply,
        )

    def snapshot(self, queued: dict[str, int], now: float) -> list[dict[str, Any]]:
        """Every destination tried or queued for, busiest first."""
        known = dict(self.destinations)
        for domain in queued:
            known.setdefault(domain, Destination(domain))
        down = {e.ip: e.down_until for e in self.tcpto.entries(now) if e.down_until is not None}
        rows = [d.as_dict(down, queued.get(d.domain, 0)) for d in known.values()]
        rows.sort(key=lambda r: (-r["in_flight"], -r["queued"], r["domain"]))
        return rows


class _Watch:
    """The timeout table for one transaction, noting how its connects went."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.timeouts = 0
        self.answered = False

    def down_until(self, ip: str, now: float) -> float | None:
        return self.table.down_until(ip, now)

    def record(self, ip: str, timed_out: bool, now: float) -> None:
        self.table.record(ip, timed_out, now)
        if timed_out:
            self.timeouts += 1
        else:
            self.answered = True
