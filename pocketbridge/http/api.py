"""REST and admin routes of §10.3–10.4. Every /api/X is also served at /api/v1/X."""

from __future__ import annotations

import json
import re
import secrets
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from quart import Response, g, request
from quart_trio import QuartTrio

from .. import accounts
from ..audit import audit
from ..errors import ApiError, StoreUnavailable
from ..gateway.context import Gateway
from ..protocol.auth import (
    admin_key_matches,
    bearer_token,
    issue_jwt,
    presented_admin_key,
)
from ..protocol.envelope import is_hex, is_uuid4
from ..protocol.handshake import device_name_has_invalid_chars
from ..store import Device, Rename, Unrevoke
from .app import charge, error_response, json_response
from .auth import Caller, authenticate, verify_bearer

EMPTY_MESSAGE = "No devices connected. Connect a device to start syncing."
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PREFERENCES = {"theme": lambda v: v in ("light", "dark", "auto"), "notifications": lambda v: isinstance(v, bool),
               "autoSync": lambda v: isinstance(v, bool)}
Handler = Callable[..., Awaitable[Response]]


def _bad_chars(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs") or ch in "<>" for ch in text)


def _device_info(device: Device, caller: Caller) -> dict[str, Any]:
    info: dict[str, Any] = {"device_id": device.device_id}
    if device.device_name is not None:
        info["device_name"] = device.device_name
    if device.device_type is not None:
        info["device_type"] = device.device_type
    info.update(
        is_online=device.is_online,
        last_seen=device.last_seen or device.registered_at,
        registered_at=device.registered_at,
        is_current=device.device_id == caller.device_id,
    )
    return info


def _path_device_id(raw: str) -> str:
    if not is_uuid4(raw):
        raise ApiError("INVALID_DEVICE_ID")
    return raw.lower()


async def _json_body() -> dict[str, Any]:
    raw = await request.get_data(cache=True)
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; too deep nesting is invalid too
        raise ApiError("INVALID_JSON") from None
    if not isinstance(body, dict):
        raise ApiError("INVALID_JSON")
    return body


def register(app: QuartTrio, gw: Gateway) -> None:
    store = gw.store

    def locked_out_check(peer: str) -> None:
        """After too many failed authentications from an address, all of /api answers 429."""
        if gw.limits.http.auth_failures.available(peer) < 1:
            charge(gw, gw.limits.http.auth_failures, peer, "http_auth_failures")

    def api(rule: str, methods: list[str], *, auth: bool = True) -> Callable[[Handler], Handler]:
        """Register ``/api<rule>`` and ``/api/v1<rule>``; with ``auth`` the handler gets the Caller."""

        def wrap(handler: Handler) -> Handler:
            async def endpoint(**kwargs: Any) -> Response:
                peer = g.peer
                locked_out_check(peer)
                if not auth:
                    charge(gw, gw.limits.http.unauthenticated, peer, "http_unauthenticated")
                    return await handler(**kwargs)
                body = await request.get_data(cache=True)
                target = request.scope.get("raw_path", request.path.encode()).decode("latin-1")
                query = request.scope.get("query_string", b"")
                if query:
                    target += "?" + query.decode("latin-1")
                try:
                    caller = await authenticate(gw, {k.lower(): v for k, v in request.headers.items()},
                                                request.method, target, body)
                except ApiError as error:
                    if error.status == 401:
                        if error.code == "AUTH_REQUIRED":
                            charge(gw, gw.limits.http.unauthenticated, peer, "http_unauthenticated")
                        gw.limits.http.auth_failures.take(peer)
                    raise
                charge(gw, gw.limits.http.per_device, caller.device_id, "http_requests_per_device")
                store.note_seen(caller.device_id, caller.user_id)
                return await handler(caller, **kwargs)

            name = f"{handler.__name__}_{'_'.join(methods).lower()}"
            app.add_url_rule(f"/api{rule}", endpoint=name, view_func=endpoint, methods=methods)
            app.add_url_rule(f"/api/v1{rule}", endpoint=f"{name}_v1", view_func=endpoint, methods=methods)
            return handler

        return wrap

    async def issue_token(caller: Caller) -> Response:
        charge(gw, gw.limits.http.tokens, caller.device_id, "http_token_requests")
        now_s = gw.clock.now_ms() // 1000
        ttl = int(gw.config.http.bearer_token_ttl)
        token = issue_jwt(gw.identity, device_id=caller.device_id, user_id=caller.user_id, iat=now_s,
                          exp=now_s + ttl, jti=secrets.token_hex(16))
        return json_response({"token": token, "expiresAt": (now_s + ttl) * 1000, "expiresIn": ttl * 1000})

    # --- auth -----------------------------------------------------------------------------------
    @api("/auth/token", ["POST"])
    async def token(caller: Caller) -> Response:
        if caller.via != "pb1":
            raise ApiError("AUTH_REQUIRED")
        return await issue_token(caller)

    @api("/auth/refresh", ["POST"])
    async def refresh(caller: Caller) -> Response:
        return await issue_token(caller)

    @api("/auth/verify", ["GET"], auth=False)
    async def verify() -> Response:
        raw = bearer_token(request.headers.get("Authorization"))
        claims = verify_bearer(gw, raw) if raw else None
        device = await store.get_device(claims.device_id) if claims else None
        if claims is None or device is None or device.revoked_at is not None or device.user_id != claims.user_id:
            return json_response({"valid": False, "error": "Invalid or expired token"})
        payload = {"user_id": claims.user_id, "device_id": claims.device_id, "iat": claims.iat, "exp": claims.exp}
        return json_response({"valid": True, "payload": payload})

    # --- devices --------------------------------------------------------------------------------
    @api("/devices", ["GET"])
    async def list_devices(caller: Caller) -> Response:
        devices = await store.list_devices(caller.user_id)
        devices.sort(key=lambda d: (d.is_online, d.last_seen or d.registered_at), reverse=True)
        body: dict[str, Any] = {
            "devices": [_device_info(d, caller) for d in devices],
            "count": len(devices),
            "is_empty": not devices,
            "user_id": caller.user_id,
        }
        profile = await store.get_profile(caller.user_id)
        if profile.display_name:
            body["user_display_name"] = profile.display_name
        if not devices:
            body["message"] = EMPTY_MESSAGE
        return json_response(body)

    async def own_device(caller: Caller, device_id: str) -> Device:
        device = await store.get_device(_path_device_id(device_id))
        if device is None or device.user_id != caller.user_id or device.revoked_at is not None:
            raise ApiError("DEVICE_NOT_FOUND")
        return device

    @api("/devices/<device_id>", ["GET"])
    async def get_device(caller: Caller, device_id: str) -> Response:
        return json_response(_device_info(await own_device(caller, device_id), caller))

    @api("/devices/<device_id>/rename", ["POST"])
    async def rename(caller: Caller, device_id: str) -> Response:
        target = _path_device_id(device_id)
        body = await _json_body()
        charge(gw, gw.limits.http.device_mutations, caller.user_id, "http_device_mutations")
        name = body.get("device_name")
        if not isinstance(name, str) or not 1 <= len(name.strip()) <= 50:
            raise ApiError("INVALID_DEVICE_NAME")
        name = name.strip()
        if device_name_has_invalid_chars(name):  # the handshake's rule (§3.6), strict here
            raise ApiError("INVALID_DEVICE_NAME", "Device name contains invalid characters")
        outcome = await store.rename_device(caller.user_id, target, name)
        if outcome is Rename.NOT_FOUND:
            raise ApiError("DEVICE_NOT_FOUND")
        if outcome is Rename.TAKEN:
            raise ApiError("DEVICE_NAME_TAKEN")
        audit(gw, "device_renamed", actor=caller.device_id, target=target, peer=g.peer)
        return json_response({"success": True, "device_id": target, "device_name": name})

    @api("/devices/<device_id>", ["DELETE"])
    async def delete_device(caller: Caller, device_id: str) -> Response:
        device = await own_device(caller, device_id)
        charge(gw, gw.limits.http.device_mutations, caller.user_id, "http_device_mutations")
        await accounts.revoke_device(gw, device.device_id, accounts.USER_REVOKED, caller.user_id,
                                     actor=caller.device_id, peer=g.peer)
        return json_response({"success": True, "message": f"Device {device.device_id} has been removed"})

    @api("/presence", ["GET"])
    async def presence(caller: Caller) -> Response:
        devices = sorted(await store.list_devices(caller.user_id), key=lambda d: d.last_seen or 0, reverse=True)
        body: dict[str, Any] = {
            "user_id": caller.user_id,
            "devices": [
                {"device_id": d.device_id, "device_name": d.device_name, "is_online": d.is_online,
                 "last_seen": d.last_seen or d.registered_at}
                for d in devices
            ],
            "online_count": sum(d.is_online for d in devices),
            "total_count": len(devices),
            "is_empty": not devices,
        }
        if not devices:
            body["message"] = EMPTY_MESSAGE
        return json_response(body)

    @api("/user", ["DELETE"])
    async def delete_user(caller: Caller) -> Response:
        charge(gw, gw.limits.http.account_deletions, caller.user_id, "http_account_deletions")
        counts = await accounts.delete_user(gw, caller.user_id, actor=caller.device_id, peer=g.peer)
        deleted = {"devices": counts.devices if counts else 0, "events": counts.events if counts else 0}
        return json_response({"success": True, "message": "User account and all associated data have been deleted",
                              "deleted": deleted})

    # --- profile --------------------------------------------------------------------------------
    def _profile(p: Any) -> dict[str, Any]:
        return {"user_id": p.user_id, "display_name": p.display_name, "email": p.email, "avatar_url": p.avatar_url,
                "preferences": p.preferences, "onboarding_completed": p.onboarding_completed,
                "created_at": p.created_at, "updated_at": p.updated_at, "last_seen": p.last_seen,
                "storage": {"used_bytes": p.stored_bytes, "max_bytes": gw.config.limits.max_stored_bytes_per_user}}

    @api("/user/profile", ["GET"])
    async def get_profile(caller: Caller) -> Response:
        return json_response(_profile(await store.get_profile(caller.user_id)))

    @api("/user/profile", ["POST"])
    async def update_profile(caller: Caller) -> Response:
        body = await _json_body()
        changes: dict[str, Any] = {}
        if "display_name" in body:
            name = body["display_name"]
            if name is not None:
                if not isinstance(name, str) or not 1 <= len(name.strip()) <= 100 or _bad_chars(name.strip()):
                    raise ApiError("VALIDATION_ERROR", "Display name must be 1-100 characters")
                name = name.strip()
            changes["display_name"] = name
        if "email" in body:
            email = body["email"]
            if email is not None and (not isinstance(email, str) or len(email) > 254 or not EMAIL.fullmatch(email)):
                raise ApiError("VALIDATION_ERROR", "Invalid email address")
            changes["email"] = email
        if "preferences" in body:
            prefs = body["preferences"]
            if not isinstance(prefs, dict) or any(k in PREFERENCES and not PREFERENCES[k](v) for k, v in prefs.items()):
                raise ApiError("VALIDATION_ERROR", "Invalid preferences")
            known = {k: v for k, v in prefs.items() if k in PREFERENCES}
            if known:
                changes["preferences"] = known
        if not changes:
            raise ApiError("NO_UPDATES")
        profile = await store.update_profile(caller.user_id, changes)
        return json_response({"success": True, "profile": _profile(profile)})

    @api("/user/profile/onboarding-complete", ["POST"])
    async def onboarding_complete(caller: Caller) -> Response:
        await store.update_profile(caller.user_id, {"onboarding_completed": True})
        return json_response({"success": True})

    # --- file history ---------------------------------------------------------------------------
    @api("/events/files", ["GET"])
    async def file_events(caller: Caller) -> Response:
        def number(name: str, default: int) -> int | None:
            raw = request.args.get(name)
            if raw is None:
                return default
            return int(raw) if re.fullmatch(r"-?[0-9]{1,15}", raw) else None

        limit, offset = number("limit", 50), number("offset", 0)
        if limit is None or offset is None or offset < 0:
            raise ApiError("VALIDATION_ERROR")
        limit = min(100, max(1, limit))
        events, total = await store.file_events(caller.user_id, limit, offset, gw.clock.now_ms())
        out = []
        for e in events:
            item = e.wire()
            item.pop("user_id")
            item.pop("device_seq")
            item.pop("ttl", None)
            item["payload_size"] = e.payload_size
            out.append({k: item[k] for k in ("event_id", "device_id", "stream_id", "stream_seq", "type",
                                              "encrypted_payload", "payload_size", "created_at")})
        pagination = {"limit": limit, "offset": offset, "total": total, "hasMore": offset + len(out) < total}
        return json_response({"events": out, "pagination": pagination})

    # --- removed --------------------------------------------------------------------------------
    async def gone(**_: Any) -> Response:
        locked_out_check(g.peer)
        charge(gw, gw.limits.http.unauthenticated, g.peer, "http_unauthenticated")
        raise ApiError("GONE")

    all_methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    for prefix in ("/api", "/api/v1"):
        app.add_url_rule(f"{prefix}/pairing", f"gone{prefix}", gone, methods=all_methods)
        app.add_url_rule(f"{prefix}/pairing/<path:rest>", f"gone_rest{prefix}", gone, methods=all_methods)

    # --- admin ----------------------------------------------------------------------------------
    def admin(rule: str, methods: list[str]) -> Callable[[Handler], Handler]:
        def wrap(handler: Handler) -> Handler:
            async def endpoint() -> Response:
                peer = g.peer
                configured = gw.config.admin.api_key
                if not configured:
                    raise ApiError("ADMIN_DISABLED")
                if gw.limits.http.admin_failures.available(peer) < 1:
                    charge(gw, gw.limits.http.admin_failures, peer, "admin_auth_failures")
                charge(gw, gw.limits.http.admin, peer, "admin_requests")
                presented = presented_admin_key(request.headers.get("X-Admin-API-Key"),
                                                request.headers.get("Authorization"))
                if not admin_key_matches(configured, presented):
                    gw.limits.http.admin_failures.take(peer)
                    audit(gw, "admin_auth_failed", peer=peer, detail=request.path)
                    raise ApiError("ADMIN_AUTH_REQUIRED")
                return await handler()

            app.add_url_rule(f"/admin{rule}", endpoint=f"admin_{handler.__name__}", view_func=endpoint, methods=methods)
            return handler

        return wrap

    def _admin_device_id(body: dict[str, Any]) -> str:
        device_id = body.get("deviceId")
        if not isinstance(device_id, str) or not is_uuid4(device_id):
            raise ApiError("VALIDATION_ERROR")
        return device_id.lower()

    @admin("/revoke-device", ["POST"])
    async def admin_revoke() -> Response:
        body = await _json_body()
        device_id = _admin_device_id(body)
        reason, user_id = body.get("reason"), body.get("userId")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
            raise ApiError("VALIDATION_ERROR")
        if user_id is not None and not is_hex(user_id, 64):
            raise ApiError("VALIDATION_ERROR")
        device = await accounts.revoke_device(gw, device_id, reason or accounts.ADMIN_REVOKED,
                                              user_id.lower() if user_id else None, actor="admin", peer=g.peer)
        if device is None:
            raise ApiError("DEVICE_NOT_FOUND")
        return json_response({"success": True, "message": "Device revoked"})

    @admin("/unrevoke-device", ["POST"])
    async def admin_unrevoke() -> Response:
        device_id = _admin_device_id(await _json_body())
        outcome = await store.unrevoke_device(device_id, gw.config.limits.max_devices_per_user)
        if outcome is Unrevoke.NOT_FOUND:
            raise ApiError("DEVICE_NOT_FOUND")
        if outcome is Unrevoke.LIMIT:
            raise ApiError("DEVICE_LIMIT")
        audit(gw, "device_unrevoked", actor="admin", target=device_id, peer=g.peer)
        return json_response({"success": True, "message": "Device unrevoked"})

    @admin("/audit", ["GET"])
    async def admin_audit() -> Response:
        raw_limit, action = request.args.get("limit", "100"), request.args.get("action")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000 or (action is not None and len(action) > 64):
            raise ApiError("VALIDATION_ERROR")
        records = await store.audit_log(int(raw_limit), action)
        return json_response({"records": [attrs.asdict(r) for r in records]})

    @admin("/revoked-devices", ["GET"])
    async def admin_revoked() -> Response:
        user_id = request.args.get("userId")
        if user_id is not None and not is_hex(user_id, 64):
            raise ApiError("VALIDATION_ERROR")
        rows = await store.revoked_devices(user_id.lower() if user_id else None, 1000)
        return json_response({"revoked": [{"deviceId": r.device_id, "userId": r.user_id, "revokedAt": r.revoked_at,
                                           "reason": r.reason} for r in rows]})

    @app.errorhandler(StoreUnavailable)
    async def store_down(_: StoreUnavailable) -> Response:
        return error_response("SERVICE_UNAVAILABLE", retry_after=5)
