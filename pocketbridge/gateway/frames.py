"""The common case of the client's byte stream read without wsproto: bytes in, whole text messages out.

Nearly every message a client sends is one small text frame (an event, an ack, a ping request). wsproto
parses each with a chain of generators, an incremental UTF-8 decoder and several event objects; here such a
frame costs a header check, one XOR and one strict UTF-8 decode. :class:`FrameSplitter` walks the stream
frame by frame and splits it into

* ``str``: one whole text message: a final text frame (RFC 6455 §5.2: masked, no reserved bits, its length in
  the shortest form) that is not
  part of a fragmented message, at most ``FAST_MAX`` bytes and within the connection's message limit, and
  valid UTF-8;
* ``bytes``: everything else, in order, for wsproto: control frames, binary and fragmented messages, larger
  messages, and anything the protocol does not allow (wsproto answers those with their close code, so an
  invalid frame is handed over, never judged here). After the first such invalid frame, a close frame or a
  frame this class cannot follow, the whole rest of the stream goes to wsproto.

The frames taken here are whole messages between other messages, so wsproto's state is the one it would have
reached itself (the server agrees to no extension: a reserved bit is always an error). What is kept between
calls is at most one incomplete header or small frame (``FAST_MAX`` + 14 bytes).
"""

from __future__ import annotations

FAST_MAX = 65536  # the largest text frame read here; larger ones stream through wsproto
_TEXT, _BINARY, _CONTINUATION, _CLOSE = 0x1, 0x2, 0x0, 0x8
_KNOWN_OPCODES = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))


def unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` repeated (RFC 6455 §5.3)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def payload_length(buf: bytes | bytearray, pos: int) -> tuple[int, int, bool] | None:
    """The frame header at ``buf[pos:]`` (RFC 6455 §5.2): ``(payload length, header bytes before any mask,
    whether the length is in its shortest form)``, or None while the header is not all here."""
    n = len(buf) - pos
    if n < 2:
        return None
    length = buf[pos + 1] & 0x7F
    if length < 126:
        return length, 2, True
    size = 2 if length == 126 else 8
    if n < 2 + size:
        return None
    length = int.from_bytes(buf[pos + 2 : pos + 2 + size], "big")
    return length, 2 + size, length >= (126 if size == 2 else 65536)


class FrameSplitter:
    """Splits a client's stream into whole small text messages and bytes for wsproto (see the module)."""

    __slots__ = ("_buf", "_through", "_fragmented", "_off")

    def __init__(self) -> None:
        self._buf = bytearray()  # an incomplete header or small text frame
        self._through = 0  # bytes of the current frame still to hand to wsproto as they come
        self._fragmented = False  # a fragmented message is in progress (its frames all go to wsproto)
        self._off = False  # everything goes to wsproto from now on

    def feed(self, data: bytes, limit: int) -> list[str | bytes]:
        """Split ``data`` (what was just read); ``limit`` is the connection's message limit now."""
        if self._off:
            return [data] if data else []
        buf = self._buf
        buf += data
        out: list[str | bytes] = []
        pending = bytearray()  # consecutive bytes for wsproto, handed over as one piece
        n = len(buf)
        pos = 0
        small = min(limit, FAST_MAX)
        incomplete = False  # stopped at a header not all here yet (else at a frame this class does not follow)
        while pos < n:
            if self._through:
                k = min(self._through, n - pos)
                pending += buf[pos : pos + k]
                pos += k
                self._through -= k
                continue
            header = payload_length(buf, pos)
            if header is None:
                incomplete = True
                break
            length, head, shortest = header
            b0, b1 = buf[pos], buf[pos + 1]
            opcode = b0 & 0x0F
            head += 4  # the mask
            if b0 & 0x70 or not b1 & 0x80 or opcode not in _KNOWN_OPCODES or length >> 63 or not shortest:
                break  # not allowed: wsproto says so, with its close code
            if opcode == _TEXT and b0 & 0x80 and not self._fragmented and length <= small:
                end = pos + head + length
                if end > n:  # wait for the rest of it (at most FAST_MAX + 14 bytes are kept)
                    self._buf = buf[pos:]
                    return self._flush(out, pending)
                try:
                    text = unmask(buf[pos + head : end], buf[pos + head - 4 : pos + head]).decode("utf-8")
                except UnicodeDecodeError:
                    break  # wsproto closes with 1007
                if pending:
                    out.append(bytes(pending))
                    pending = bytearray()
                out.append(text)
                pos = end
                continue
            if opcode in (_TEXT, _BINARY, _CONTINUATION):
                if (opcode == _CONTINUATION) != self._fragmented:
                    break  # a message inside a message, or a continuation of none: wsproto's 1002
                self._fragmented = not b0 & 0x80
            elif opcode == _CLOSE:
                break  # the close handshake is wsproto's
            total = head + length
            k = min(total, n - pos)
            pending += buf[pos : pos + k]
            pos += k
            self._through = total - k
        else:
            self._buf = bytearray()
            return self._flush(out, pending)
        if incomplete:
            self._buf = buf[pos:]
        else:  # a frame this class does not follow: hand over the rest, and everything after it
            self._off = True
            pending += buf[pos:]
            self._buf = bytearray()
        return self._flush(out, pending)

    @staticmethod
    def _flush(out: list[str | bytes], pending: bytearray) -> list[str | bytes]:
        if pending:
            out.append(bytes(pending))
        return out
