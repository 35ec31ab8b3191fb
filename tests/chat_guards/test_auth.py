"""Authentication and authorization: API keys in PostgreSQL, JWT (HS256/RS256), auth_mode=none."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import text

from parley.runtime.errors import FailedPrecondition, PermissionDenied, Unauthenticated
from services.chat.guards.auth import (
    Authenticator,
    check_bind_safety,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from tests.chat_guards.conftest import counter_value, new_user

SECRET = "s" * 40


def bearer(credential: str) -> list[tuple[str, str]]:
    return [("x-request-id", "r1"), ("authorization", f"Bearer {credential}")]


async def test_api_key_lifecycle(engine, chat, metrics):
    auth = Authenticator(chat(auth_mode="api_key"), engine, metrics)
    alice, bob = new_user(), new_user()
    key = await create_api_key(engine, alice, admin=False, name="laptop")
    assert key.startswith("pk_")
    key_id = key.split("_")[1]

    p = await auth.authenticate(bearer(key))
    assert (p.user_id, p.is_admin, p.key_id, p.method) == (alice, False, key_id, "api_key")
    auth.authorize(p, alice)
    with pytest.raises(PermissionDenied) as exc:
        auth.authorize(p, bob)
    assert "may act only for user" in exc.value.message

    # Only the hash is stored; last_used_at was set.
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": key_id})).mappings().one()
    assert key not in {str(value) for value in row.values()}
    assert key.split("_", 2)[2] not in str(dict(row))
    assert row["last_used_at"] is not None

    infos = await list_api_keys(engine, alice)
    assert [(i.key_id, i.name, i.is_admin) for i in infos] == [(key_id, "laptop", False)]

    assert await revoke_api_key(engine, key_id) is True
    assert await revoke_api_key(engine, key_id) is False
    with pytest.raises(Unauthenticated) as exc:
        await auth.authenticate(bearer(key))
    assert exc.value.message == "this API key was revoked"
    assert await list_api_keys(engine, alice) == []
    assert len(await list_api_keys(engine, alice, include_revoked=True)) == 1
    assert counter_value(metrics, "parley_chat_auth_failures", reason="revoked_key") == 1


async def test_admin_key_may_act_for_anyone(engine, chat, metrics):
    auth = Authenticator(chat(auth_mode="api_key"), engine, metrics)
    key = await create_api_key(engine, new_user(), admin=True, name="ops")
    p = await auth.authenticate(bearer(key))
    assert p.is_admin
    auth.authorize(p, new_user())


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([], "missing credentials: send 'authorization: Bearer <API key or JWT>' metadata"),
        ([("authorization", "Basic abc")], "authorization metadata must be 'Bearer <API key or JWT>'"),
        (bearer("not-a-key"), "invalid API key (expected pk_<id>_<secret>)"),
        (bearer("pk_0123456789abcdef_" + "x" * 43), "invalid API key"),
    ],
)
async def test_bad_credentials_are_unauthenticated(engine, chat, metrics, metadata, message):
    auth = Authenticator(chat(auth_mode="api_key"), engine, metrics)
    with pytest.raises(Unauthenticated) as exc:
        await auth.authenticate(metadata)
    assert exc.value.message == message


async def test_wrong_secret_for_a_real_key_id(engine, chat, metrics):
    auth = Authenticator(chat(auth_mode="api_key"), engine, metrics)
    key = await create_api_key(engine, new_user())
    forged = key[: key.rindex("_") + 1] + "A" * 43
    with pytest.raises(Unauthenticated, match="^invalid API key$"):
        await auth.authenticate(bearer(forged))


def hs256(claims: dict, secret: str = SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, secret, algorithm="HS256")


async def test_jwt_hs256(chat, metrics):
    auth = Authenticator(chat(auth_mode="jwt", jwt_hs256_secret=SECRET, jwt_leeway_s=0), None, metrics)
    p = await auth.authenticate(bearer(hs256({"sub": "alice"})))
    assert (p.user_id, p.is_admin, p.method) == ("alice", False, "jwt")
    with pytest.raises(PermissionDenied):
        auth.authorize(p, "bob")
    admin = await auth.authenticate(bearer(hs256({"sub": "ops", "parley_admin": True})))
    auth.authorize(admin, "bob")

    cases = {
        hs256({"sub": "alice", "exp": int(time.time()) - 5}): "the JWT has expired",
        hs256({"sub": "alice"}, secret="t" * 40): "invalid JWT: Signature verification failed",
        jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none"):
            "JWT algorithm 'none' is not accepted (accepted: HS256)",
        hs256({"sub": "a b"}): "invalid JWT: JWT claim sub: must be 1-128 characters",
        hs256({"sub": "alice", "aud": "other"}): "invalid JWT: Invalid audience",
        "pk_0123456789abcdef_" + "x" * 43: "API keys are not accepted here: PARLEY_CHAT__AUTH_MODE is jwt",
    }
    for token, message in cases.items():
        with pytest.raises(Unauthenticated) as exc:
            await auth.authenticate(bearer(token))
        assert exc.value.message.startswith(message), exc.value.message


async def test_jwt_rs256_with_issuer_and_audience(chat, metrics, tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    (tmp_path / "pub.pem").write_text(pem)
    settings = chat(auth_mode="jwt", jwt_public_key=str(tmp_path / "pub.pem"), jwt_issuer="idp",
                    jwt_audience="parley")
    auth = Authenticator(settings, None, metrics)
    claims = {"sub": "carol", "iss": "idp", "aud": "parley", "exp": int(time.time()) + 60}
    p = await auth.authenticate(bearer(jwt.encode(claims, private, algorithm="RS256")))
    assert p.user_id == "carol"
    with pytest.raises(Unauthenticated, match="Invalid issuer"):
        await auth.authenticate(bearer(jwt.encode({**claims, "iss": "evil"}, private, algorithm="RS256")))
    # An HS256 token signed with the public key as secret (algorithm confusion) is refused.
    with pytest.raises(Unauthenticated, match="'HS256' is not accepted"):
        await auth.authenticate(bearer(jwt.encode(claims, "x" * 40, algorithm="HS256")))


def test_jwt_mode_needs_a_key(chat, metrics):
    with pytest.raises(FailedPrecondition, match="needs PARLEY_CHAT__JWT_HS256_SECRET"):
        Authenticator(chat(auth_mode="jwt"), None, metrics)
    with pytest.raises(FailedPrecondition, match="at least 32 bytes"):
        Authenticator(chat(auth_mode="jwt", jwt_hs256_secret="short"), None, metrics)


async def test_auth_mode_none_trusts_everyone(chat, metrics):
    auth = Authenticator(chat(), None, metrics)
    p = await auth.authenticate([])
    auth.authorize(p, "anyone")


@pytest.mark.parametrize(
    ("host", "mode", "ok"),
    [
        ("127.0.0.1", "none", True), ("::1", "none", True), ("[::1]", "none", True), ("localhost", "none", True),
        ("127.0.0.2", "none", True), ("0.0.0.0", "none", False), ("::", "none", False),
        ("10.1.2.3", "none", False), ("example.org", "none", False), ("0.0.0.0", "api_key", True),
    ],
)
def test_check_bind_safety(make_settings, host, mode, ok):
    settings = make_settings(host=host, chat={"auth_mode": mode})
    if ok:
        check_bind_safety(settings)
    else:
        with pytest.raises(FailedPrecondition) as exc:
            check_bind_safety(settings)
        assert exc.value.message == (
            f"refusing to listen on {host!r} without authentication: set PARLEY_CHAT__AUTH_MODE=api_key or jwt, "
            "or PARLEY_HOST=127.0.0.1"
        )
