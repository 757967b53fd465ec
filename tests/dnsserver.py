"""A real DNS server on loopback for tests: UDP on 127.0.0.1, port 0, answers
from a table of records (dnspython builds and parses the messages)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Records = dict[tuple[str, str], list[str]]  # (name, type) -> values


class DnsServer:
    def __init__(self, records: Records) -> None:
        self.records = {(n.lower().rstrip("."), t.upper()): v for (n, t), v in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.asked: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            for question in query.question:
                name = question.name.to_text().lower().rstrip(".")
                kind = dns.rdatatype.to_text(question.rdtype)
                self.asked.append((name, kind))
                values = self.records.get((name, kind))
                if values is None:
                    reply.set_rcode(dns.rcode.NXDOMAIN)
                    continue
                reply.answer.append(
                    dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, kind, values)
                )
            self.sock.sendto(reply.to_wire(), peer)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextmanager
def dns_server(records: Records) -> Iterator[DnsServer]:
    server = DnsServer(records)
    server.start()
    try:
        yield server
    finally:
        server.stop()
