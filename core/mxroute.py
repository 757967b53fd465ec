"""Where remote mail for a domain goes: qmail-remote's smtproutes, MX and A
look-ups and its "this host" rule (spec/remote.md §2, §4, §5), as data.

`find()` answers for one domain: the smtproutes line that matched, or the
MX records (lowest preference first, random among equals) with their
addresses, or the A records when there is no MX; then the addresses to try,
with those at or above this host's own preference dropped; or qmail's error
text when there is nowhere to go. Delivery and `qmailtui explain` both use it,
so what explain says is where a message goes.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver

from core import ipme
from core.control import Config, Route

TIMEOUT = 30.0  # seconds for one look-up, retries included
NO_HOST_TEMP = "ZSorry, I couldn't find any host by that name. (#4.1.2)"
NO_MX_ADDRESS = "DSorry, I couldn't find a mail exchanger or IP address. (#5.4.4)"
THIS_HOST = (
    "DSorry. Although I'm listed as a best-preference MX or A for that host,\n"
    "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)"
)


def no_such_host(host: str) -> str:
    shown = "".join(c if 33 <= ord(c) <= 126 else "?" for c in host)
    return f"DSorry, I couldn't find any host named {shown}. (#5.1.2)"


@dataclass(frozen=True, slots=True)
class Candidate:
    ip: str
    preference: int
    name: str  # the MX (or relay, or domain) the address belongs to


@dataclass(slots=True)
class Answer:
    domain: str
    port: int
    how: str = ""  # "smtproutes", "literal", "mx" or "a"
    route: Route | None = None
    mx: list[tuple[int, str]] = field(default_factory=list)  # as DNS gave them, sorted
    found: list[Candidate] = field(default_factory=list)  # every address, in try order
    candidates: list[Candidate] = field(default_factory=list)  # those to try
    error: str | None = None  # qmail's text, letter first (Z temporary, D permanent)


class _Temporary(Exception):
    pass


class _Missing(Exception):
    pass


def _literal(host: str) -> str | None:
    """A dotted quad, bracketed or not."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        return None


async def _lookup(resolver: dns.asyncresolver.Resolver, name: str, kind: str) -> list[str]:
    """Record values; _Missing for no such name or no data; _Temporary else."""
    try:
        answer = await resolver.resolve(name, kind, lifetime=TIMEOUT, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        raise _Missing from None
    except (dns.exception.DNSException, OSError) as e:
        raise _Temporary(str(e)) from e
    return [record.to_text() for record in answer]


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    literal = _literal(name)
    if literal is not None:
        return [literal]
    return [str(ipaddress.IPv4Address(a)) for a in await _lookup(resolver, name, "A")]


async def find(
    config: Config,
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    port: int = 25,
    shuffle: random.Random | None = None,
) -> Answer:
    """Where mail for `domain` goes. `port` replaces 25 where a route names none."""
    shuffle = shuffle or random.Random()
    host = domain.lower()
    answer = Answer(domain, port)
    route = config.smtproute(host)
    prefme = 100000
    try:
        if route is not None and route.relay:
            answer.how, answer.route = "smtproutes", route
            answer.port = route.port if route.port is not None else port
            prefme = 300000  # a route is never "this host"
            try:
                ips = await _addresses(resolver, route.relay)
            except _Missing:
                answer.error = no_such_host(route.relay)
                return answer
            answer.found = [Candidate(ip, 0, route.relay) for ip in ips]
        elif (literal := _literal(host)) is not None:
            answer.how, answer.route = "literal", route
            answer.found = [Candidate(literal, 0, host)]
        else:
            answer.route = route  # a `domain:` line: MX as usual
            answer.found = await _by_mx(answer, resolver, host, shuffle)
    except _Temporary:
        answer.error = NO_HOST_TEMP
        return answer
    if answer.error is not None:
        return answer
    if answer.how != "smtproutes":  # qmail-remote: a relay host is never "this host"
        for candidate in answer.found:
            if ipme.is_me(candidate.ip):
                prefme = min(prefme, candidate.preference)
    answer.candidates = [c for c in answer.found if c.preference < prefme]
    if not answer.candidates:
        answer.error = THIS_HOST
    return answer


async def _by_mx(
    answer: Answer, resolver: dns.asyncresolver.Resolver, host: str, shuffle: random.Random
) -> list[Candidate]:
    try:
        records = await _lookup(resolver, host, "MX")
    except _Missing:
        records = []
    mx: list[tuple[int, str]] = []
    for text in records:
        number, _, target = text.partition(" ")
        if number.isdigit() and target:
            mx.append((int(number), target.rstrip(".").lower()))
    if not mx:
        answer.how = "a"
        try:
            return [Candidate(ip, 0, host) for ip in await _addresses(resolver, host)]
        except _Missing:
            answer.error = no_such_host(host)
            return []
    answer.how = "mx"
    shuffle.shuffle(mx)  # random among equals; the stable sort keeps that order
    mx.sort(key=lambda item: item[0])
    answer.mx = mx
    found: list[Candidate] = []
    trouble = False
    for preference, name in mx:
        try:
            ips = await _addresses(resolver, name)
        except _Missing:
            continue  # an MX without an address is skipped
        except _Temporary:
            trouble = True
            continue
        found += [Candidate(ip, preference, name) for ip in ips]
    if not found:
        answer.error = NO_HOST_TEMP if trouble else NO_MX_ADDRESS
    return found


def describe(answer: Answer) -> list[str]:
    """The answer in words, for explain: one line per fact."""
    lines: list[str] = []
    if answer.how == "smtproutes" and answer.route is not None:
        lines.append(
            f"smtproutes sends {answer.domain} to {answer.route.relay}, port {answer.port}"
            " (its A records; no MX look-up)"
        )
    elif answer.how == "literal":
        lines.append(f"{answer.domain} is an address literal: port {answer.port} there")
    elif answer.how == "mx":
        listed = ", ".join(f"{p} {n}" for p, n in answer.mx)
        lines.append(f"MX records of {answer.domain}: {listed}")
    elif answer.how == "a":
        lines.append(f"{answer.domain} has no MX records: its A records, port {answer.port}")
    for c in answer.found:
        mine = " (this host)" if ipme.is_me(c.ip) else ""
        tried = "" if c in answer.candidates else ", not tried"
        lines.append(f"  {c.ip} ({c.name}, preference {c.preference}{tried}){mine}")
    if answer.error is not None:
        kind = "temporary" if answer.error.startswith("Z") else "permanent"
        lines.append(f"{kind} failure: {answer.error[1:]}")
    return lines
