"""/api/user: the profile of the caller's user, and deletion of the whole account (§10.3, §8)."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from quart import Blueprint, Response, g

from ...errors import ApiError
from ...store import Profile
from ..auth import Caller
from ..bodies import json_body, json_response
from ..guards import charge, signed_in
from ..services import services

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PREFERENCES = {"theme": lambda v: v in ("light", "dark", "auto"), "notifications": lambda v: isinstance(v, bool),
               "autoSync": lambda v: isinstance(v, bool)}

bp = Blueprint("user", __name__)


def _bad_chars(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs") or ch in "<>" for ch in text)


def _profile(p: Profile) -> dict[str, Any]:
    max_bytes = services().config.limits.max_stored_bytes_per_user
    return {"user_id": p.user_id, "display_name": p.display_name, "email": p.email, "avatar_url": p.avatar_url,
            "preferences": p.preferences, "onboarding_completed": p.onboarding_completed,
            "created_at": p.created_at, "updated_at": p.updated_at, "last_seen": p.last_seen,
            "storage": {"used_bytes": p.stored_bytes, "max_bytes": max_bytes}}


@bp.delete("/user")
@signed_in
async def delete_user(caller: Caller) -> Response:
    svc = services()
    charge(svc.limits.http.account_deletions, caller.user_id, "http_account_deletions")
    counts = await svc.accounts.delete_user(caller.user_id, actor=caller.device_id, peer=g.peer)
    deleted = {"devices": counts.devices if counts else 0, "events": counts.events if counts else 0}
    return json_response({"success": True, "message": "User account and all associated data have been deleted",
                          "deleted": deleted})


@bp.get("/user/profile")
@signed_in
async def get_profile(caller: Caller) -> Response:
    return json_response(_profile(await services().store.get_profile(caller.user_id)))


@bp.post("/user/profile")
@signed_in
async def update_profile(caller: Caller) -> Response:
    body = await json_body()
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
    profile = await services().store.update_profile(caller.user_id, changes)
    return json_response({"success": True, "profile": _profile(profile)})


@bp.post("/user/profile/onboarding-complete")
@signed_in
async def onboarding_complete(caller: Caller) -> Response:
    await services().store.update_profile(caller.user_id, {"onboarding_completed": True})
    return json_response({"success": True})
