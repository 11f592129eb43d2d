"""The shaping stage's HTTP face: :mod:`paygate.upstream.shaping`'s refusals as the gateway's
stable 400s, for every path that forwards a body (payments, batch items, payments off)."""

from __future__ import annotations

from dataclasses import dataclass, field

from paygate.jsonsafe import UntrustedJSONError
from paygate.server.errors import GatewayError, InvalidJSON
from paygate.server.routing import ModelNotFound
from paygate.upstream.engines.limits import LimitRefused
from paygate.upstream.errors import ApiNotServed, LengthKeyRefused, OptionRefused
from paygate.upstream.shaping import RequestShaper, Shaped
from paygate.x402.batch import ITEM_PATH, Batch
from paygate.x402.metering import Quote, TokenPricing


class RequestRefused(GatewayError):
    message = "the request asks the model server for something this gateway does not price"

    status = 400
    code = "invalid_output_limit"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # invalid_output_limit | unsupported_limit_key | engine_option_refused


def shape_or_refuse(shaper: RequestShaper, path: str, body: bytes) -> Shaped | None:
    """``body`` shaped for ``path`` (None: not a generation route, options checked), or the
    refusal as a 400."""
    try:
        shaped = shaper.shape(path, body)
        if shaped is None:
            shaper.check_options(path, body)
        return shaped
    except UntrustedJSONError:
        raise InvalidJSON from None
    except (LimitRefused, OptionRefused, LengthKeyRefused) as exc:
        raise RequestRefused(exc.code, str(exc)) from None
    except ApiNotServed as exc:
        raise ModelNotFound(str(exc)) from None


@dataclass(frozen=True, slots=True)
class ItemPlan:
    """One batch item: forwarded as ``body`` (shaped), or refused before any payment with
    ``refusal`` (message, code, status) and never priced."""

    body: bytes | None = field(repr=False)
    model: str | None = None
    shaped: Shaped | None = field(default=None, repr=False)
    source: bytes = field(default=b"", repr=False)  # the item as the caller sent it
    refusal: tuple[str, str, int] | None = None

    @property
    def forwarded(self) -> bool:
        return self.refusal is None


def plan_batch(shaper: RequestShaper | None, batch: Batch) -> tuple[ItemPlan, ...]:
    """Each item as a single request to ``/v1/chat/completions`` would be shaped (its output
    bound, its options), or refused; the same function every payment path uses."""
    plans: list[ItemPlan] = []
    for body, model, refused in zip(batch.items, batch.models, batch.refused, strict=True):
        if refused is not None:
            plans.append(ItemPlan(None, model, refusal=(refused, "invalid_batch_item", 400)))
            continue
        if shaper is None:
            plans.append(ItemPlan(body, model, source=body))
            continue
        try:
            shaped = shape_or_refuse(shaper, ITEM_PATH, body)
        except GatewayError as exc:
            plans.append(ItemPlan(None, model, refusal=(str(exc), exc.code, exc.status)))
            continue
        forward = shaped.body() if shaped is not None else body
        plans.append(ItemPlan(forward, model, shaped, body))
    return tuple(plans)


def metered_quote(
    pricing: TokenPricing, shaper: RequestShaper, body: bytes, shaped: Shaped
) -> Quote | None:
    """The upto terms of a shaped request (None: its model has no token price): the maximum
    covers its prompt bound and ``shaped.max_output``; the body forwarded asks for the usage
    it is metered by (in ``shaped``, after the unmetered body was taken)."""
    strip = shaper.ask_usage(shaped)
    # Chat's and Anthropic's messages, the Responses API's input items: each a template turn,
    # and so is Anthropic's system prompt or the Responses API's instructions beside them.
    data = shaped.data
    messages = data.get("messages", data.get("input"))
    turns = len(messages) if isinstance(messages, list) else 1
    beside = data.get("system") or data.get("instructions")
    if shaped.api in ("responses", "messages") and beside:
        turns += 1
    return pricing.quote(
        model=shaped.model,
        body=body,
        messages=turns,
        max_output=shaped.max_output,
        forward=shaped.body(),
        strip_usage=strip,
    )
