"""Request validation shared by every service: ids, sizes, AIP-158 page tokens.

Each check raises `InvalidArgument` naming the field and what is wrong, so the
caller gets INVALID_ARGUMENT with a BadRequest field violation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from typing import Any

from parley.runtime.errors import InvalidArgument

USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
MAX_PAGE_SIZE = 1000


def invalid(field: str, why: str) -> InvalidArgument:
    return InvalidArgument(message=f"{field}: {why}", violations={field: why})


def user_id(value: str, field: str = "user_id") -> str:
    if not value:
        raise invalid(field, "is required")
    if not USER_ID_RE.match(value):
        raise invalid(
            field, "must be 1-128 characters of letters, digits and . _ : @ + -, starting with a letter or digit"
        )
    return value


def uuid_id(value: str, field: str) -> uuid.UUID:
    if not value:
        raise invalid(field, "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid(field, f"{value[:64]!r} is not a valid UUID") from None


def optional_uuid(value: str, field: str) -> uuid.UUID | None:
    return uuid_id(value, field) if value else None


def text(value: str, field: str, max_chars: int, *, required: bool = True) -> str:
    if required and not value.strip():
        raise invalid(field, "must not be empty")
    if len(value) > max_chars:
        raise invalid(field, f"is {len(value)} characters long; the limit is {max_chars}")
    if "\x00" in value:
        raise invalid(field, "must not contain NUL characters")
    return value


def page_size(value: int, default: int = 50, maximum: int = MAX_PAGE_SIZE, field: str = "page_size") -> int:
    if value < 0:
        raise invalid(field, "must not be negative")
    if value > maximum:
        raise invalid(field, f"must be at most {maximum}")
    return value or default


def bounded_int(value: int, field: str, low: int, high: int, default: int) -> int:
    if value == 0:
        return default
    if not low <= value <= high:
        raise invalid(field, f"must be between {low} and {high}")
    return value


def _fingerprint(scope: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(scope, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_page_token(position: list[Any], scope: dict[str, Any]) -> str:
    """An opaque token: the keyset position plus a fingerprint of the request it belongs to."""
    payload = json.dumps({"p": position, "s": _fingerprint(scope)}, default=str, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, scope: dict[str, Any], field: str = "page_token") -> list[Any] | None:
    """The keyset position of a token, or None for the first page.

    A token that does not decode, or that was issued for a request with other
    parameters (AIP-158), is INVALID_ARGUMENT.
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        position, fingerprint = data["p"], data["s"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise invalid(field, "is not a token this server issued") from None
    if not isinstance(position, list) or fingerprint != _fingerprint(scope):
        raise invalid(field, "does not belong to this request (were other parameters changed?)")
    return position
