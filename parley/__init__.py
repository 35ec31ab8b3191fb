"""Parley: a gRPC backend for conversational AI with memory and tools.

This package holds the shared runtime (`parley.runtime`), the command line
(`parley.cli`) and the Python code generated from `protos/`
(`parley.<service>.v1`). The services themselves live in `services/`.
"""

__version__ = "0.1.0"
