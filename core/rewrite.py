"""qmail-send's recipient rewriting and local/remote split (send.md §2), pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.control import Config


@dataclass(frozen=True, slots=True)
class Routed:
    channel: Literal["local", "remote"]
    address: str  # after rewriting (local: prepend-user@domain for virtual domains)
    reason: str  # how it was decided, for the address tracer


def _virtual_prepend(config: Config, address: str, users: bool = True) -> tuple[str, str] | None:
    """(matched key, prepend) of the first virtualdomains key that applies."""
    domain = address.rpartition("@")[2].lower()
    table = config.virtualdomains
    keys = [address.lower()] if users else []
    keys.append(domain)
    keys += [domain[i:] for i in range(len(domain)) if domain[i] == "."]
    keys.append("")
    for key in keys:
        if key in table:
            return key, table[key]
    return None


def route(config: Config, address: str) -> Routed:
    """Which channel delivers `address`, and the address as that channel sees it."""
    if "@" not in address:
        address = f"{address}@{config.envnoathost}"
    notes = []
    while True:  # percenthack: user%host@domain -> user@host while domain is listed
        box, _, domain = address.rpartition("@")
        if domain.lower() not in config.percenthack or "%" not in box:
            break
        left, _, host = box.rpartition("%")
        address = f"{left}@{host}"
        notes.append("percenthack")
    domain = address.rpartition("@")[2]
    if config.is_local(domain):
        return Routed("local", address, f"{domain.lower()} is in control/locals")
    hit = _virtual_prepend(config, address)
    if hit is not None:
        key, prepend = hit
        if prepend:
            shown = key or "(catch-all)"
            return Routed(
                "local",
                f"{prepend}-{address}",
                f"control/virtualdomains {shown}:{prepend} adds the prefix {prepend}-",
            )
        return Routed("remote", address, f"control/virtualdomains {key}: is an exception")
    return Routed("remote", address, f"{domain.lower()} is not a local domain")


def unvirtual(config: Config, address: str) -> str:
    """The address without its virtual-domain prefix, as a bounce reports it.

    qmail's own bounces show the prefixed address; this undoes a domain,
    suffix or catch-all prefix, and only when routing the result gives this
    address back. The prefix of a `user@domain` entry is not looked for: the
    rewritten address does not say which user key it came from.
    """
    if config.is_local(address.rpartition("@")[2]):
        return address  # a local domain is never rewritten, whatever it starts with
    hit = _virtual_prepend(config, address, users=False)
    if hit is not None and hit[1]:
        prefix = hit[1] + "-"
        if address.startswith(prefix):
            original = address[len(prefix) :]
            if route(config, original).address == address:
                return original
    return address
