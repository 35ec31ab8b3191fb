"""Who is calling: API keys (hashed in PostgreSQL) or JWTs, sent as `authorization: Bearer <credential>`.

Security model (docs/chat-guards.md):
- `auth_mode=none`: every caller is trusted and may act for any user; the server then
  refuses to listen anywhere but loopback (`check_bind_safety`).
- `auth_mode=api_key`: keys look like `pk_<16 hex id>_<secret>`; only SHA-256 of the whole
  key is stored, compared in constant time. Revocation takes effect on the next request.
- `auth_mode=jwt`: HS256 (shared secret) and/or RS256 (public key); `exp` is required, the
  user is the `jwt_user_claim` claim, admin when `jwt_admin_claim` is true.
A caller may act only for its own user unless it is an admin (PERMISSION_DENIED).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from parley.runtime import validation as v
from parley.runtime.config import ChatSettings, Settings
from parley.runtime.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from parley.runtime.logging import get_logger
from parley.runtime.metrics import Metrics
from parley.runtime.network import is_loopback

_log = get_logger(__name__)

API_KEY_RE = re.compile(r"^pk_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})$")
_DUMMY_HASH = hashlib.sha256(b"parley-no-such-key").hexdigest()
_LAST_USED_EVERY_S = 60  # last_used_at is refreshed at most once a minute per key
_MIN_HS256_SECRET_BYTES = 32


@dataclass(frozen=True)
class Principal:
    """The authenticated caller. `key_id` is the API key id (None for JWT and auth_mode=none)."""

    user_id: str
    is_admin: bool
    key_id: str | None = None
    method: str = "none"  # "none", "api_key" or "jwt"


@dataclass(frozen=True)
class ApiKeyInfo:
    key_id: str
    user_id: str
    name: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


def hash_api_key(plaintext: str) -> str:
    """SHA-256 of the whole key (the secret has 256 random bits, so a fast hash is enough)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


# ---- key management (for `parley keys create|list|revoke`) ----------------------------------


async def create_api_key(engine: AsyncEngine, user_id: str, admin: bool = False, name: str = "") -> str:
    """Issue a key for `user_id` and return its plaintext: it is shown once and never stored."""
    v.user_id(user_id)
    if len(name) > 200:
        raise v.invalid("name", "must be at most 200 characters")
    key_id = secrets.token_hex(8)
    plaintext = f"pk_{key_id}_{secrets.token_urlsafe(32)}"
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO api_keys (id, user_id, name, hash, is_admin) VALUES (:id, :u, :n, :h, :a)"),
            {"id": key_id, "u": user_id, "n": name, "h": hash_api_key(plaintext), "a": admin},
        )
    _log.info("api_key_created", key_id=key_id, user_id=user_id, is_admin=admin, name=name)
    return plaintext


async def revoke_api_key(engine: AsyncEngine, key_id: str) -> bool:
    """Revoke a key by id (the part after `pk_`); False when it is unknown or already revoked."""
    async with engine.begin() as conn:
        row = await conn.execute(
            text("UPDATE api_keys SET revoked_at = now() WHERE id = :id AND revoked_at IS NULL RETURNING id"),
            {"id": key_id},
        )
        revoked = row.first() is not None
    if revoked:
        _log.info("api_key_revoked", key_id=key_id)
    return revoked


async def list_api_keys(
    engine: AsyncEngine, user_id: str | None = None, include_revoked: bool = False
) -> list[ApiKeyInfo]:
    """Keys (never their secrets), newest first; all users when `user_id` is None."""
    sql = "SELECT id, user_id, name, is_admin, created_at, revoked_at, last_used_at FROM api_keys WHERE true"
    params: dict[str, Any] = {}
    if user_id is not None:
        sql += " AND user_id = :u"
        params["u"] = user_id
    if not include_revoked:
        sql += " AND revoked_at IS NULL"
    async with engine.connect() as conn:
        rows = await conn.execute(text(sql + " ORDER BY created_at DESC, id"), params)
        return [ApiKeyInfo(*row) for row in rows]


# ---- per-request authentication -------------------------------------------------------------


def _bearer(metadata: Iterable[Any] | Mapping[str, str] | None) -> str:
    """The credential of the single `authorization: Bearer ...` entry of gRPC metadata."""
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    values = []
    for item in items:
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key.lower() == "authorization":
            values.append(value.decode() if isinstance(value, bytes) else value)
    if not values:
        raise Unauthenticated(
            message="missing credentials: send 'authorization: Bearer <API key or JWT>' metadata",
            reason="MISSING_CREDENTIALS",
        )
    if len(values) > 1:
        raise Unauthenticated(message="send exactly one authorization metadata entry", reason="INVALID_CREDENTIALS")
    scheme, _, credential = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated(
            message="authorization metadata must be 'Bearer <API key or JWT>'", reason="INVALID_CREDENTIALS"
        )
    return credential.strip()


