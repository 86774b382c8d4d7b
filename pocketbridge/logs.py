"""Logging: one setup, one redaction point, and the request/connection id on every line.

Formats: ``json`` (one object per line; the default under systemd/journald or when stderr is not a
terminal) and ``text`` (a terminal). Redaction runs on every record whatever its origin, so a key,
signature, token, nonce, pairing code or payload that slipped into a message never reaches the
output: long hex strings and UUIDs are shortened to 8 characters, base64 blobs, JWTs and 6-digit
codes are replaced.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_UUID = re.compile(r"(?<![0-9a-fA-F])([0-9a-fA-F]{8})-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"(?<![0-9a-fA-F])([0-9a-fA-F]{8})[0-9a-fA-F]{24,}")
# values of secret-bearing JSON fields, however short (e.g. a 20-character encrypted_payload)
_FIELDS = re.compile(
    r'("(?:encrypted_payload|payload|client_signature|server_signature|signature|nonce_c|nonce_c2|nonce_s|'
    r'pairing_code|code|token|continuation_token|api_key)"\s*:\s*)"[^"]*"'
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{40,}={0,2}")
_CODE = re.compile(r"(?<![\w])(?<!\d\.)\d{6}(?!\w|\.\d)")


def _blob(match: re.Match[str]) -> str:
    s = match.group(0)
    mixed = any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s)
    return "[redacted]" if mixed else s  # base64 mixes cases and digits; paths and words rarely do


def redact(text: str) -> str:
    text = _FIELDS.sub(r'\1"[redacted]"', text)
    text = _JWT.sub("[redacted]", text)
    text = _UUID.sub(r"\1…", text)
    text = _HEX.sub(r"\1…", text)
    text = _B64.sub(_blob, text)
    return _CODE.sub("[redacted]", text)


class RedactingFilter(logging.Filter):
    """Adds the context id and redacts the message (and exception text) of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def choose_format(configured: str) -> str:
    if configured != "auto":
        return configured
    if os.environ.get("JOURNAL_STREAM") or not sys.stderr.isatty():
        return "json"
    return "text"


def setup_logging(level: str, fmt: str = "auto", stream: object = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if choose_format(fmt) == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # the pool's own retry warnings repeat what the store logs once, in its words (and at start, the one line)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR if root.level > logging.DEBUG else logging.WARNING)
    return handler
