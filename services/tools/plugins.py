"""Third-party tools from Python entry points in the `parley.tools` group.

An entry point names either a `Tool` instance (e.g. made with `@tool`) or a factory
called with the `ToolHost` that returns a `Tool` or an iterable of them:

    # pyproject.toml of a plugin package
    [project.entry-points."parley.tools"]
    weather = "parley_weather:make_tools"

A plugin that fails to import or to build is logged and skipped: the service starts
without it. Which entry points load is configured by `plugins` (glob patterns).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from parley.runtime.logging import get_logger
from services.tools.core import Tool
from services.tools.host import ToolHost
from services.tools.registry import matches

GROUP = "parley.tools"
_log = get_logger(__name__)


def discover() -> list[EntryPoint]:
    """The installed `parley.tools` entry points."""
    return list(entry_points(group=GROUP))


def _materialize(obj: Any, host: ToolHost) -> list[Tool]:
    if isinstance(obj, Tool):
        return [obj]
    if isinstance(obj, type) and issubclass(obj, Tool):
        obj = obj()
        return [obj]
    if callable(obj):
        made = obj(host)
        if isinstance(made, Tool):
            return [made]
        if isinstance(made, Iterable):
            tools = list(made)
            bad = [type(t).__name__ for t in tools if not isinstance(t, Tool)]
            if bad:
                raise TypeError(f"the factory returned non-Tool objects: {', '.join(bad)}")
            return tools
        raise TypeError(f"the factory returned {type(made).__name__}, not a Tool or an iterable of Tools")
    raise TypeError(f"{type(obj).__name__} is neither a Tool nor a factory of Tools")


def load_plugins(eps: Iterable[EntryPoint], host: ToolHost, allowed: list[str]) -> list[tuple[str, Tool]]:
    """(source, tool) pairs from the allowed entry points; broken plugins are logged and skipped."""
    loaded: list[tuple[str, Tool]] = []
    for ep in eps:
        if not matches(ep.name, allowed):
            _log.info("plugin_not_enabled", entry_point=ep.name)
            continue
        try:
            tools = _materialize(ep.load(), host)
        except Exception as exc:  # a broken plugin must not take the service down
            _log.error("plugin_failed", entry_point=ep.name, value=ep.value, error=repr(exc)[:500])
            continue
        _log.info("plugin_loaded", entry_point=ep.name, tools=[t.spec.name for t in tools])
        loaded.extend((f"plugin:{ep.name}", t) for t in tools)
    return loaded
