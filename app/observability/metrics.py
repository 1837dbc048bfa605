"""The app's own Prometheus registry (never prometheus_client's global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from app.observability.collector import DatabaseCollector
from core.config import Settings

_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """The app's registry: HTTP metrics, the database collector, and the process's own
    (``process_*``, ``python_*``)."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "modelpress_http_requests",
            "HTTP requests answered by this API process, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "modelpress_http_request_duration_seconds",
            "Time from a request's arrival until its response's last byte was sent "
            "(for a server-sent event stream: its lifetime).",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            "modelpress_scrape_errors",
            "Scrapes whose database read failed (their job and worker metrics were left out).",
            registry=None,
        )
        # Collected in registration order: the database first, so a failed scrape already counts itself.
        self.registry.register(DatabaseCollector(self.scrape_errors, settings.metrics_job_window_s))
        self.registry.register(self.scrape_errors)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
