"""The inference service's normalised types, shared by the core and every provider adapter.

Requests come in as `GenerateRequest`; an adapter turns it into its provider's wire format and
turns what comes back into `TextDelta` / `ToolCallEvent` events and exactly one `Finish` (a stream),
or one `Completion` (unary). The core adds routing, cost and timing and returns a `Response`.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ToolChoice(enum.StrEnum):
    AUTO = "auto"  # the model decides (the default when tools are given)
    NONE = "none"  # the model must not call tools
    REQUIRED = "required"  # the model must call a tool (`forced_tool` when set)


class FinishReason(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(slots=True, frozen=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str  # a JSON object, encoded


@dataclass(slots=True)
class Message:
    role: Role | None  # None: the caller sent an unknown role (rejected by validation)
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


@dataclass(slots=True, frozen=True)
class ToolDef:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments (an object schema)


@dataclass(slots=True)
class Sampling:
    max_tokens: int = 0  # 0: the server default
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(slots=True)
class GenerateRequest:
    """A validated request. `model` is the provider's model name once routed."""

    model: str
    messages: list[Message]
    tools: list[ToolDef] = field(default_factory=list)
    tool_choice: ToolChoice | None = None  # None: AUTO when tools are given
    forced_tool: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    response_schema: dict[str, Any] | None = None

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if not self.tools:
            return ToolChoice.NONE
        return self.tool_choice or ToolChoice.AUTO


@dataclass(slots=True)
class ProviderUsage:
    """Token counts as a provider reports them (normalised: prompt_tokens includes cached ones)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # read from the provider's prompt cache
    cache_write_tokens: int = 0  # written to the prompt cache (Anthropic bills these at a premium)
    estimated: bool = False


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ToolCallEvent:
    call: ToolCall


@dataclass(slots=True)
class Finish:
    """The last event of a provider stream. `usage` is None when the provider reported none."""

    reason: FinishReason
    usage: ProviderUsage | None = None
    # perf_counter() when the provider saw its first token, when it knows better than the event
    # timing (the local model writing a tool call under a grammar emits it only when complete).
    first_token_at: float | None = None


Event = TextDelta | ToolCallEvent | Finish


@dataclass(slots=True)
class Completion:
    """A whole answer from a provider."""

    text: str
    tool_calls: list[ToolCall]
    finish: Finish


@dataclass(slots=True)
class Cost:
    priced: bool
    usd: float = 0.0


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    estimated: bool
    cost: Cost

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Timing:
    time_to_first_token_ms: float
    total_ms: float
    decode_tokens_per_second: float


@dataclass(slots=True)
class Response:
    model: str  # the route that answered
    provider: str  # its provider kind
    text: str
    tool_calls: list[ToolCall]
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    fallbacks_tried: list[str]


@dataclass(slots=True)
class TokenCount:
    prompt_tokens: int
    context_window: int
    estimated: bool


@dataclass(slots=True)
class Pricing:
    """US dollars per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float
    cache_write_per_mtok: float | None = None  # None: same as input
    # Long prompts billed at other rates (e.g. > 200k tokens): (threshold, Pricing without tiers).
    long_context_threshold: int | None = None
    long_context: Pricing | None = None


@dataclass(slots=True)
class ModelInfo:
    name: str
    provider: str
    provider_model: str
    context_window: int
    reachable: bool
    pricing: Pricing | None
    native_tool_calling: bool
    is_default: bool
    fallbacks: list[str]
