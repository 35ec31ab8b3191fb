"""The tools service: a registry of schema-checked tools (built-ins, plugins, MCP servers, HTTP APIs)."""
