"""Model routes: which provider serves a model name, how, and what to try when it fails.

Routes come from `PARLEY_INFERENCE__ROUTES` (a JSON list). The local model is a route too
(provider `local`, named `local_model_name`) unless `local_enabled` is false. Provider `plugin`
takes its adapter from a `parley.inference.providers` entry point (see `app.plugin_provider`).
Configuration mistakes fail at start, naming the route and the field.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from parley.runtime.config import InferenceSettings

ProviderKind = Literal["local", "openai", "vllm", "anthropic", "gemini", "plugin"]
ROUTE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY"}
KEY_ENV_ALTERNATIVES = {"gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"), "vllm": ("VLLM_API_KEY",)}


class RouteError(ValueError):
    pass


class Route(BaseModel):
    """One model name clients use, served by one provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Model name clients use.")
    provider: ProviderKind
    model: str | None = Field(None, description="Model name at the provider; default: `name`.")
    base_url: str | None = Field(None, description="API base URL (OpenAI-compatible: up to /v1).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    timeout_s: float | None = Field(None, gt=0, description="Per-attempt timeout; default provider_timeout_s.")
    connect_timeout_s: float | None = Field(None, gt=0, description="Connect timeout; default connect_timeout_s.")
    max_retries: int | None = Field(None, ge=0, le=10, description="Retries; default max_retries.")
    fallbacks: tuple[str, ...] = Field((), description="Routes tried in order when this one fails.")
    context_window: int | None = Field(None, gt=0, description="Tokens; default from the price table.")
    max_output_tokens: int | None = Field(None, gt=0, description="Largest max_tokens the model accepts.")
    pricing: dict[str, Any] | None = Field(None, description="Price of this route (wins over the table).")
    tokenizer_gguf: str | None = Field(None, description="GGUF whose tokenizer estimates usage when none is given.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Extra JSON fields sent (OpenAI/vLLM).")
    stream_usage: bool = Field(True, description="Ask OpenAI-compatible servers for usage on streams.")
    native_tools: bool = Field(
        True, description="Reported by ListModels: the model picks tools well by itself (false: callers such as "
        "the chat service choose the tool and force it)."
    )
    guided_decoding: Literal["structured_outputs", "guided_json"] = Field(
        "structured_outputs", description="vLLM's request field for JSON-schema decoding (guided_json before 0.10.2)."
    )
    plugin: str | None = Field(
        None, description="Provider `plugin`: name of the `parley.inference.providers` entry point that makes the "
        "adapter (e.g. the scripted model of the chat tests)."
    )

    @model_validator(mode="after")
    def _check(self) -> Route:
        if not ROUTE_NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r} must be 1-128 characters of letters, digits and . _ : / @ + -")
        if self.provider in ("vllm",) and not self.base_url:
            raise ValueError("a vllm route needs base_url (e.g. http://gpu-host:8000/v1)")
        if self.provider == "local":
            raise ValueError("the local route is configured with PARLEY_INFERENCE__LOCAL_* settings")
        if (self.provider == "plugin") != bool(self.plugin):
            raise ValueError("a plugin route needs `plugin` (an entry point name), and only a plugin route takes it")
        return self

    @property
    def provider_model(self) -> str:
        return self.model or self.name

    def api_key(self) -> str | None:
        """The route's API key from the environment (never from configuration files)."""
        names = (self.api_key_env,) if self.api_key_env else (
            KEY_ENV_ALTERNATIVES.get(self.provider) or (DEFAULT_KEY_ENV.get(self.provider),)
        )
        for name in names:
            if name and os.environ.get(name):
                return os.environ[name]
        return None

    def endpoint(self) -> str:
        """What a cooldown applies to: one provider endpoint (all routes through it)."""
        return f"{self.provider}:{self.base_url or self.plugin or 'default'}"


def local_route(settings: InferenceSettings) -> Route:
    return Route.model_construct(
        name=settings.local_model_name, provider="local", model=settings.local_model_name,
        fallbacks=(), headers={}, extra_body={}, stream_usage=True, native_tools=False,
        context_window=settings.local_n_ctx, pricing=None, tokenizer_gguf=None, base_url=None,
        api_key_env=None, timeout_s=None, connect_timeout_s=None, max_retries=0, max_output_tokens=None,
        guided_decoding="structured_outputs",
    )


def load_routes(settings: InferenceSettings) -> dict[str, Route]:
    """All routes by name, validated: unique names, fallbacks that exist, a default that exists."""
    routes: dict[str, Route] = {}
    if settings.local_enabled:
        routes[settings.local_model_name] = local_route(settings)
    for i, raw in enumerate(settings.routes):
        try:
            route = Route.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'route'}: {e['msg']}" for e in exc.errors())
            raise RouteError(f"PARLEY_INFERENCE__ROUTES[{i}]: {problems}") from None
        if route.name in routes:
            raise RouteError(f"PARLEY_INFERENCE__ROUTES[{i}]: route {route.name!r} is defined twice")
        routes[route.name] = route
    for route in routes.values():
        for target in route.fallbacks:
            if target not in routes:
                raise RouteError(f"route {route.name!r}: fallback {target!r} is not a route ({', '.join(routes)})")
            if target == route.name:
                raise RouteError(f"route {route.name!r}: cannot fall back to itself")
    if settings.default_model not in routes:
        raise RouteError(
            f"default_model {settings.default_model!r} is not a route; configured: {', '.join(routes) or 'none'}"
        )
    return routes
