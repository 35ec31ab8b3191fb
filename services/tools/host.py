"""What tool factories (built-ins and `parley.tools` plugins) are given to build their tools."""

from __future__ import annotations

from dataclasses import dataclass

from parley.runtime.app import ServiceContext
from parley.runtime.clients import Client
from parley.runtime.config import ToolsSettings
from parley.runtime.db import Database
from services.tools.safe_http import SafeHttp


@dataclass
class ToolHost:
    """The tools service's settings and shared resources, for tool factories.

    `http` is the SSRF-protected client (allowlist, address checks, size limits): plugins
    that call the network should use it rather than their own client.
    """

    settings: ToolsSettings
    service: ServiceContext
    http: SafeHttp

    @property
    def database(self) -> Database:
        return self.service.database

    def client(self, peer: str, stub_cls: type) -> Client:
        return self.service.client(peer, stub_cls)
