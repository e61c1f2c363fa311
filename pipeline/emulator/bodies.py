"""Request bodies of create, update and close, validated into plain frozen values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.emulator.catalog import MACHINES
from pipeline.emulator.issues import Issue, ValidationFailed, issue
from pipeline.emulator.timestamps import parse_iso_ms

MAX_BODY_BYTES = 32 * 1024  # upstream's maxContentLength for these routes
MAX_TAGS = 10
_PATCHABLE = ("tags", "metadata")


@dataclass(frozen=True)
class NewSession:
    type: str
    task_identifier: str
    external_id: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None
    trigger_config: dict[str, Any] | None = None
    expires_ms: int | None = None


@dataclass(frozen=True)
class SessionPatch:
    """Only the fields present in the body; `metadata_set` tells an explicit null apart."""

    tags: tuple[str, ...] | None = None
    metadata: dict[str, Any] | None = None
    metadata_set: bool = False


def _object(raw: bytes, *, optional: bool = False) -> dict[str, Any]:
    if optional and not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ValidationFailed([issue("invalid_json", f"Invalid JSON: {error}", [])]) from error
    if not isinstance(body, dict):
        raise ValidationFailed([issue("invalid_type", "Expected object", [])])
    return body


def _string(body: dict[str, Any], name: str, issues: list[Issue], *, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            issues.append(issue("invalid_type", "Required", [name]))
        return None
    if not isinstance(value, str):
        issues.append(issue("invalid_type", "Expected string", [name]))
        return None
    if required and not value:
        issues.append(issue("too_small", "String must contain at least 1 character(s)", [name]))
    return value


def _tags(value: Any, path: list[str | int], limit: int, issues: list[Issue]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        issues.append(issue("invalid_type", "Expected array of strings", path))
        return ()
    if len(value) > limit:
        issues.append(issue("too_big", f"Array must contain at most {limit} element(s)", path))
    return tuple(value)


def _metadata(value: Any, path: list[str | int], issues: list[Issue]) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        issues.append(issue("invalid_type", "Expected object or null", path))
        return None
    return value


def parse_new_session(raw: bytes) -> NewSession:
    body = _object(raw)
    issues: list[Issue] = []
    session_type = _string(body, "type", issues, required=True)
    task = _string(body, "taskIdentifier", issues, required=True)
    external_id = _string(body, "externalId", issues, required=False) or None
    tags = _tags(body["tags"], ["tags"], MAX_TAGS, issues) if "tags" in body else ()
    metadata = _metadata(body.get("metadata"), ["metadata"], issues)
    trigger_config = None
    if body.get("triggerConfig") is None:  # NOT NULL upstream: create requires one
        issues.append(issue("invalid_type", "Required", ["triggerConfig"]))
    else:
        trigger_config = _trigger_config(body["triggerConfig"], issues)
    expires_ms = None
    if body.get("expiresAt") is not None:
        try:
            expires_ms = parse_iso_ms(str(body["expiresAt"]))
        except ValueError:
            issues.append(issue("invalid_date", "Invalid date", ["expiresAt"]))
    if issues:
        raise ValidationFailed(issues)
    return NewSession(
        type=session_type or "",
        task_identifier=task or "",
        external_id=external_id,
        tags=tags,
        metadata=metadata,
        trigger_config=trigger_config,
        expires_ms=expires_ms,
    )


def _trigger_config(value: Any, issues: list[Issue]) -> dict[str, Any] | None:
    """Validated and stripped of unknown keys, as zod's default object parsing does."""
    if not isinstance(value, dict):
        issues.append(issue("invalid_type", "Expected object", ["triggerConfig"]))
        return None
    before = len(issues)
    config: dict[str, Any] = {}
    base = value.get("basePayload")
    if not isinstance(base, dict):
        issues.append(issue("invalid_type", "Required object", ["triggerConfig", "basePayload"]))
    config["basePayload"] = base
    checks: dict[str, tuple[Any, str]] = {
        "machine": (lambda v: v in MACHINES, "Invalid machine"),
        "queue": (lambda v: isinstance(v, str) and len(v) <= 128, "Expected string (max 128)"),
        "maxAttempts": (lambda v: _int_in(v, 1, 10), "Expected integer 1..10"),
        "maxDuration": (lambda v: _int_in(v, 1, None), "Expected positive integer"),
        "lockToVersion": (lambda v: isinstance(v, str), "Expected string"),
        "region": (lambda v: isinstance(v, str), "Expected string"),
        "idleTimeoutInSeconds": (lambda v: _int_in(v, 1, 3600), "Expected integer 1..3600"),
    }
    for name in (
        "machine",
        "queue",
        "tags",
        "maxAttempts",
        "maxDuration",
        "lockToVersion",
        "region",
        "idleTimeoutInSeconds",
    ):
        if name not in value:
            continue
        if name == "tags":
            config["tags"] = list(_tags(value["tags"], ["triggerConfig", "tags"], 5, issues))
            continue
        accept, message = checks[name]
        if not accept(value[name]):
            issues.append(issue("invalid_value", message, ["triggerConfig", name]))
        config[name] = value[name]
    return config if len(issues) == before else None


def _int_in(value: Any, low: int, high: int | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return value >= low and (high is None or value <= high)


def parse_session_patch(raw: bytes) -> SessionPatch:
    body = _object(raw)
    issues: list[Issue] = []
    for name in body:
        if name not in _PATCHABLE:
            issues.append(issue("unrecognized_keys", f"Unrecognized key: '{name}'", [name]))
    tags = _tags(body["tags"], ["tags"], MAX_TAGS, issues) if "tags" in body else None
    metadata = _metadata(body.get("metadata"), ["metadata"], issues)
    if issues:
        raise ValidationFailed(issues)
    return SessionPatch(tags=tags, metadata=metadata, metadata_set="metadata" in body)


def parse_close_reason(raw: bytes) -> str | None:
    body = _object(raw, optional=True)
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ValidationFailed([issue("invalid_type", "Expected string", ["reason"])])
    return reason
