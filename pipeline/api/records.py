"""The typed fast path of a list body: sessions decoded straight into structs.

Two decodes of one body, on two threads: the walk needs only each row's keys (`ListedKey`:
id, createdAt, and what the status is derived from) and the next cursor before it can send
the next request, so the fetching thread decodes just those; the whole rows are decoded
later, by the thread that writes them.

msgspec decodes a page into `ListedSession` structs in one pass, leaving `metadata` and
`triggerConfig.basePayload` as the JSON text the API sent (`msgspec.Raw`): nothing is built
only to be serialised again. A body these structs do not describe exactly (a value of
another type, a field they do not name, a null where a string is required) is not forced
into them: `decode_list_body` answers None and the caller takes the generic path, which
keeps such values in `extra` (or rejects the body) exactly as before.

The field names and kinds mirror `pipeline.dataset.schema`; a test checks that they match.
"""

from __future__ import annotations

from typing import Any

import msgspec

UNSET = msgspec.UNSET  # a field the row leaves out
JSON_NULL = b"null"
_NULL = msgspec.Raw(JSON_NULL)


class ListedTriggerConfig(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    basePayload: msgspec.Raw = _NULL
    machine: str | None = None
    queue: str | None = None
    tags: list[str] | None = None
    maxAttempts: int | None = None
    maxDuration: int | None = None
    lockToVersion: str | None = None
    region: str | None = None
    idleTimeoutInSeconds: int | None = None


class ListedSession(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One list row; `triggerConfig` is UNSET when the row leaves it out (not null)."""

    id: str
    createdAt: str
    type: str | None = None
    taskIdentifier: str | None = None
    tags: list[str] | None = None
    externalId: str | None = None
    currentRunId: str | None = None
    metadata: msgspec.Raw = _NULL
    updatedAt: str | None = None
    closedAt: str | None = None
    closedReason: str | None = None
    expiresAt: str | None = None
    triggerConfig: ListedTriggerConfig | None | msgspec.UnsetType = msgspec.UNSET


class ListedKey(msgspec.Struct, gc=False):
    """What the walk reads of a list row; every other field is skipped (but still checked
    to be well-formed JSON)."""

    id: str
    createdAt: str
    closedAt: Any = None
    expiresAt: Any = None


class _Pagination(msgspec.Struct, gc=False):
    next: str | None = None


class _ListBody(msgspec.Struct):
    data: list[ListedSession]
    pagination: _Pagination | None = None


class _KeysBody(msgspec.Struct):
    data: list[ListedKey]
    pagination: _Pagination | None = None


_DECODER = msgspec.json.Decoder(_ListBody)
_KEYS_DECODER = msgspec.json.Decoder(_KeysBody)


def decode_list_keys(content: bytes) -> tuple[list[ListedKey], str | None] | None:
    """The page's row keys and next cursor, or None when the body does not fit them."""
    return _decode(_KEYS_DECODER, content)


def decode_list_body(content: bytes) -> tuple[list[ListedSession], str | None] | None:
    """The page's sessions and next cursor, or None when the typed structs do not fit."""
    return _decode(_DECODER, content)


def _decode(decoder: msgspec.json.Decoder, content: bytes) -> tuple[list, str | None] | None:
    try:
        body = decoder.decode(content)
    except msgspec.DecodeError:  # ValidationError included
        return None
    next_cursor = body.pagination.next if body.pagination is not None else None
    if next_cursor == "":
        return None  # the generic path names what is wrong with it
    return body.data, next_cursor


def has_trigger_config(session: ListedSession) -> bool:
    """Whether the row carries a triggerConfig object (not left out, not null)."""
    return isinstance(session.triggerConfig, ListedTriggerConfig)
