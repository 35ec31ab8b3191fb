"""The runtime every Parley service shares: configuration, gRPC servers and
clients, errors, logging, metrics, the database and the embedded stack."""
