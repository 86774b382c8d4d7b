"""gateway/frames.py: the client's stream split into whole small text messages and bytes for wsproto gives
exactly what wsproto alone makes of the same stream, however it is cut into reads."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from pocketbridge.bench.wire import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, build_frame, masked
from pocketbridge.gateway.frames import FAST_MAX, FrameSplitter, payload_length, unmask

LIMIT = 1 << 20


def unmasked_frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


def long_length_frame(payload: bytes, size_bytes: int) -> bytes:
    """A masked final text frame whose length is written in 2 or 8 bytes although it would fit in fewer (RFC
    6455 §5.2 asks for the minimal form; wsproto closes with 1002)."""
    mask = os.urandom(4)
    marker = 126 if size_bytes == 2 else 127
    return bytes([0x81, 0x80 | marker]) + len(payload).to_bytes(size_bytes, "big") + mask + masked(payload, mask)


def rsv_frame(payload: bytes) -> bytes:
    frame = bytearray(build_frame(TEXT, payload))
    frame[0] |= 0x40
    return bytes(frame)


texts = st.text(max_size=40) | st.text(min_size=100, max_size=400) | st.just("é" * 40_000)  # 80,000 bytes
frame_lists = st.lists(
    st.one_of(
        texts.map(lambda t: [build_frame(TEXT, t.encode())]),
        st.binary(max_size=50).map(lambda b: [build_frame(BINARY, b)]),
        st.binary(max_size=20).map(lambda b: [build_frame(PING, b)]),
        st.binary(max_size=20).map(lambda b: [build_frame(PONG, b)]),
        st.tuples(st.text(max_size=30), st.text(max_size=30), st.binary(max_size=5)).map(
            lambda p: [
                build_frame(TEXT, p[0].encode(), fin=False),
                build_frame(PING, p[2]),
                build_frame(CONTINUATION, p[1].encode()),
            ]
        ),
        st.sampled_from(
            [
                [build_frame(TEXT, b"ok \xff\xfe bad")],  # invalid UTF-8: 1007
                [build_frame(TEXT, "caf\u00e9".encode()[:-1])],  # cut inside a character: 1007
                [rsv_frame(b"x")],  # a reserved bit: 1002
                [long_length_frame(b"hello", 2)],  # a length not in its shortest form: 1002
                [long_length_frame(b"x" * 200, 8)],
                [unmasked_frame(TEXT, b"plain")],  # not masked: 1002
                [build_frame(CONTINUATION, b"nothing started")],  # 1002
                [build_frame(TEXT, b"a", fin=False), build_frame(TEXT, b"b")],  # a message inside one: 1002
                [build_frame(PING, b"x" * 126)],  # a control frame too long: 1002
                [build_frame(0x3, b"?")],  # an unknown opcode: 1002
                [build_frame(CLOSE, (1000).to_bytes(2, "big") + b"bye")],
            ]
        ),
    ),
    max_size=12,
).map(lambda groups: b"".join(frame for group in groups for frame in group))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def normalize(events: list[Event]) -> list[tuple[str, object]]:
    """Whole messages, control frames and the first close; a message cut off by the close is left out."""
    out: list[tuple[str, object]] = []
    parts: list[object] = []
    for event in events:
        if isinstance(event, (TextMessage, BytesMessage)):
            parts.append(event.data)
            if event.message_finished:
                kind = "text" if isinstance(event, TextMessage) else "bytes"
                out.append((kind, "".join(parts) if kind == "text" else b"".join(parts)))  # type: ignore[arg-type]
                parts = []
        elif isinstance(event, (Ping, Pong)):
            out.append((type(event).__name__, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("close", event.code))
            break
    return out


def with_wsproto_alone(reads: list[bytes]) -> list[tuple[str, object]]:
    proto = Connection(ConnectionType.SERVER)
    events: list[Event] = []
    for data in reads:
        proto.receive_data(data)
        events.extend(proto.events())
    return normalize(events)


def with_the_splitter(reads: list[bytes], limit: int = LIMIT) -> list[tuple[str, object]]:
    proto = Connection(ConnectionType.SERVER)
    splitter = FrameSplitter()
    events: list[Event] = []
    for data in reads:
        for item in splitter.feed(data, limit):
            if isinstance(item, str):
                events.append(TextMessage(data=item))
            else:
                proto.receive_data(item)
                events.extend(proto.events())
    return normalize(events)


@settings(max_examples=300, deadline=None)
@given(frame_lists, st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=8))
def test_the_same_as_wsproto_alone_however_the_stream_is_cut(stream: bytes, points: list[int]) -> None:
    reads = cut(stream, points)
    assert with_the_splitter(reads) == with_wsproto_alone(reads)


def test_small_whole_text_frames_are_read_here_the_rest_goes_to_wsproto() -> None:
    splitter = FrameSplitter()
    ping = build_frame(PING, b"hb")
    first, second = build_frame(TEXT, b'{"type":"ack"}'), build_frame(TEXT, "\u00e9t\u00e9".encode())
    assert splitter.feed(first + ping + second, LIMIT) == ['{"type":"ack"}', ping, "\u00e9t\u00e9"]
    big = build_frame(TEXT, b"x" * (FAST_MAX + 1))
    assert splitter.feed(big, LIMIT) == [big]  # larger than FAST_MAX: streamed through wsproto
    over = build_frame(TEXT, b"y" * 200)
    assert splitter.feed(over, 100) == [over]  # over the connection's limit: wsproto's data, then the 1009


def test_an_incomplete_frame_is_kept_and_nothing_else() -> None:
    splitter = FrameSplitter()
    frame = build_frame(TEXT, b"z" * 300)  # a 2-byte length: the header is 8 bytes with the mask
    assert splitter.feed(frame[:1], LIMIT) == []
    assert splitter.feed(frame[1:3], LIMIT) == []
    assert splitter.feed(frame[3:-1], LIMIT) == []
    assert splitter.feed(frame[-1:], LIMIT) == ["z" * 300]


def test_after_a_frame_it_does_not_follow_everything_goes_to_wsproto() -> None:
    splitter = FrameSplitter()
    bad = rsv_frame(b"x")
    later = build_frame(TEXT, b"later")
    assert splitter.feed(bad + later, LIMIT) == [bad + later]
    assert splitter.feed(later, LIMIT) == [later]


def test_a_length_not_in_its_shortest_form_goes_to_wsproto() -> None:
    for frame in (long_length_frame(b"hello", 2), long_length_frame(b"hello", 8), long_length_frame(b"y" * 300, 8)):
        assert FrameSplitter().feed(frame, LIMIT) == [frame]
        assert with_wsproto_alone([frame]) == [("close", 1002)]


def test_unmask_is_rfc_6455_masking() -> None:
    """RFC 6455 §5.7: a masked "Hello" from a client; and unmasking twice gives the payload back."""
    frame = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
    assert unmask(frame[6:], frame[2:6]) == b"Hello"
    assert FrameSplitter().feed(frame, LIMIT) == ["Hello"]
    payload, mask = os.urandom(1001), os.urandom(4)
    assert unmask(unmask(payload, mask), mask) == payload


def test_payload_length_reads_every_length_form() -> None:
    assert payload_length(b"\x81", 0) is None  # one byte: no header yet
    assert payload_length(b"\x81\x7d", 0) == (125, 2, True)
    assert payload_length(b"\x81\xfe\x00", 0) is None  # the 16-bit length not all here
    assert payload_length(b"\x81\xfe\x00\x7e", 0) == (126, 4, True)
    assert payload_length(b"\x81\x7e\x00\x7d", 0) == (125, 4, False)  # 125 in 16 bits: not the shortest form
    assert payload_length(b"\x81\x7f" + (65535).to_bytes(8, "big"), 0) == (65535, 10, False)
    assert payload_length(b"\x81\x7f" + (65536).to_bytes(8, "big"), 0) == (65536, 10, True)
    assert payload_length(b"\x81\x7f" + bytes(7), 0) is None
    assert payload_length(b"xx\x81\x05", 2) == (5, 2, True)  # read at pos
