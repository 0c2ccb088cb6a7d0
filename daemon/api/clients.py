"""Who is asking: the key a per-client limit counts by.

When the daemon checks API tokens (`api_tokens`), a request is its token's
(several machines sharing a token share its limit); any other request is its
client address's. A token no one checks is whatever the client chose to send
(a new one per request would escape the limit): then the address counts.
Behind a reverse proxy every request comes from the proxy, so when the peer
is one of `trusted_proxies` the client is read from the headers the proxy
sets: X-Forwarded-For, walked from the right past our own trusted proxies
(the left part is whatever the client chose to send), else X-Real-IP. From
any other peer those headers are ignored: anyone can send them. A connection
on the daemon's Unix socket has no address: its peer is "unix", a trusted
proxy when `trusted_proxies` lists the word `unix` (only local users that may
open the socket file can be that peer), else one client for every such
connection.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from daemon.http.server import UNIX_PEER
from daemon.http.types import Headers

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The `trusted_proxies` setting: networks, and whether the Unix socket's peer is one."""

    networks: tuple[Network, ...] = ()
    unix: bool = False

    def __bool__(self) -> bool:
        return bool(self.networks) or self.unix


def parse_networks(text: str) -> TrustedProxies:
    """'10.0.0.1, 192.168.0.0/16, ::1, unix' -> TrustedProxies; ValueError names a bad entry."""
    networks = []
    unix = False
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry == UNIX_PEER:
            unix = True
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network, nor unix") from None
    return TrustedProxies(tuple(networks), unix)


def peer_host(peer: str) -> str:
    """'127.0.0.1:53412' -> '127.0.0.1'; '[::1]:80' -> '::1'; 'unix' -> 'unix'."""
    host, sep, _port = peer.rpartition(":")
    return host.strip("[]") if sep else peer


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def _trusted(address: Address | None, trusted: Sequence[Network]) -> bool:
    return address is not None and any(address in network for network in trusted)


def _trusted_peer(host: str, trusted: TrustedProxies) -> bool:
    if host == UNIX_PEER:
        return trusted.unix
    return _trusted(_address(host), trusted.networks)


def client_address(headers: Headers, peer: str, trusted: TrustedProxies) -> str:
    """The client's address: the peer's, or what a trusted proxy says it is."""
    host = peer_host(peer)
    if not trusted or not _trusted_peer(host, trusted):  # no proxy trusted: no parsing
        return host
    hops = [hop.strip() for value in headers.get_all("x-forwarded-for") for hop in value.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # garbage: trust nothing further left
        if not _trusted(address, trusted.networks):
            return str(address)
    real_ip = _address(headers.get("x-real-ip") or "")
    if real_ip is not None:
        return str(real_ip)
    return host


def client_key(
    headers: Headers, peer: str, trusted: TrustedProxies, *, tokens_checked: bool
) -> str:
    """The key a per-client limit counts by: the API token when `tokens_checked` (the
    access policy let only a valid one through), else the address."""
    authorization = headers.get("authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if tokens_checked and scheme.lower() == "bearer" and token.strip():
        # Only a digest is kept, so the key can be logged without the token.
        return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    return "address:" + client_address(headers, peer, trusted)
