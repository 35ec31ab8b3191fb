"""Parley's four services, each a thin gRPC servicer over a domain core."""
