"""A few request counters rendered as Prometheus text (no labels carry caller data)."""

from __future__ import annotations

from collections import Counter

from paygate.upstream.usage import Usage


class Metrics:
    """Counters for the gateway; route labels come from the closed table, never from the URL."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.envelopes: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.usage_replies = 0

    def observe(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def envelope(self, version: int) -> None:
        self.envelopes[f"v{version}" if version else "plaintext"] += 1

    def retry(self, reason: str) -> None:
        self.retries[reason] += 1

    def usage(self, usage: Usage) -> None:
        """Tokens a reply's model server stated (paygate.upstream.usage)."""
        self.tokens["prompt"] += usage.prompt_tokens
        self.tokens["completion"] += usage.completion_tokens
        self.usage_replies += 1

    def render(self, in_flight: int) -> str:
        """The Prometheus text exposition of every counter."""
        lines = [
            "# HELP paygate_requests_total Requests answered, by route and status.",
            "# TYPE paygate_requests_total counter",
        ]
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f'paygate_requests_total{{route="{route}",status="{status}"}} {count}')
        lines += [
            "# HELP paygate_errors_total Errors answered by the gateway, by code.",
            "# TYPE paygate_errors_total counter",
        ]
        for code, count in sorted(self.errors.items()):
            lines.append(f'paygate_errors_total{{code="{code}"}} {count}')
        lines += [
            "# HELP paygate_request_envelopes_total Forwarded requests by body envelope.",
            "# TYPE paygate_request_envelopes_total counter",
        ]
        for name, count in sorted(self.envelopes.items()):
            lines.append(f'paygate_request_envelopes_total{{envelope="{name}"}} {count}')
        lines += [
            "# HELP paygate_upstream_retries_total Upstream attempts repeated, by reason.",
            "# TYPE paygate_upstream_retries_total counter",
        ]
        for reason, count in sorted(self.retries.items()):
            lines.append(f'paygate_upstream_retries_total{{reason="{reason}"}} {count}')
        lines += [
            "# HELP paygate_tokens_total Tokens the model server reported, by kind.",
            "# TYPE paygate_tokens_total counter",
        ]
        for kind, count in sorted(self.tokens.items()):
            lines.append(f'paygate_tokens_total{{kind="{kind}"}} {count}')
        lines += [
            "# HELP paygate_usage_replies_total Replies that stated their token usage.",
            "# TYPE paygate_usage_replies_total counter",
            f"paygate_usage_replies_total {self.usage_replies}",
            "# HELP paygate_in_flight Upstream requests in flight.",
            "# TYPE paygate_in_flight gauge",
            f"paygate_in_flight {in_flight}",
        ]
        return "\n".join(lines) + "\n"
