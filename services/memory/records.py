"""Plain records the memory core works with (no protobuf, no SQL)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


class Role(IntEnum):
    """Stored as smallint; values equal parley.memory.v1.Role."""

    SYSTEM = 1
    USER = 2
    ASSISTANT = 3
    TOOL = 4


class Visibility(IntEnum):
    PRIVATE = 1
    SHARED = 2


@dataclass
class ToolCall:
    id: str
    name: str
    arguments_json: str


@dataclass
class Conversation:
    id: uuid.UUID
    user_id: str
    title: str
    summary: str
    metadata: dict[str, Any]
    message_count: int
    created_at: datetime
    updated_at: datetime


@dataclass
class NewMessage:
    role: Role
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    message_id: str = ""  # client-chosen UUID (idempotent retries); empty: the service picks one


@dataclass
class Message:
    id: uuid.UUID
    seq: int
    conversation_id: uuid.UUID
    user_id: str
    role: Role
    content: str
    tool_calls: list[ToolCall]
    tool_call_id: str
    token_count: int
    metadata: dict[str, Any]
    created_at: datetime
    embedded: bool


@dataclass
class RecallQuery:
    user_id: str
    vector: np.ndarray | list[float]  # the query's embedding (384 floats)
    top_k: int
    min_score: float
    conversation_ids: list[uuid.UUID]
    roles: list[Role]
    start_time: datetime | None
    end_time: datetime | None
    exclude_ids: list[uuid.UUID]
    exclude_recent_conversation: uuid.UUID | None
    exclude_recent_count: int


@dataclass
class Document:
    id: uuid.UUID
    user_id: str
    title: str
    source: str
    visibility: Visibility
    chunk_count: int
    metadata: dict[str, Any]
    created_at: datetime


@dataclass
class Chunk:
    document_id: uuid.UUID
    chunk_index: int
    content: str
    title: str
    source: str
    score: float
