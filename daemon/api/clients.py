"""Who is asking: the key a per-client limit counts by.

A request with `Authorization: Bearer <token>` is its token's (several
machines sharing a token share its limit); any other request is its client
address's. Behind a reverse proxy every request comes from the proxy, so
when the peer is one of `trusted_proxies` the client is read from the
headers the proxy sets: X-Forwarded-For, walked from the right past our own
trusted proxies (the left part is whatever the client chose to send), else
X-Real-IP. From any other peer those headers are ignored: anyone can send
them.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from typing import TypeAlias

from daemon.http.types import Headers

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(text: str) -> tuple[Network, ...]:
    """'10.0.0.1, 192.168.0.0/16, ::1' -> networks; raises ValueError naming a bad entry."""
    networks = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    return tuple(networks)


def peer_host(peer: str) -> str:
    """'127.0.0.1:53412' -> '127.0.0.1'; '[::1]:80' -> '::1'."""
    host, sep, _port = peer.rpartition(":")
    return host.strip("[]") if sep else peer


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def _trusted(address: Address | None, trusted: Sequence[Network]) -> bool:
    return address is not None and any(address in network for network in trusted)


def client_address(headers: Headers, peer: str, trusted: Sequence[Network]) -> str:
    """The client's address: the peer's, or what a trusted proxy says it is."""
    host = peer_host(peer)
    if not trusted or not _trusted(_address(host), trusted):  # no proxy trusted: no parsing
        return host
    hops = [hop.strip() for value in headers.get_all("x-forwarded-for") for hop in value.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # garbage: trust nothing further left
        if not _trusted(address, trusted):
            return str(address)
    real_ip = _address(headers.get("x-real-ip") or "")
    if real_ip is not None:
        return str(real_ip)
    return host


def client_key(headers: Headers, peer: str, trusted: Sequence[Network]) -> str:
    """The key a per-client limit counts by: the API token, else the address."""
    authorization = headers.get("authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        # Only a digest is kept, so the key can be logged without the token.
        return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    return "address:" + client_address(headers, peer, trusted)
