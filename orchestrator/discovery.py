"""Where the replicas of a service are: a fixed list of addresses, or every address a DNS name resolves to.

Targets follow gRPC's naming (grpc/doc/naming.md):
    host:port[,host:port...]         fixed replicas
    dns:///NAME:PORT                 every A/AAAA record of NAME, from the system resolver (what a Kubernetes headless
                                     Service gives: one record per ready pod), re-resolved every few seconds
    dns://SERVER[:PORT]/NAME:PORT    the same, asking that DNS server (dnspython)
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    addresses: tuple[str, ...] = ()  # fixed replicas
    name: str = ""                   # a DNS name whose records are replicas ...
    port: int = 0                    # ... on this port
    dns_server: str = ""             # "" : the system resolver
    dns_port: int = 53

    @property
    def dynamic(self) -> bool:
        return bool(self.name)

    def __str__(self) -> str:
        if not self.dynamic:
            return ",".join(self.addresses)
        server = f"{self.dns_server}:{self.dns_port}" if self.dns_server else ""
        return f"dns://{server}/{self.name}:{self.port}"


def parse_target(text: str, what: str = "target") -> Target:
    """A Target from its text; ValueError naming `what` when it is malformed."""
    text = text.strip()
    if not text.startswith("dns:"):
        addresses = tuple(a.strip() for a in text.split(",") if a.strip())
        if not addresses or any(not _has_port(a) for a in addresses):
            raise ValueError(f"{what}: {text!r} is not host:port[,host:port...] or dns:///NAME:PORT")
        return Target(addresses=addresses)
    rest = text[len("dns:"):]
    if not rest.startswith("//"):
        rest = "///" + rest  # dns:NAME:PORT
    authority, _, endpoint = rest[2:].partition("/")
    name, _, port = endpoint.rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"{what}: {text!r} needs a name and a port: dns:///NAME:PORT")
    server, dns_port = "", 53
    if authority:
        server, _, p = authority.rpartition(":") if ":" in authority else (authority, "", "53")
        if not server or not p.isdigit():
            raise ValueError(f"{what}: {text!r}: the DNS server must be HOST[:PORT]")
        dns_port = int(p)
    return Target(name=name.strip("[]"), port=int(port), dns_server=server, dns_port=dns_port)


def _has_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(target: Target, timeout_s: float = 2.0) -> list[str]:
    """The target's replica addresses now, sorted. Raises OSError when DNS does not answer."""
    if not target.dynamic:
        return list(target.addresses)
    if target.dns_server:
        hosts = await _ask_server(target, timeout_s)
    else:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(target.name, target.port, type=socket.SOCK_STREAM), timeout_s)
        hosts = {info[4][0] for info in infos}
    return sorted(join_host_port(h, target.port) for h in hosts)


async def _ask_server(target: Target, timeout_s: float) -> set[str]:
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [target.dns_server]
    resolver.port = target.dns_port
    hosts: set[str] = set()
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(target.name, rdtype, lifetime=timeout_s)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise OSError(f"DNS {target}: {exc}") from exc
        hosts.update(r.address for r in answer)
    return hosts
