"""Spans and metrics out: OTLP gRPC and HTTP, the embedded default (console tree, OTLP-JSON file)."""
