"""Outbound HTTP for tools, with SSRF protection.

Guarantees, in the order they apply to every request and to every redirect hop:
1. the scheme is http or https and the URL has no user-info;
2. the host is on the allowlist (exact names, or `*.example.com` for subdomains);
3. the host is resolved here and EVERY address it resolves to must be public:
   loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT)
   and cloud-metadata addresses are refused, also when hidden inside IPv6
   (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64). Operators may open chosen
   networks (`http_allowed_networks`); metadata addresses stay refused regardless;
4. the connection goes to the address that was checked (the HTTP library does not
   resolve the name again), so DNS rebinding has no window; TLS still verifies the
   certificate against the host name;
5. redirects are followed by hand, each hop re-checked from step 1; an https->http
   downgrade is refused; configured secret headers are sent to their own host only;
6. the response must have an allowed content type and at most `max_response_bytes`
   (counted after decompression); the whole call has a time limit.
Proxy environment variables are ignored (a proxy would connect on our behalf).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import httpcore
import httpx
from httpcore._backends.auto import AutoBackend

from services.tools.core import ToolError

USER_AGENT = "Parley-Tools/0.1 (+https://github.com/parley)"
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Instance-metadata endpoints (AWS, ECS, GCP/Azure share 169.254.169.254, Alibaba, Oracle): refused
# even when an operator opens their network.
METADATA_ADDRESSES = frozenset(
    ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23",
              "100.100.100.200", "192.0.0.192")
)
_NAT64 = ip_network("64:ff9b::/96")
_NAT64_LOCAL = ip_network("64:ff9b:1::/48")

Address = IPv4Address | IPv6Address


class Refused(ToolError):
    """The target is not allowed (allowlist, scheme, address); the message says why."""


def embedded_ipv4(addr: Address) -> list[IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    if not isinstance(addr, IPv6Address):
        return []
    found: list[IPv4Address] = []
    if addr.ipv4_mapped is not None:
        found.append(addr.ipv4_mapped)
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found.extend(addr.teredo)
    if addr in _NAT64 or addr in _NAT64_LOCAL:
        found.append(IPv4Address(int(addr) & 0xFFFFFFFF))
    if int(addr) >> 32 == 0 and int(addr) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        found.append(IPv4Address(int(addr)))
    return found


def _non_public_kind(addr: Address) -> str | None:
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_reserved:
        return "reserved"
    if addr.is_private:
        return "private"
    if not addr.is_global:
        return "non-public"
    return None


class AddressPolicy:
    """Which resolved addresses a tool may connect to."""

    def __init__(self, allowed_networks: Iterable[str] = ()) -> None:
        self.allowed_networks = [ip_network(n, strict=False) for n in allowed_networks]

    def refusal(self, addr: Address) -> str | None:
        """Why `addr` is refused, or None when it may be used."""
        candidates = [addr, *embedded_ipv4(addr)]
        for candidate in candidates:
            if candidate in METADATA_ADDRESSES:
                return f"{addr} is a cloud metadata address"
        if any(c.version == n.version and c in n for c in candidates for n in self.allowed_networks):
            return None
        for candidate in [*candidates[1:], addr]:  # an embedded IPv4 address names the real target
            kind = _non_public_kind(candidate)
            if kind is not None:
                shown = str(addr) if candidate == addr else f"{addr} (embedding {candidate})"
                return f"{shown} is a {kind} address"
        return None

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of `host`, all checked; `Refused` if any of them is not allowed."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ToolError(f"cannot resolve host {host!r}: {exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise ToolError(f"host {host!r} has no addresses")
        for raw in addresses:
            reason = self.refusal(ip_address(raw.split("%", 1)[0]))
            if reason is not None:
                raise Refused(f"refused to connect to {host!r}: {reason} (SSRF protection)")
        return addresses


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks the host itself, then connects to the checked address."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = AutoBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        last: Exception | None = None
        for address in await self._policy.resolve(host, port):
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise Refused("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__(trust_env=False, retries=0)
        ssl_context = httpx.create_ssl_context(trust_env=False)
        # httpx builds its own pool; swap it for one whose connections go through the guard.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=50, max_keepalive_connections=10, keepalive_expiry=30.0,
            network_backend=_GuardedBackend(policy),
        )


@dataclass(frozen=True)
class HttpPolicy:
    allowed_hosts: tuple[str, ...]
    allowed_networks: tuple[str, ...] = ()
    timeout_s: float = 10.0
    max_response_bytes: int = 1_000_000
    max_redirects: int = 3
    allowed_content_types: tuple[str, ...] = ("application/json", "application/*+json", "text/*")


def _norm_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _url_host(url: httpx.URL) -> str:
    return _norm_host(url.raw_host.decode("ascii"))


class SafeHttp:
    """The one outbound HTTP client of the tools service (built-in HTTP tools and plugins use it)."""

    def __init__(self, policy: HttpPolicy) -> None:
        self.policy = policy
        self.addresses = AddressPolicy(policy.allowed_networks)
        self._hosts = {_norm_host(h) for h in policy.allowed_hosts if not h.startswith("*.")}
        self._suffixes = tuple("." + _norm_host(h[2:]) for h in policy.allowed_hosts if h.startswith("*."))
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(self.addresses),
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(policy.timeout_s),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json, text/*;q=0.9"},
        )

    def host_allowed(self, host: str) -> bool:
        host = _norm_host(host)
        return host in self._hosts or host.endswith(self._suffixes)

    def check_url(self, url: httpx.URL) -> None:
        if url.scheme not in ("http", "https"):
            raise Refused(f"refused: scheme {url.scheme!r} is not allowed (http and https only)")
        if url.userinfo:
            raise Refused("refused: URLs with credentials are not allowed")
        if not url.host:
            raise Refused("refused: the URL has no host")
        if not self.host_allowed(_url_host(url)):
            raise Refused(f"refused: host {_url_host(url)!r} is not on the allowlist")

    async def request(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        private_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Call `url`; the result is {status, url, content_type, body} (body parsed when JSON).

        `private_headers` (API keys) go only to the first URL's host. A non-2xx answer, a refused
        target, a bad content type or a too large body raise `ToolError`; the time limit raises
        `TimeoutError`.
        """
        try:
            target = httpx.URL(url)
            if params:
                target = target.copy_merge_params(dict(params))
        except httpx.InvalidURL as exc:
            raise ToolError(f"invalid URL: {exc}") from None
        home = _url_host(target)
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                return await self._follow(method.upper(), target, json_body, dict(private_headers or {}), home)
        except httpx.TimeoutException:
            raise TimeoutError from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise ToolError(f"could not reach {_url_host(target)!r}: {type(exc).__name__}") from None
        except httpx.InvalidURL as exc:
            raise ToolError(f"invalid redirect URL: {exc}") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"HTTP request failed: {type(exc).__name__}: {str(exc)[:200]}") from None

    async def _follow(self, method: str, url: httpx.URL, body: Any, secrets: dict[str, str], home: str):
        for hop in range(self.policy.max_redirects + 1):
            self.check_url(url)
            headers = secrets if _url_host(url) == home else {}
            request = self._client.build_request(method, url, headers=headers, json=body)
            response = await self._client.send(request, stream=True)
            try:
                location = response.headers.get("location")
                if response.status_code not in REDIRECT_CODES or not location:
                    return await self._read(response, url)
                if hop == self.policy.max_redirects:
                    raise ToolError(f"too many redirects (more than {self.policy.max_redirects})")
                following = url.join(location)
                if url.scheme == "https" and following.scheme == "http":
                    raise Refused("refused: a redirect from https to http")
                if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                    method, body = "GET", None
                url = following
            finally:
                await response.aclose()
        raise AssertionError("unreachable")

    async def _read(self, response: httpx.Response, url: httpx.URL) -> dict[str, Any]:
        limit = self.policy.max_response_bytes
        mime = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ToolError(f"the response is {declared} bytes; the limit is {limit}")
        if response.status_code != 204 and not any(fnmatch.fnmatchcase(mime, p)
                                                   for p in self.policy.allowed_content_types):
            raise Refused(f"refused: content type {mime or '(none)'!r} is not allowed")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise ToolError(f"the response is larger than {limit} bytes")
            chunks.append(chunk)
        try:
            text = b"".join(chunks).decode(response.charset_encoding or "utf-8", errors="replace")
        except LookupError:  # an unknown charset name
            text = b"".join(chunks).decode("utf-8", errors="replace")
        if not 200 <= response.status_code < 300:
            raise ToolError(f"HTTP {response.status_code} from {_url_host(url)!r}: {text[:500]}")
        body: Any = text
        if mime == "application/json" or mime.endswith("+json"):
            try:
                body = json.loads(text) if text else None
            except ValueError:
                raise ToolError(f"{_url_host(url)!r} sent invalid JSON") from None
        return {
            "status": response.status_code,
            "url": str(url.copy_with(query=None, fragment=None)),
            "content_type": mime,
            "body": body,
        }

    async def aclose(self) -> None:
        await self._client.aclose()
