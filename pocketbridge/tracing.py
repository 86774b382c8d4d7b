"""Optional OpenTelemetry tracing: off unless ``[tracing] exporter`` is set (then the ``tracing``
extra must be installed). Spans carry counts and outcomes only, never ids, keys or payloads.

``span(name)`` is the call the daemon makes; while tracing is off it returns a shared no-op
context manager, so the hot path pays nothing but a function call.

Across instances a relay is one trace: the publishing instance puts the W3C trace context of the
current span (``traceparent``, and ``tracestate`` if any: :func:`trace_context`) in the bus message,
and the receiving instance opens its delivery span as a child of it (:func:`span_under`). Only the
trace context travels, never ids, keys or payloads. OpenTelemetry is imported only when tracing is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .config import Config
from .errors import ConfigError

_NOOP = contextlib.nullcontext()
_tracer: Any = None
_propagator: Any = None  # W3C trace context only (no baggage): set while tracing is on
_use_span: Any = None  # opentelemetry.trace.use_span, set while tracing is on


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    if _tracer is None:
        return _NOOP
    return _span(name, attributes)


def open_span(name: str, **attributes: Any) -> Any:
    """A span that outlives the block that opens it (e.g. an event's ingest, ended when its batch
    commits): the caller makes it current with :func:`within` and calls ``end()``; None while off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, attributes=attributes)


def end_span(opened: Any, **attributes: Any) -> None:
    """End ``opened`` (from :func:`open_span`; None while off), with ``attributes`` set first."""
    if opened is None:
        return
    opened.set_attributes(attributes)
    opened.end()


def within(opened: Any) -> contextlib.AbstractContextManager[Any]:
    """``opened`` (from :func:`open_span`) as the current span, without ending it."""
    if opened is None:
        return _NOOP
    return _use_span(opened, end_on_exit=False)


def span_under(carrier: dict[str, str] | None, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span whose parent is the remote trace context ``carrier`` (from :func:`trace_context`, e.g. carried
    in a bus message); with no carrier, the current span is the parent, as with :func:`span`."""
    if _tracer is None:
        return _NOOP
    return _span(name, attributes, _propagator.extract(carrier) if carrier else None)


def trace_context() -> dict[str, str] | None:
    """The W3C trace context of the current span (``traceparent``, and ``tracestate`` if any), to carry to
    another instance; None while tracing is off or when there is no current span."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier or None


@contextlib.contextmanager
def _span(name: str, attributes: dict[str, Any], parent: Any = None) -> Iterator[Any]:
    with _tracer.start_as_current_span(name, context=parent, attributes=attributes) as s:
        yield s


def setup_tracing(config: Config, exporter: Any = None) -> Any:
    """Start tracing as configured (or with the given span exporter, e.g. an in-memory one in tests);
    returns the provider (call ``shutdown()`` on it to flush), or None when tracing is off."""
    global _tracer, _propagator, _use_span
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
        from opentelemetry.trace import use_span
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
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
    _propagator = TraceContextTextMapPropagator()
    _use_span = use_span
    _tracer = provider.get_tracer("pocketbridge")
    return provider


def stop_tracing(provider: Any) -> None:
    global _tracer
    _tracer = None
    if provider is not None:
        provider.shutdown()
