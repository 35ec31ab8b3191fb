"""Address helpers shared by the server, the bind-safety checks and the internal-call guard."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=1024)  # asked for every RPC's peer: the same few hosts again and again
def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1; False for host names and all-interfaces ('' / 0.0.0.0)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_is_local(peer: str) -> bool:
    """Whether a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:...`, an in-process
    caller's `inproc:`) is on this machine."""
    if peer.startswith(("unix:", "inproc:")):
        return True
    if peer.startswith("ipv4:"):
        return is_loopback(peer[5:].rsplit(":", 1)[0])
    if peer.startswith("ipv6:"):
        return is_loopback(peer[5:].rsplit(":", 1)[0])
    return False
