"""With tracing on, a relay across instances is one trace: two daemon PROCESSES on one PostgreSQL database and
one Redis, each exporting its spans with the console exporter (JSON on its stdout). The trace context travels in
the bus message, so the span that delivered the event on instance two is a child of the span that published it
on instance one, after the commit. On one instance (either bus) the delivery span is the publishing span's child too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pocketbridge.bench.launcher import ServerProcess, read_text, running
from pocketbridge.client import DeviceKey, connect, new_device_id
from pocketbridge.tracing import setup_tracing, stop_tracing
from tests.conftest import run_daemon

WAIT = 10.0  # bound on each wait


def _env(work: Path, n: int, dsn: str, redis_url: str) -> dict[str, str]:
    return {
        "PB_STORAGE_BACKEND": "postgres",
        "PB_STORAGE_DSN": dsn,
        "PB_BUS_BACKEND": "redis",
        "PB_BUS_URL": redis_url,
        "PB_SERVER_DATA_DIR": str(work / f"data{n}"),
        "PB_SERVER_IDENTITY_KEY_FILE": str(work / "identity.key"),  # created by the first, shared
        "PB_TRACING_EXPORTER": "console",
        "PB_TRACING_SERVICE_NAME": f"pb-instance{n}",
    }


def exported_spans(server: ServerProcess) -> list[dict[str, Any]]:
    """The spans the console exporter wrote on the process's stdout (JSON objects, after the banner)."""
    text = read_text(server.stdout_path)
    decoder = json.JSONDecoder()
    spans = []
    at = text.find("\n{")
    while at != -1:
        span, end = decoder.raw_decode(text, at + 1)
        spans.append(span)
        at = text.find("\n{", end)
    return spans


async def wait_ready(server: ServerProcess) -> None:
    """Until /health/ready says the database and the bus (the Redis subscription) are connected."""
    async with httpx.AsyncClient(timeout=2.0) as http:
        with trio.fail_after(WAIT):
            while (await http.get(server.http_url + "/health/ready")).status_code != 200:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_relay_across_instances_is_one_trace(tmp_path: Path, postgres_dsn: str, redis_url: str):
    key = DeviceKey.generate()
    sender, receiver = new_device_id(), new_device_id()
    # started one after the other: the first creates the deployment's identity key, the second reads it
    async with (
        running("one", tmp_path, _env(tmp_path, 1, postgres_dsn, redis_url)) as one,
        running("two", tmp_path, _env(tmp_path, 2, postgres_dsn, redis_url)) as two,
    ):
        await wait_ready(one)
        await wait_ready(two)
        with trio.fail_after(WAIT):
            async with connect(one.ws_url, key, sender) as a, connect(two.ws_url, key, receiver) as b:
                ack = await a.send_event("clipboard:main", "clipboard:text", b"secret payload")
                assert ack.status == "stored"
                event = await b.receive_event()
                assert event.payload == b"secret payload"
    # both processes stopped (SIGTERM): their exporters flushed every span on the way out
    assert one.proc.returncode == 0 and two.proc.returncode == 0, one.describe() + two.describe()
    spans_one, spans_two = exported_spans(one), exported_spans(two)
    for spans, service in ((spans_one, "pb-instance1"), (spans_two, "pb-instance2")):
        assert spans, f"no spans exported by {service}"
        assert {s["resource"]["attributes"]["service.name"] for s in spans} == {service}

    ingests = [s for s in spans_one if s["name"] == "event.ingest"]
    assert len(ingests) == 1, ingests  # one event
    ingest = ingests[0]

    delivers = [s for s in spans_two if s["name"] == "relay.deliver"]
    assert len(delivers) == 1, delivers  # the receiver is the only session of this user on instance two
    deliver = delivers[0]
    # the event's own trace: from the connection that sent it on instance one to its delivery on instance two
    assert deliver["context"]["trace_id"] == ingest["context"]["trace_id"]
    assert deliver["parent_id"] == ingest["context"]["span_id"]  # a parent on the other instance
    assert deliver["attributes"] == {"sessions": 1}

    # the trace context is the only thing that travelled: no ids, keys or payloads in any span
    for s in spans_one + spans_two:
        for value in s["attributes"].values():
            for secret in (key.public_hex, sender, receiver, event.event_id, "secret"):
                assert secret not in str(value)


async def test_a_relay_on_one_instance_is_one_trace(config_factory):
    """In-process (and a Redis bus's local delivery): nothing on the wire, the delivery span is still a child."""
    exporter = InMemorySpanExporter()
    provider = setup_tracing(config_factory(), exporter=exporter)
    try:
        async with run_daemon(config_factory()) as (_, running_):
            key = DeviceKey.generate()
            with trio.fail_after(WAIT):
                async with connect(running_.ws_url, key, new_device_id()) as a, connect(
                    running_.ws_url, key, new_device_id()
                ) as b:
                    await a.send_event("clipboard:main", "clipboard:text", b"secret payload")
                    await b.receive_event()
    finally:
        stop_tracing(provider)
    spans = exporter.get_finished_spans()
    (ingest,) = [s for s in spans if s.name == "event.ingest"]
    (deliver,) = [s for s in spans if s.name == "relay.deliver"]
    assert deliver.context.trace_id == ingest.context.trace_id
    assert deliver.parent is not None and deliver.parent.span_id == ingest.context.span_id
    assert deliver.attributes["sessions"] == 2  # both sessions of the user (the sender ignores its own event)
