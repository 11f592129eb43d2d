"""URLs that may carry credentials, made safe to log or show.

A hosted RPC URL usually holds its API key in the path (``/v2/<key>``, ``/v3/<key>``,
``/<token>/``), sometimes in the query (``?apikey=``) or the userinfo (``user:pass@``); a
facilitator URL can too. :func:`redact_url` keeps the scheme, host, port and short path words
(``v2``, ``base``) and replaces everything else; :func:`secret_parts` lists the pieces to
scrub from free text (log lines, exception messages).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

MASK = "***"
# A path segment that can be a word of the API (v2, rpc, base-sepolia) rather than a token.
_PLAIN_SEGMENT = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,11}$")
_DIGITS = re.compile(r"\d")


def _tokenish(segment: str) -> bool:
    if not segment:
        return False
    if not _PLAIN_SEGMENT.match(segment):
        return True
    # "v2", "v3", "base-sepolia" stay; a short word mixing many digits looks like a key.
    return len(_DIGITS.findall(segment)) > 2


def redact_url(url: str | None) -> str:
    """``url`` without userinfo, query, fragment or token-like path segments."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return MASK
    if ":" in host:
        host = f"[{host}]"
    userinfo = f"{MASK}@" if "@" in parts.netloc else ""
    path = "/".join(MASK if _tokenish(s) else s for s in parts.path.split("/"))
    query = f"?{MASK}" if parts.query else ""
    return f"{parts.scheme}://{userinfo}{host}{port}{path}{query}"


def secret_parts(urls: Iterable[str | None]) -> tuple[str, ...]:
    """The substrings of ``urls`` that must never appear in a log line, longest first."""
    found: set[str] = set()
    for url in urls:
        if not url:
            continue
        try:
            parts = urlsplit(url)
            username, password = parts.username, parts.password
        except ValueError:
            found.add(url)
            continue
        found.update(p for p in (username, password, parts.query, parts.fragment) if p)
        found.update(s for s in parts.path.split("/") if _tokenish(s))
        # Query values one by one too: a log line may print them decoded or reordered.
        for pair in parts.query.split("&"):
            value = pair.partition("=")[2]
            if len(value) >= 4:
                found.add(value)
    return tuple(sorted((p for p in found if len(p) >= 4), key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
