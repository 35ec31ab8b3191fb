"""REST through the grpc-gateway, in front of real Parley gRPC servers (real PostgreSQL, real model).

The memory routes are always tested. The chat contract (POST /v1/chat and /v1/chat:stream) is tested when the
four-service stack starts; otherwise those tests skip and say why. Chat runs with API-key authentication (when the
chat guards exist), so the `Authorization` header is checked end to end by the real chat service.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass

import grpc
import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from parley.runtime.app import RunningApp
from parley.runtime.db import async_url
from parley.tools.v1 import tools_pb2

from .conftest import BUILD, ROOT, TOOLCHAIN_UNAVAILABLE, _tail

ALL_SERVICES = ["memory", "inference", "tools", "chat"]
CHAT_USER = "123"
CHAT_CONTRACT_KEYS = {"response", "model", "tokens_used", "context_size", "memory"}


@dataclass
class Stack:
    app: RunningApp
    chat_unavailable: str | None  # why the four-service stack did not start (chat tests skip with it)
    api_key: str | None  # a key of CHAT_USER when chat runs with auth_mode=api_key


def _key_issuer():
    """services.chat.guards.auth.create_api_key when the chat guards exist (then chat runs with api_key auth)."""
    try:
        from services.chat.guards.auth import create_api_key
    except ImportError:
        return None
    return create_api_key


@pytest.fixture(scope="module")
async def stack(start_stack):
    """The full stack if it starts (chat with API-key auth), else memory alone."""
    issue_key = _key_issuer()
    async with AsyncExitStack() as stack:
        key = None
        try:
            overrides = {"chat": {"auth_mode": "api_key"}} if issue_key else {}
            app, why = await stack.enter_async_context(start_stack(ALL_SERVICES, **overrides)), None
        except Exception as exc:  # noqa: BLE001 - chat is optional here; the reason is reported by the skips
            why = f"the four-service stack did not start: {type(exc).__name__}: {exc}"
            app = await stack.enter_async_context(start_stack(["memory"]))
        if why is None and issue_key:
            engine = create_async_engine(async_url(app.database_url))
            try:
                key = await issue_key(engine, CHAT_USER, name="gateway tests")
            finally:
                await engine.dispose()
        yield Stack(app, why, key)


@pytest.fixture(scope="module")
async def gw(start_gateway, stack):  # build the gateway before the stack starts
    async with start_gateway({name: stack.app.address for name in ALL_SERVICES}) as gateway:
        yield gateway


@pytest.fixture
async def http(gw):
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=120) as client:
        yield client


@pytest.fixture
def user() -> str:
    return f"gw-{uuid.uuid4().hex[:12]}"


def assert_status_json(resp: httpx.Response, http_code: int, grpc_code: int) -> dict:
    """An error answer is google.rpc.Status JSON: {"code", "message", "details"}."""
    assert resp.status_code == http_code, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == grpc_code, body
    return body


async def test_conversation_round_trip(http, user):
    created = await http.post(f"/v1/users/{user}/conversations", json={"title": "via REST", "metadata": {"k": "v"}})
    assert created.status_code == 200, created.text
    conv = created.json()["conversation"]
    # proto field names, every field present (EmitUnpopulated), int64 as a JSON string
    assert set(conv) == {"conversation_id", "user_id", "title", "create_time", "update_time", "metadata",
                         "summary", "message_count"}
    assert conv["user_id"] == user and conv["title"] == "via REST" and conv["metadata"] == {"k": "v"}
    assert conv["summary"] == "" and conv["message_count"] == "0"
    cid = conv["conversation_id"]
    uuid.UUID(cid)

    appended = await http.post(f"/v1/users/{user}/conversations/{cid}/messages",
                               json={"messages": [{"role": "ROLE_USER", "content": "hello over REST"}]})
    assert appended.status_code == 200, appended.text
    [msg] = appended.json()["messages"]
    assert msg["role"] == "ROLE_USER" and msg["content"] == "hello over REST" and msg["token_count"] > 0

    listed = await http.get(f"/v1/users/{user}/conversations", params={"page_size": 10})
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [c["conversation_id"] for c in body["conversations"]] == [cid]
    assert body["conversations"][0]["message_count"] == "1"
    assert body["next_page_token"] == ""

    history = await http.get(f"/v1/users/{user}/conversations/{cid}/messages")
    assert history.status_code == 200, history.text
    assert [m["content"] for m in history.json()["messages"]] == ["hello over REST"]

    patched = await http.patch(f"/v1/users/{user}/conversations/{cid}",
                               json={"title": "renamed", "update_mask": "title"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["conversation"]["title"] == "renamed"

    deleted = await http.delete(f"/v1/users/{user}/conversations/{cid}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"deleted_messages": "1"}
    gone = await http.get(f"/v1/users/{user}/conversations/{cid}")
    assert_status_json(gone, 404, 5)


async def test_unknown_json_field_is_400(http, user):
    resp = await http.post(f"/v1/users/{user}/conversations", json={"title": "x", "colour": "blue"})
    body = assert_status_json(resp, 400, 3)
    assert "colour" in body["message"], body
    # nothing was created
    listed = await http.get(f"/v1/users/{user}/conversations")
    assert listed.json()["conversations"] == []


async def test_malformed_json_is_400(http, user):
    resp = await http.post(f"/v1/users/{user}/conversations", content=b"{not json", headers={"content-type": "application/json"})
    assert_status_json(resp, 400, 3)


async def test_bad_conversation_id_is_400_with_field_violation(http, user):
    resp = await http.get(f"/v1/users/{user}/conversations/not-a-uuid")
    body = assert_status_json(resp, 400, 3)
    assert "conversation_id" in body["message"] and "not a valid UUID" in body["message"], body
    types = {d["@type"] for d in body["details"]}
    assert "type.googleapis.com/google.rpc.BadRequest" in types, body
    [bad] = [d for d in body["details"] if d["@type"].endswith("BadRequest")]
    assert bad["field_violations"][0]["field"] == "conversation_id"


async def test_unknown_or_foreign_conversation_is_404(http, user):
    missing = await http.get(f"/v1/users/{user}/conversations/{uuid.uuid4()}")
    body = assert_status_json(missing, 404, 5)
    assert "not found" in body["message"]
    # another user's conversation answers exactly like a missing one
    owner = f"{user}-owner"
    cid = (await http.post(f"/v1/users/{owner}/conversations", json={})).json()["conversation"]["conversation_id"]
    foreign = await http.get(f"/v1/users/{user}/conversations/{cid}")
    assert_status_json(foreign, 404, 5)


async def test_unknown_route_is_404_status_json(http):
    assert_status_json(await http.get("/v1/nothing-here"), 404, 5)
    # /v1/chat exists for POST only: grpc-gateway answers 501 UNIMPLEMENTED, still as google.rpc.Status
    assert_status_json(await http.get("/v1/chat"), 501, 12)


async def test_request_id_round_trips_through_the_service(http, user):
    resp = await http.get(f"/v1/users/{user}/conversations", headers={"X-Request-Id": "gw-req-0001"})
    assert resp.status_code == 200
    # the gateway forwards x-request-id as metadata (the services log it and echo it in trailers) and answers it
    assert resp.headers.get_list("x-request-id") == ["gw-req-0001"]
    generated = await http.get(f"/v1/users/{user}/conversations")
    [rid] = generated.headers.get_list("x-request-id")
    assert len(rid) == 32  # the gateway made one up
    # an error answer (trailers-only in gRPC, so that callers may retry it) carries the id too
    missing = await http.get(f"/v1/users/{user}/conversations/{uuid.uuid4()}", headers={"X-Request-Id": "gw-404"})
    assert missing.status_code == 404 and missing.headers.get_list("x-request-id") == ["gw-404"]


async def test_readiness_reports_each_upstream(http, stack):
    app = stack.app
    resp = await http.get("/readyz")
    body = resp.json()
    for name in app.services:
        assert body["services"][name] == "SERVING", body
    assert resp.status_code == (200 if set(app.services) == set(ALL_SERVICES) else 503), body
    assert (await http.get("/livez")).json() == {"status": "ok"}


async def test_openapi_spec_is_served(http):
    spec = (await http.get("/openapi.json")).json()
    assert spec["swagger"] == "2.0" and spec["info"]["title"] == "Parley REST API"
    assert {"/v1/chat", "/v1/chat:stream", "/v1/users/{user_id}/conversations"} <= set(spec["paths"])
    # proto field names in the schemas, like the JSON on the wire
    assert "tokens_used" in spec["definitions"]["v1ChatResponse"]["properties"]


async def test_headers_become_grpc_metadata(start_gateway):
    """Authorization and X-Request-Id reach the upstream as `authorization` / `x-request-id`, exactly once."""
    seen: list[tuple[tuple[str, str], ...]] = []

    async def list_tools(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(tuple((k, v) for k, v in context.invocation_metadata() if isinstance(v, str)))
        return tools_pb2.ListToolsResponse().SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "parley.tools.v1.ToolsService",
        {"ListTools": grpc.unary_unary_rpc_method_handler(list_tools)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with start_gateway({"tools": f"127.0.0.1:{port}"}) as gw, httpx.AsyncClient(base_url=gw.base_url) as c:
            resp = await c.get("/v1/tools", headers={"Authorization": "Bearer pk_test_secret", "X-Request-Id": "rid-42"})
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"tools": [], "next_page_token": ""}
    finally:
        await server.stop(0)
    [md] = seen
    assert [v for k, v in md if k == "authorization"] == ["Bearer pk_test_secret"]
    assert [v for k, v in md if k == "x-request-id"] == ["rid-42"]


async def test_unreachable_upstream_is_503(start_gateway):
    from .conftest import free_port

    async with start_gateway({"memory": f"127.0.0.1:{free_port()}"}) as gw, httpx.AsyncClient(base_url=gw.base_url) as c:
        resp = await c.get("/v1/users/u1/conversations")
        assert_status_json(resp, 503, 14)
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["services"]["memory"] == "UNREACHABLE"


def _chat_headers(stack: Stack) -> dict[str, str]:
    """Skips when chat is not running; the Authorization header when it wants one."""
    if stack.chat_unavailable:
        pytest.skip(stack.chat_unavailable)
    return {"Authorization": f"Bearer {stack.api_key}"} if stack.api_key else {}


async def test_chat_contract(http, stack):
    headers = _chat_headers(stack)
    resp = await http.post("/v1/chat", headers=headers,
                           json={"user_id": CHAT_USER, "message": "Say hello in three words.",
                                 "options": {"max_tokens": 16, "disable_tools": True}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert CHAT_CONTRACT_KEYS <= set(body), body
    assert isinstance(body["response"], str) and body["response"].strip()
    assert isinstance(body["model"], str) and body["model"]
    assert isinstance(body["tokens_used"], int) and body["tokens_used"] > 0
    assert isinstance(body["context_size"], int) and body["context_size"] > 0
    assert isinstance(body["memory"], list)
    uuid.UUID(body["session_id"])


async def test_chat_authorization_header_reaches_the_chat_service(http, stack):
    """With API-key auth: no header 401, a wrong key 401, another user's id 403, the right key 200."""
    headers = _chat_headers(stack)
    if not headers:
        pytest.skip("the chat guards (services/chat/guards) are not available: chat runs without auth")
    body = {"user_id": CHAT_USER, "message": "Hi", "options": {"max_tokens": 4, "disable_tools": True}}
    missing = assert_status_json(await http.post("/v1/chat", json=body), 401, 16)
    assert "authorization" in missing["message"]
    wrong = await http.post("/v1/chat", json=body, headers={"Authorization": "Bearer pk_0123456789abcdef_nope"})
    assert_status_json(wrong, 401, 16)
    other = await http.post("/v1/chat", json={**body, "user_id": "456"}, headers=headers)
    assert "may act only for user" in assert_status_json(other, 403, 7)["message"]
    ok = await http.post("/v1/chat", json=body, headers=headers)
    assert ok.status_code == 200, ok.text


