"""The client's host name, as tcpserver finds it for TCPREMOTEHOST: the PTR
record of its address, without a check that the name points back (tcpserver
checks only with -p). dnspython does the asking, so `--resolver ADDR:PORT`
can point it at any server (tests use one on loopback)."""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

TIMEOUT = 5.0  # seconds: a client whose name cannot be found waits no longer


def resolver_for(address: tuple[str, int] | None) -> dns.asyncresolver.Resolver:
    """The system's resolver, or one that asks only `address`."""
    if address is None:
        try:
            return dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
            return resolver
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [address[0]]
    resolver.port = address[1]
    return resolver


async def remote_host(ip: str, resolver: dns.asyncresolver.Resolver) -> str | None:
    """The first PTR name for `ip` (no final dot, lower case), or None."""
    try:
        name = dns.reversename.from_address(ip)
        answer = await resolver.resolve(name, "PTR", lifetime=TIMEOUT)
    except (dns.exception.DNSException, ValueError, OSError):
        return None
    for record in answer:
        text = str(record.to_text()).rstrip(".").lower()
        if text:
            return text
    return None
