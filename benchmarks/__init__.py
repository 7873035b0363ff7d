"""Benchmarks of di_request_scope against its peers: ``python -m benchmarks [--smoke] [names...]``."""
