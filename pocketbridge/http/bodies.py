"""JSON request and response bodies, and the error shape of §10.1."""

from __future__ import annotations

import json
from typing import Any

from quart import Response, g, request

from ..errors import HTTP_ERRORS, ApiError
from ..protocol.auth import request_id

SERVICE_UNAVAILABLE_RETRY_AFTER = 5  # seconds, while the store is unreachable


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # a final newline, so `curl` output ends its line
    return Response(json.dumps(payload, separators=(",", ":")) + "\n", status=status,
                    content_type="application/json", headers=headers)


def error_response(code: str, text: str | None = None, retry_after: int | None = None) -> Response:
    status, default = HTTP_ERRORS[code]
    body = {"error": text or default, "code": code, "request_id": getattr(g, "request_id", None) or request_id(None)}
    if retry_after is None and code == "SERVICE_UNAVAILABLE":
        retry_after = SERVICE_UNAVAILABLE_RETRY_AFTER  # every 503 tells clients when to retry (§10.1)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status in (413, 415):
        headers["Connection"] = "close"  # the body was not read; the connection cannot be reused
    return json_response(body, status, headers or None)


async def json_body() -> dict[str, Any]:
    """The request body: a JSON object, or 400 INVALID_JSON."""
    raw = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; too deep nesting is invalid too
        raise ApiError("INVALID_JSON") from None
    if not isinstance(body, dict):
        raise ApiError("INVALID_JSON")
    return body
