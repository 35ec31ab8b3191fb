"""Narrow a tool's argument schema to what a question says, so a small model fills it correctly.

A 135M-parameter model under a JSON-schema grammar always produces valid JSON, but it
picks enum values and optional fields almost at random. Before the model fills a routed
tool's arguments, the schema is narrowed:
- an enum parameter whose value is named in the question ("last month" → `last_month`,
  "by region" → `region`) is pinned to that value;
- a required parameter the question does not settle stays open for the model (still an
  enum under the grammar);
- optional parameters the question does not name are dropped (the tool's defaults apply),
  as are conditional keywords the grammar cannot express;
- free-form strings get a length bound, so the model cannot ramble past its token budget.
The tools service still validates the arguments against the tool's full schema.
"""

from __future__ import annotations

import copy
import re
from typing import Any

_WORD = re.compile(r"[a-z0-9]+")
_CONDITIONAL = ("if", "then", "else", "allOf", "anyOf", "oneOf", "not", "dependentSchemas", "dependentRequired")


def _stems(text: str) -> set[str]:
    return {w[:4] if len(w) > 4 else w for w in _WORD.findall(text.lower())}


def pin_enums(props: dict[str, Any], question: str) -> dict[str, Any]:
    """Enum values named in the question, most specific first; a word settles one parameter only.

    "last month by region" pins period=last_month (two words) before group_by could read "month".
    Two equally specific values for one parameter are ambiguous: the model chooses then.
    """
    words = _stems(question)
    candidates = []
    for name, prop in props.items():
        for value in prop.get("enum") or ():
            if isinstance(value, str):
                phrase = _stems(value.replace("_", " ").replace("-", " "))
                if phrase and phrase <= words:
                    candidates.append((len(phrase), name, value, phrase))
    candidates.sort(key=lambda c: -c[0])
    pinned: dict[str, Any] = {}
    used: set[str] = set()
    for size, name, value, phrase in candidates:
        if name in pinned or phrase & used:
            continue
        rivals = [c for c in candidates if c[1] == name and c[0] == size and c[2] != value and not c[3] & used]
        if rivals:
            continue
        pinned[name] = value
        used |= phrase
    return pinned


SMALL_MODEL_MAX_STRING = 200  # a small model under a grammar can ramble in a free-form string until max_tokens


def _bounded(prop: dict[str, Any]) -> dict[str, Any]:
    prop = copy.deepcopy(prop)
    if prop.get("type") == "string" and "enum" not in prop and "format" not in prop:
        prop["maxLength"] = min(int(prop.get("maxLength", SMALL_MODEL_MAX_STRING)), SMALL_MODEL_MAX_STRING)
    return prop


def narrow_schema(schema: dict[str, Any], question: str) -> dict[str, Any]:
    props: dict[str, Any] = schema.get("properties") or {}
    required = list(schema.get("required") or [])
    narrowed: dict[str, Any] = {}
    pinned = pin_enums(props, question)
    for name, prop in props.items():
        if name in pinned:
            narrowed[name] = {k: v for k, v in prop.items() if k != "enum"} | {"enum": [pinned[name]]}
        elif name in required:
            narrowed[name] = _bounded(prop)
    out = {k: copy.deepcopy(v) for k, v in schema.items() if k not in _CONDITIONAL and k != "properties"}
    out["properties"] = narrowed
    out["required"] = [n for n in narrowed if n in required or n in pinned]
    out["additionalProperties"] = False
    return out