def _read_public_key(value: str) -> str:
    """`jwt_public_key` is PEM text or the path of a PEM file."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise FailedPrecondition(message=f"PARLEY_CHAT__JWT_PUBLIC_KEY: {value!r} is neither PEM text nor a file")
    return path.read_text()


class Authenticator:
    def __init__(self, settings: ChatSettings, engine: AsyncEngine | None, metrics: Metrics) -> None:
        self.settings = settings
        self.mode = settings.auth_mode
        self.engine = engine
        self._failures = metrics.counter(
            "parley_chat_auth_failures_total", "Rejected credentials, by reason.", ["reason"]
        )
        self._keys: dict[str, Any] = {}  # JWT algorithm -> verification key
        if self.mode == "api_key" and engine is None:
            raise FailedPrecondition(message="PARLEY_CHAT__AUTH_MODE=api_key needs the database (api_keys table)")
        if self.mode == "jwt":
            self._load_jwt_keys()

    def _load_jwt_keys(self) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        s = self.settings
        if s.jwt_hs256_secret is not None:
            secret = s.jwt_hs256_secret.get_secret_value().encode()
            if len(secret) < _MIN_HS256_SECRET_BYTES:
                raise FailedPrecondition(
                    message=f"PARLEY_CHAT__JWT_HS256_SECRET must be at least {_MIN_HS256_SECRET_BYTES} bytes"
                )
            self._keys["HS256"] = secret
        if s.jwt_public_key:
            try:
                self._keys["RS256"] = load_pem_public_key(_read_public_key(s.jwt_public_key).encode())
            except ValueError as exc:
                raise FailedPrecondition(message=f"PARLEY_CHAT__JWT_PUBLIC_KEY is not a PEM public key: {exc}") from exc
        if not self._keys:
            raise FailedPrecondition(
                message="PARLEY_CHAT__AUTH_MODE=jwt needs PARLEY_CHAT__JWT_HS256_SECRET and/or "
                "PARLEY_CHAT__JWT_PUBLIC_KEY"
            )

    def _reject(self, reason: str, message: str) -> Unauthenticated:
        self._failures.labels(reason).inc()
        return Unauthenticated(message=message, reason="INVALID_CREDENTIALS", metadata={"why": reason})

    async def authenticate(self, metadata: Iterable[Any] | Mapping[str, str] | None) -> Principal:
        """The caller of an RPC, from `context.invocation_metadata()`; UNAUTHENTICATED if not valid."""
        if self.mode == "none":
            return Principal(user_id="", is_admin=True, method="none")
        try:
            credential = _bearer(metadata)
        except Unauthenticated:
            self._failures.labels("missing").inc()
            raise
        if self.mode == "api_key":
            return await self._api_key(credential)
        return self._jwt(credential)

    def authorize(self, principal: Principal, user_id: str) -> None:
        """PERMISSION_DENIED unless the principal may act for `user_id` (its own user, or an admin)."""
        if principal.is_admin or principal.user_id == user_id:
            return
        raise PermissionDenied(
            message=f"this credential may act only for user {principal.user_id!r}, not {user_id!r}",
            reason="WRONG_USER",
        )

    async def _api_key(self, credential: str) -> Principal:
        m = API_KEY_RE.match(credential)
        if not m:
            raise self._reject("malformed_key", "invalid API key (expected pk_<id>_<secret>)")
        key_id = m.group(1)
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT user_id, is_admin, hash, revoked_at IS NOT NULL, "
                        f"last_used_at IS NULL OR last_used_at < now() - interval '{_LAST_USED_EVERY_S} seconds' "
                        "FROM api_keys WHERE id = :id"
                    ),
                    {"id": key_id},
                )
            ).first()
            # Compare even when the id is unknown, so timing does not tell which ids exist.
            matches = hmac.compare_digest(hash_api_key(credential), row[2] if row else _DUMMY_HASH)
            if row is None or not matches:
                raise self._reject("unknown_key", "invalid API key")
            user_id, is_admin, _, revoked, stale = row
            if revoked:
                raise self._reject("revoked_key", "this API key was revoked")
            if stale:
                await conn.execute(text("UPDATE api_keys SET last_used_at = now() WHERE id = :id"), {"id": key_id})
        return Principal(user_id=user_id, is_admin=is_admin, key_id=key_id, method="api_key")

    def _jwt(self, credential: str) -> Principal:
        if credential.startswith("pk_"):
            raise self._reject("wrong_kind", "API keys are not accepted here: PARLEY_CHAT__AUTH_MODE is jwt")
        s = self.settings
        try:
            alg = jwt.get_unverified_header(credential).get("alg")
            key = self._keys.get(alg)
            if key is None:
                raise self._reject("jwt_algorithm", f"JWT algorithm {alg!r} is not accepted "
                                   f"(accepted: {', '.join(sorted(self._keys))})")
            claims = jwt.decode(
                credential, key, algorithms=[alg], audience=s.jwt_audience, issuer=s.jwt_issuer,
                leeway=s.jwt_leeway_s, options={"require": ["exp", s.jwt_user_claim]},
            )
        except jwt.ExpiredSignatureError:
            raise self._reject("jwt_expired", "the JWT has expired") from None
        except jwt.InvalidTokenError as exc:
            raise self._reject("jwt_invalid", f"invalid JWT: {exc}") from None
        user_id = claims[s.jwt_user_claim]
        try:
            v.user_id(user_id if isinstance(user_id, str) else "", field=f"JWT claim {s.jwt_user_claim}")
        except InvalidArgument as exc:
            raise self._reject("jwt_user", f"invalid JWT: {exc.message}") from None
        return Principal(user_id=user_id, is_admin=claims.get(s.jwt_admin_claim) is True, method="jwt")


# ---- startup check ------------------------------------------------------------------------------


def check_bind_safety(settings: Settings) -> None:
    """Refuse to serve without authentication on anything but loopback; log the auth mode.

    Call at startup, before the server binds. Raises FailedPrecondition with the fix.
    """
    mode = settings.chat.auth_mode
    if mode == "none":
        if not is_loopback(settings.host):
            raise FailedPrecondition(
                message=f"refusing to listen on {settings.host!r} without authentication: set "
                "PARLEY_CHAT__AUTH_MODE=api_key or jwt, or PARLEY_HOST=127.0.0.1",
                reason="INSECURE_BIND",
            )
        _log.warning("auth_disabled", host=settings.host,
                     note="PARLEY_CHAT__AUTH_MODE=none: every caller is trusted; listening on loopback only")
    else:
        _log.info("auth_enabled", mode=mode, host=settings.host)
