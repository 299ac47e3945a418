"""Prometheus metrics of one replica (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Request counts, latency, tokens and resident models, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("imm_serve_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("imm_serve_request_seconds", "request latency (to the last byte)", ["route"],
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.tokens = Counter("imm_serve_completion_tokens", "generated tokens", ["model"], registry=r)
        self.in_flight = Gauge("imm_serve_in_flight", "generation requests in flight", registry=r)
        self.resident = Gauge("imm_serve_resident_models", "engines loaded in this replica", registry=r)
        self.latest_round = Gauge("imm_serve_latest_round", "round that <run>/latest serves", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
