"""The bus's OpenTelemetry metrics in Prometheus text format, for ``/metrics``.

The bus records its metrics on the OpenTelemetry API (``banyan_bus.telemetry``):
``banyan.messages.published``/``handled``/``failed``/``retried``/``dead_lettered``,
``banyan.handler.duration`` and more. :func:`install` turns them into a Prometheus
scrape through the official OpenTelemetry Prometheus exporter: a
``PrometheusMetricReader`` on the process's ``MeterProvider``, which feeds
``prometheus_client``'s default registry; :func:`render` is the scrape.

Names follow the exporter's rules: dots become underscores, counters get
``_total``, the unit ``s`` becomes ``_seconds`` (``banyan_messages_handled_total``,
``banyan_handler_duration_seconds_bucket``); attributes become labels
(``banyan_message_type``, ``messaging_consumer_group_name``, ``banyan_handler``).

Why install before the bus starts: a bus decides once, at ``start()``, whether an
OpenTelemetry SDK is configured, and records nothing otherwise (see
``telemetry.py``: the hot path then costs one attribute check).

Needs the ``prometheus`` extra (``pip install 'banyan-bus[prometheus]'``); the
modules are imported only when metrics are asked for.
"""

from __future__ import annotations

import importlib.util

import structlog

from banyan_bus.errors import ConfigurationError

log = structlog.get_logger("banyan_bus.prometheus")

#: What ``render`` answers with: Prometheus' text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

INSTALL_HINT = (
    "serving /metrics needs the OpenTelemetry Prometheus exporter: "
    "pip install 'banyan-bus[prometheus]' "
    "(opentelemetry-sdk, opentelemetry-exporter-prometheus, prometheus-client)"
)

_MODULES = ("opentelemetry.exporter.prometheus", "opentelemetry.sdk.metrics", "prometheus_client")
_installed = False


def available() -> bool:
    """Whether the ``prometheus`` extra is installed."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in _MODULES)
    except ModuleNotFoundError:  # a parent package (opentelemetry.exporter) is missing
        return False


def install(service: str | None = None) -> None:
    """Make the process's OpenTelemetry metrics scrapeable by :func:`render`.

    With no SDK ``MeterProvider`` set yet, sets one whose only reader is a
    ``PrometheusMetricReader`` (resource ``service.name`` = ``service``). If one is
    set already (``opentelemetry-instrument``, or the application's own), it
    cannot take another reader: ``render`` then serves whatever reaches
    ``prometheus_client``'s registry, which is the bus's metrics when that
    provider has a Prometheus reader (``OTEL_METRICS_EXPORTER=prometheus``).
    Idempotent. Raises ``ConfigurationError`` with an install hint when the
    extra is missing.
    """
    global _installed
    if _installed:
        return
    try:
        from opentelemetry import metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
    except ImportError as exc:
        raise ConfigurationError(INSTALL_HINT) from exc
    current = metrics.get_meter_provider()
    if isinstance(current, MeterProvider):
        log.info(
            "metrics_provider_preset",
            detail="a MeterProvider is already configured; /metrics serves prometheus_client's "
            "registry, which has the bus's metrics only if that provider has a Prometheus "
            "reader (OTEL_METRICS_EXPORTER=prometheus, or PrometheusMetricReader())",
        )
    else:
        resource = Resource.create({"service.name": service} if service else {})
        metrics.set_meter_provider(
            MeterProvider(metric_readers=[PrometheusMetricReader()], resource=resource)
        )
    _installed = True


def render() -> bytes:
    """The current metrics in Prometheus text format (what a scrape of ``/metrics`` gets)."""
    try:
        from prometheus_client import REGISTRY, generate_latest
    except ImportError as exc:
        raise ConfigurationError(INSTALL_HINT) from exc
    return generate_latest(REGISTRY)