async def test_chat_contract_rejects_unknown_fields(http, stack):
    headers = _chat_headers(stack)
    resp = await http.post("/v1/chat", headers=headers, json={"user_id": CHAT_USER, "message": "hi", "temperature": 0.2})
    body = assert_status_json(resp, 400, 3)
    assert "temperature" in body["message"]


async def test_chat_stream_is_ndjson(http, stack):
    headers = _chat_headers(stack)
    body = {"user_id": CHAT_USER, "message": "Say hi.", "options": {"max_tokens": 8, "disable_tools": True}}
    async with http.stream("POST", "/v1/chat:stream", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) async for line in resp.aiter_lines() if line.strip()]
    assert all(set(e) == {"result"} for e in events), events
    assert "session" in events[0]["result"] and events[0]["result"]["session"] is not None
    final = events[-1]["result"]["final"]
    assert CHAT_CONTRACT_KEYS <= set(final)
    deltas = "".join((e["result"].get("delta") or {}).get("text", "") for e in events)
    assert deltas == final["response"]


def test_generated_code_is_current(gateway_binary):
    """gateway/gen and gateway/openapi are committed; regenerating from protos/ must not change them."""
    proc = subprocess.run([str(BUILD), "check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode == TOOLCHAIN_UNAVAILABLE:
        pytest.skip(f"Go plugins unavailable:\n{_tail(proc.stderr)}")
    assert proc.returncode == 0, _tail(proc.stderr, 30)
