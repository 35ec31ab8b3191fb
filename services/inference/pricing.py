"""Prices per model and the cost of a call.

The shipped table (`prices.json`, by the provider's model name) can be replaced by a file
(`price_table_path`) and overridden per model (`prices`, by route or provider model name) or per
route (a route's `pricing`). A model with no price is *unpriced*: its cost is reported with
`priced=False`, never as $0. A price of 0 (the local model) is a real price: priced and free.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from services.inference.domain import Cost, Pricing, ProviderUsage

_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
_PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "cache_write_per_mtok")
FREE = Pricing(0.0, 0.0, 0.0)


class PriceError(ValueError):
    pass


def parse_pricing(raw: Mapping[str, Any], where: str) -> Pricing:
    """A `Pricing` from its JSON form; unknown keys and negative prices are configuration errors."""
    allowed = {*_PRICE_KEYS, "context_window", "long_context_threshold", "long_context", "provider"}
    unknown = set(raw) - allowed
    if unknown:
        raise PriceError(f"{where}: unknown price field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    for key in ("input_per_mtok", "output_per_mtok"):
        if key not in raw:
            raise PriceError(f"{where}: {key} is required")
    values: dict[str, float | None] = {}
    for key in _PRICE_KEYS:
        value = raw.get(key)
        if value is None:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise PriceError(f"{where}: {key} must be a non-negative number, not {value!r}")
        values[key] = float(value)
    long_context = None
    threshold = raw.get("long_context_threshold")
    if raw.get("long_context") is not None:
        if not isinstance(threshold, int) or threshold <= 0:
            raise PriceError(f"{where}: long_context needs a positive integer long_context_threshold")
        long_context = parse_pricing(raw["long_context"], f"{where}.long_context")
    inp = values["input_per_mtok"]
    assert inp is not None and values["output_per_mtok"] is not None
    return Pricing(
        input_per_mtok=inp,
        output_per_mtok=values["output_per_mtok"],
        cached_input_per_mtok=inp if values["cached_input_per_mtok"] is None else values["cached_input_per_mtok"],
        cache_write_per_mtok=values["cache_write_per_mtok"],
        long_context_threshold=threshold if long_context else None,
        long_context=long_context,
    )


def compute_cost(pricing: Pricing | None, usage: ProviderUsage) -> Cost:
    """The price of a call in US dollars; unpriced when the model has no price."""
    if pricing is None:
        return Cost(priced=False)
    if pricing.long_context is not None and usage.prompt_tokens > (pricing.long_context_threshold or 0):
        pricing = pricing.long_context
    cached = min(usage.cached_prompt_tokens, usage.prompt_tokens)
    written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
    fresh = usage.prompt_tokens - cached - written
    write_price = pricing.input_per_mtok if pricing.cache_write_per_mtok is None else pricing.cache_write_per_mtok
    micro = (
        fresh * pricing.input_per_mtok
        + cached * pricing.cached_input_per_mtok
        + written * write_price
        + usage.completion_tokens * pricing.output_per_mtok
    )
    return Cost(priced=True, usd=micro / 1_000_000)


class PriceTable:
    """Model name -> `Pricing` (and context window), with configured overrides on top."""

    def __init__(self, table: Mapping[str, Pricing], windows: Mapping[str, int],
                 overrides: Mapping[str, Pricing]) -> None:
        self._table = dict(table)
        self._windows = dict(windows)
        self._overrides = dict(overrides)

    @classmethod
    def load(cls, path: str | None, overrides: Mapping[str, Mapping[str, Any]]) -> PriceTable:
        if path:
            text, where = Path(path).read_text(encoding="utf-8"), path
        else:
            text = resources.files("services.inference").joinpath("prices.json").read_text(encoding="utf-8")
            where = "prices.json"
        try:
            models = json.loads(text)["models"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PriceError(f"{where}: not a price table ({{'models': {{name: prices}}}}): {exc}") from None
        table = {name: parse_pricing(raw, f"{where}: {name}") for name, raw in models.items()}
        windows = {name: int(raw["context_window"]) for name, raw in models.items() if raw.get("context_window")}
        parsed = {name: parse_pricing(raw, f"prices[{name!r}]") for name, raw in overrides.items()}
        return cls(table, windows, parsed)

    def _find(self, mapping: Mapping[str, Any], model: str) -> Any:
        name = model.removeprefix("models/")
        if name in mapping:
            return mapping[name]
        base = _DATE_SUFFIX.sub("", name)  # gpt-4o-2024-08-06, claude-sonnet-4-5-20250929
        return mapping.get(base)

    def price(self, route_name: str, provider_model: str) -> Pricing | None:
        """Override by route name, then by provider model, then the table; None when unpriced."""
        if route_name in self._overrides:
            return self._overrides[route_name]
        found = self._find(self._overrides, provider_model)
        return found if found is not None else self._find(self._table, provider_model)

    def context_window(self, provider_model: str) -> int | None:
        return self._find(self._windows, provider_model)
