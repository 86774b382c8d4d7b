"""The W3C trace context in the Redis bus message: present only while tracing is on, optional on decode."""

from __future__ import annotations

import json

import attrs
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pocketbridge.bus import Control, EventNotice
from pocketbridge.bus.redis import decode_message, encode_message
from pocketbridge.config import load_config
from pocketbridge.tracing import setup_tracing, span, span_under, stop_tracing, trace_context

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
NOTICE = EventNotice("u" * 64, 7, "d" * 36, "e" * 36, 3, None, '{"type":"event"}', 1234)


@pytest.fixture
def exporter():
    exporter = InMemorySpanExporter()
    provider = setup_tracing(load_config(None, env={}), exporter=exporter)
    try:
        yield exporter
    finally:
        stop_tracing(provider)


def test_without_a_trace_context_the_message_is_as_before():
    _, data = encode_message("inst", NOTICE)
    assert b'"tp"' not in data and b'"ts"' not in data
    assert data == (
        b'{"o":"inst","k":"event","u":"' + b"u" * 64 + b'","s":7,"d":"' + b"d" * 36 + b'","i":"' + b"e" * 36
        + b'","q":3,"t":null,"c":1234,"w":"{\\"type\\":\\"event\\"}"}'
    )
    origin, decoded = decode_message(data)
    assert origin == "inst" and decoded == NOTICE
    assert isinstance(decoded, EventNotice) and decoded.trace is None


def test_the_trace_context_round_trips():
    carrier = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
    _, data = encode_message("inst", NOTICE, carrier)
    body = json.loads(data)
    assert (body["tp"], body["ts"]) == (TRACEPARENT, "vendor=abc")
    _, decoded = decode_message(data)
    assert isinstance(decoded, EventNotice)
    assert decoded == NOTICE  # the trace context is not part of equality
    assert decoded.trace == carrier
    assert "trace" not in repr(decoded) and TRACEPARENT not in repr(decoded)
    # without tracestate, only "tp"
    _, data = encode_message("inst", NOTICE, {"traceparent": TRACEPARENT})
    assert "ts" not in json.loads(data)
    assert decode_message(data)[1].trace == {"traceparent": TRACEPARENT}  # type: ignore[union-attr]


def test_the_notice_own_trace_context_wins_and_controls_carry_none():
    own = attrs.evolve(NOTICE, trace={"traceparent": TRACEPARENT})
    _, data = encode_message("inst", own, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    assert json.loads(data)["tp"] == TRACEPARENT
    _, data = encode_message("inst", Control("presence", "u" * 64, "d" * 36), {"traceparent": TRACEPARENT})
    assert b"tp" not in data


def test_an_old_or_malformed_trace_context_still_decodes_the_notice():
    old = json.dumps({"o": "inst", "k": "event", "u": "u", "s": 1, "d": "d", "i": "e", "q": 1, "t": None})
    _, decoded = decode_message(old.encode())
    assert isinstance(decoded, EventNotice) and decoded.trace is None and decoded.wire == ""
    bad = json.dumps({"o": "inst", "k": "event", "u": "u", "s": 1, "d": "d", "i": "e", "q": 1, "t": None,
                      "tp": 42, "ts": ["x"]})
    _, decoded = decode_message(bad.encode())
    assert isinstance(decoded, EventNotice) and decoded.trace is None


def test_trace_context_is_none_while_tracing_is_off():
    setup_tracing(load_config(None, env={}))  # exporter "none"
    assert trace_context() is None
    with span_under({"traceparent": TRACEPARENT}, "relay.deliver") as s:
        assert s is None


def test_the_delivery_span_is_a_child_of_the_carried_context(exporter):
    assert trace_context() is None  # no current span: nothing to carry
    with span("relay.publish"):
        carrier = trace_context()
    assert carrier is not None and set(carrier) == {"traceparent"}
    _, data = encode_message("inst", NOTICE, carrier)
    _, decoded = decode_message(data)
    assert isinstance(decoded, EventNotice)
    with span_under(decoded.trace, "relay.deliver"):
        pass
    with span_under({"traceparent": "garbage"}, "relay.deliver"):  # an unusable context: a new trace
        pass
    publish, deliver, orphan = exporter.get_finished_spans()
    assert deliver.context.trace_id == publish.context.trace_id
    assert deliver.parent is not None and deliver.parent.span_id == publish.context.span_id
    assert deliver.parent.is_remote
    assert orphan.parent is None and orphan.context.trace_id != publish.context.trace_id
