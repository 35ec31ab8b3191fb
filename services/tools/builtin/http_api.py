"""HTTP API tools: each configured external API (`http_apis`) becomes one tool.

The model fills in `query` (and `path` / `body` where the API allows them); the base
URL, secret headers and fixed query parameters come from configuration and are
never shown to the model. Every call goes through `SafeHttp` (allowlist, SSRF
checks on every hop, size and content-type limits, time limit).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from parley.runtime.config import ToolsSettings
from services.tools.core import CallContext, Tool, ToolError, ToolSpec
from services.tools.safe_http import SafeHttp

# Relative path segments of unreserved/sub-delim characters; no '.'/'..' segments, no '%' escapes.
_SEGMENT = r"[A-Za-z0-9._~!$&'()*+,;=:@-]+"
PATH_PATTERN = rf"^(?!(.*/)?\.\.?(/|$)){_SEGMENT}(/{_SEGMENT})*$"
_PATH_RE = re.compile(PATH_PATTERN)
_SCALAR = {"type": ["string", "number", "integer", "boolean"]}


def api_schema(api: ToolsSettings.HttpApi) -> dict[str, Any]:
    query = api.query_schema or {
        "type": "object",
        "additionalProperties": {**_SCALAR, "maxLength": 500},
        "maxProperties": 30,
        "description": "Query parameters of the request.",
    }
    properties: dict[str, Any] = {"query": query}
    if api.allow_path:
        properties["path"] = {
            "type": "string", "maxLength": 512, "pattern": PATH_PATTERN,
            "description": "Path appended to the API's base URL, e.g. 'quotes/AAPL'.",
        }
    if api.method == "POST":
        properties["body"] = {"type": "object", "description": "JSON body of the request."}
    required = ["query"] if api.query_schema and api.query_schema.get("required") else []
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


class HttpApiTool(Tool):
    def __init__(self, api: ToolsSettings.HttpApi, http: SafeHttp, default_timeout_s: float) -> None:
        base = httpx.URL(api.base_url)
        if base.scheme not in ("http", "https") or not base.host or base.userinfo:
            raise ValueError(f"HTTP API {api.name!r}: base_url must be an http(s) URL without credentials")
        self._api = api
        self._base = base
        self._http = http
        self.spec = ToolSpec(
            name=api.name,
            description=api.description,
            parameters=api_schema(api),
            timeout_s=api.timeout_s or default_timeout_s,
            side_effects=api.side_effects if api.side_effects is not None else api.method != "GET",
        )

    async def run(self, args: dict[str, Any], call: CallContext) -> Any:
        url = self._base
        path = args.get("path")
        if path:
            if not _PATH_RE.match(path):  # the schema checked it already; this guards the URL join itself
                raise ToolError("path must be a relative path without '.', '..' or '%' escapes")
            url = url.copy_with(path=url.path.rstrip("/") + "/" + path)
        params = {k: _query_value(v) for k, v in (args.get("query") or {}).items()}
        params.update(self._api.query)  # configured parameters (API keys) win over the model's
        return await self._http.request(
            self._api.method, url, params=params, json_body=args.get("body"), private_headers=self._api.headers
        )
