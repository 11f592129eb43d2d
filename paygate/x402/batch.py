"""The batch endpoint's request (``POST /v1/batch/chat/completions``), sans-IO: a JSON array of
chat requests answered as ``{"results": [...]}`` in order, priced as one payment covering every
item (the sum of the items' prices for ``exact``, of their maxima for ``upto``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from paygate import jsonsafe
from paygate.errors import PaygateError
from paygate.jsonsafe import UntrustedJSONError

BATCH_PATH = "/v1/batch/chat/completions"
ITEM_PATH = "/v1/chat/completions"  # where each item goes upstream


class BadBatch(PaygateError):
    """The batch body is not a bounded JSON array of chat request objects."""

    message = "the batch body is not a bounded JSON array of chat request objects"

    code = "invalid_batch"


@dataclass(frozen=True, slots=True)
class Batch:
    """The items, each as the JSON bytes of one chat request (streaming refused per item)."""

    items: tuple[bytes, ...] = field(repr=False)
    models: tuple[str | None, ...]
    refused: tuple[str | None, ...]  # per item: why it is not forwarded (None: forwarded)


def parse_batch(body: bytes, *, max_items: int) -> Batch:
    """The batch in ``body``; BadBatch when it is not an array of 1..max_items objects."""
    try:
        data = jsonsafe.loads(body, max_bytes=max(len(body), 1))
    except UntrustedJSONError:
        raise BadBatch("the batch body must be a JSON array of chat requests") from None
    if not isinstance(data, list) or not data:
        raise BadBatch("the batch body must be a non-empty JSON array of chat requests")
    if len(data) > max_items:
        raise BadBatch(f"a batch holds at most {max_items} requests")
    items, models, refused = [], [], []
    for item in data:
        if not isinstance(item, dict):
            raise BadBatch("every batch item must be a JSON object (a chat request)")
        model = item.get("model")
        models.append(model if isinstance(model, str) and 0 < len(model) <= 256 else None)
        refused.append("streaming is not supported in a batch" if item.get("stream") else None)
        items.append(json.dumps(item, separators=(",", ":")).encode())
    return Batch(tuple(items), tuple(models), tuple(refused))


def item_error(message: str, code: str, status: int) -> dict[str, Any]:
    """One item's error object in the results (OpenAI's error shape plus the status)."""
    return {
        "error": {"message": message, "type": "batch_item_error", "code": code, "status": status}
    }
