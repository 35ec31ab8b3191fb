"""The HTTP tool's security model against a real loopback server: allowlist, SSRF checks after DNS and on
every redirect, content types, size and time limits; and the default configuration refusing loopback."""

from __future__ import annotations

from ipaddress import ip_address

import grpc
import pytest

from parley.tools.v1 import tools_pb2, tools_pb2_grpc
from services.tools.core import ToolError
from services.tools.safe_http import AddressPolicy, HttpPolicy, Refused, SafeHttp
from tests.tools.tools_support import execute


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("::7f00:1", "loopback"),  # IPv4-compatible
    ],
)
def test_non_public_addresses_are_refused(address, why):
    reason = AddressPolicy().refusal(ip_address(address))
    assert reason is not None and f"{why} address" in reason


def test_public_addresses_pass_and_opened_networks_never_include_metadata():
    assert AddressPolicy().refusal(ip_address("93.184.215.14")) is None
    assert AddressPolicy().refusal(ip_address("2606:4700:4700::1111")) is None
    opened = AddressPolicy(["127.0.0.1/32", "169.254.0.0/16"])
    assert opened.refusal(ip_address("127.0.0.1")) is None
    assert opened.refusal(ip_address("169.254.10.1")) is None
    assert "loopback" in opened.refusal(ip_address("127.0.0.2"))
    assert "cloud metadata" in opened.refusal(ip_address("169.254.169.254"))


def _http(loopback, networks=("127.0.0.1/32",), **kw) -> SafeHttp:
    hosts = kw.pop("hosts", ("127.0.0.1",))
    return SafeHttp(HttpPolicy(allowed_hosts=hosts, allowed_networks=networks, **kw))


async def test_default_policy_refuses_loopback_after_dns(loopback):
    http = _http(loopback, networks=(), hosts=("127.0.0.1", "localhost"))
    try:
        with pytest.raises(Refused, match=r"'127.0.0.1': 127.0.0.1 is a loopback address \(SSRF protection\)"):
            await http.request("GET", f"{loopback.url}/quote")
        # A name is checked by what it resolves to, not by how it looks.
        with pytest.raises(Refused, match=r"refused to connect to 'localhost': .* is a loopback address"):
            await http.request("GET", f"http://localhost:{loopback.port}/quote")
        with pytest.raises(Refused, match="host 'example.org' is not on the allowlist"):
            await http.request("GET", "https://example.org/")
        with pytest.raises(Refused, match="scheme 'file' is not allowed"):
            await http.request("GET", "file:///etc/passwd")
        with pytest.raises(Refused, match="credentials"):
            await http.request("GET", f"http://user:pw@127.0.0.1:{loopback.port}/quote")
    finally:
        await http.aclose()


async def test_allowlisted_loopback_answers_with_limits(loopback):
    http = _http(loopback, max_response_bytes=100_000, timeout_s=0.5)
    try:
        ok = await http.request("GET", f"{loopback.url}/quote", params={"symbol": "ACME"},
                                private_headers={"X-Api-Key": "k"})
        assert ok["status"] == 200 and ok["body"]["symbol"] == "ACME" and ok["body"]["api_key_seen"] == "k"
        assert ok["url"] == f"{loopback.url}/quote"  # no query string (it may carry configured keys)
        assert (await http.request("GET", f"{loopback.url}/text"))["body"] == "plain hello"
        with pytest.raises(Refused, match="content type 'application/octet-stream' is not allowed"):
            await http.request("GET", f"{loopback.url}/binary")
        with pytest.raises(ToolError, match=r"the response is \d+ bytes; the limit is 100000"):
            await http.request("GET", f"{loopback.url}/big")
        with pytest.raises(ToolError, match="the response is larger than 100000 bytes"):
            await http.request("GET", f"{loopback.url}/big-chunked")
        with pytest.raises(ToolError, match=r"HTTP 503 from '127.0.0.1': .*maintenance"):
            await http.request("GET", f"{loopback.url}/error")
        with pytest.raises(TimeoutError):
            await http.request("GET", f"{loopback.url}/slow?s=2")
    finally:
        await http.aclose()


async def test_every_redirect_hop_is_checked(loopback):
    http = _http(loopback, networks=("127.0.0.0/8", "::1/128", "169.254.0.0/16"),
                 hosts=("127.0.0.1", "localhost", "169.254.169.254", "10.0.0.1"), max_redirects=2)
    go = f"{loopback.url}/redirect?to="
    try:
        followed = await http.request("GET", go + "/quote%3Fsymbol%3DOK", private_headers={"X-Api-Key": "k"})
        assert followed["body"]["symbol"] == "OK" and followed["body"]["api_key_seen"] == "k"
        # Another host: followed, but the configured secret header stays home.
        moved = await http.request("GET", go + f"http://localhost:{loopback.port}/quote",
                                   private_headers={"X-Api-Key": "k"})
        assert moved["body"]["api_key_seen"] is None
        with pytest.raises(Refused, match="169.254.169.254 is a cloud metadata address"):
            await http.request("GET", go + "http://169.254.169.254/latest/meta-data/")
        with pytest.raises(Refused, match="10.0.0.1 is a private address"):
            await http.request("GET", go + "http://10.0.0.1/admin")
        with pytest.raises(Refused, match="host 'evil.example' is not on the allowlist"):
            await http.request("GET", go + "http://evil.example/")
        with pytest.raises(ToolError, match=r"too many redirects \(more than 2\)"):
            await http.request("GET", go + "/redirect%3Fto%3D/redirect%253Fto%253D/quote")
    finally:
        await http.aclose()


async def test_default_configuration_refuses_the_loopback_api_over_grpc(start_stack, loopback):
    """The same API as in test_service, but without the test-only `http_allowed_networks`; and only the
    tools this deployment enables."""
    api = {"name": "market_data", "description": "Stock prices.", "base_url": f"{loopback.url}/quote"}
    tools = {"http_apis": [api], "enabled": ["market_data", "calc*"]}  # this deployment offers two tools
    async with start_stack(["tools"], tools=tools) as app:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = tools_pb2_grpc.ToolsServiceStub(channel)
            listed = await stub.ListTools(tools_pb2.ListToolsRequest())
            assert [t.name for t in listed.tools] == ["calculator", "market_data"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await execute(stub, "sales_report", {"period": "today"})
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            result = await execute(stub, "market_data", {"query": {"symbol": "ACME"}})
            assert result.outcome == tools_pb2.OUTCOME_ERROR
            assert result.error == (
                "refused to connect to '127.0.0.1': 127.0.0.1 is a loopback address (SSRF protection)"
            )
            again = await execute(stub, "calculator", {"expression": "1+1"})  # still serving
            assert again.outcome == tools_pb2.OUTCOME_OK
