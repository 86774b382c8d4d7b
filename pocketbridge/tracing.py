"""Optional OpenTelemetry tracing: off unless ``[tracing] exporter`` is set (then the ``tracing``
extra must be installed). Spans carry counts and outcomes only, never ids, keys or payloads.

``span(name)`` is the only call the daemon makes; while tracing is off it returns a shared no-op
context manager, so the hot path pays nothing but a function call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .config import Config
from .errors import ConfigError

_NOOP = contextlib.nullcontext()
_tracer: Any = None


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    if _tracer is None:
        return _NOOP
    return _span(name, attributes)


@contextlib.contextmanager
def _span(name: str, attributes: dict[str, Any]) -> Iterator[Any]:
    with _tracer.start_as_current_span(name, attributes=attributes) as s:
        yield s


def setup_tracing(config: Config, exporter: Any = None) -> Any:
    """Start tracing as configured (or with the given span exporter, e.g. an in-memory one in tests);
    returns the provider (call ``shutdown()`` on it to flush), or None when tracing is off."""
    global _tracer
    if exporter is None and config.tracing.exporter == "none":
        _tracer = None
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        raise ConfigError(
            ["[tracing] exporter is set but OpenTelemetry is not installed: pip install 'pocketbridge[tracing]'"]
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": config.tracing.service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.tracing.exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.tracing.endpoint)))
    _tracer = provider.get_tracer("pocketbridge")
    return provider


def stop_tracing(provider: Any) -> None:
    global _tracer
    _tracer = None
    if provider is not None:
        provider.shutdown()
