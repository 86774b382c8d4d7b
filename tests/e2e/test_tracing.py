"""Optional OpenTelemetry tracing, recorded with an in-memory exporter."""

from __future__ import annotations

import trio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pocketbridge.client import DeviceKey, connect, new_device_id
from pocketbridge.tracing import setup_tracing, span, stop_tracing
from tests.conftest import run_daemon


def test_tracing_is_a_no_op_when_off(config_factory):
    setup_tracing(config_factory())  # exporter "none"
    with span("anything") as s:
        assert s is None


async def test_spans_for_handshake_ingest_store_batch_and_relay(config_factory):
    exporter = InMemorySpanExporter()
    provider = setup_tracing(config_factory(), exporter=exporter)
    try:
        async with run_daemon(config_factory()) as (_, running):
            key = DeviceKey.generate()
            with trio.fail_after(5):
                async with connect(running.ws_url, key, new_device_id()) as a, connect(
                    running.ws_url, key, new_device_id()
                ) as b:
                    await a.send_event("clipboard:main", "clipboard:text", b"secret payload")
                    await b.receive_event()
    finally:
        stop_tracing(provider)
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert {"ws.handshake", "event.ingest", "store.batch", "relay.publish"} <= names
    ingest = next(s for s in spans if s.name == "event.ingest")
    assert ingest.attributes["outcome"] == "stored"
    assert ingest.attributes["payload_size"] == len(b"secret payload")
    # spans carry counts and outcomes only: no ids, keys or payloads
    for s in spans:
        for value in s.attributes.values():
            assert key.public_hex not in str(value)
            assert "secret" not in str(value)
