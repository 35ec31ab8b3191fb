"""What a chat turn takes and produces, independent of gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class TurnOptions:
    model: str = ""
    max_tokens: int = 0
    temperature: float | None = None
    skip_cache: bool = False
    disable_tools: bool = False
    disable_recall: bool = False


@dataclass
class TurnRequest:
    user_id: str
    message: str
    session_id: str = ""
    request_id: str = ""
    options: TurnOptions = field(default_factory=TurnOptions)
    stream: bool = True  # the caller reads the answer as it is written (StreamChat); False: unary Chat


@dataclass
class MemoryItem:
    source: str  # "message" or "document"
    content: str
    score: float
    origin_id: str
    role: str = ""
    created_at: datetime | None = None


@dataclass
class ToolCallRecord:
    call_id: str
    name: str
    arguments_json: str
    result_json: str = ""
    error: str = ""
    duration_ms: float = 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True
    estimated: bool = False
    model_calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt: int, completion: int, cost_usd: float, priced: bool, estimated: bool) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost_usd += cost_usd
        self.priced = self.priced and priced
        self.estimated = self.estimated or estimated
        self.model_calls += 1


@dataclass
class PendingApproval:
    approval_id: str
    tool_name: str
    arguments_json: str


@dataclass
class TurnResult:
    response: str
    model: str
    session_id: str
    context_size: int
    memory: list[MemoryItem] = field(default_factory=list)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    latency_ms: float = 0.0
    cache_hit: bool = False
    provider: str = ""
    pending_approvals: list[PendingApproval] = field(default_factory=list)
    message_id: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class SessionStarted:
    session_id: str


@dataclass
class TextDelta:
    text: str


@dataclass
class ToolCalled:
    call_id: str
    name: str
    arguments_json: str


@dataclass
class ToolFinished:
    record: ToolCallRecord


@dataclass
class TurnFinished:
    result: TurnResult


TurnEvent = SessionStarted | TextDelta | ToolCalled | ToolFinished | TurnFinished
