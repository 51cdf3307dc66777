"""URLs as a run stores and logs them: without credentials (user:password@, signed query strings)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

SECRET_PARAMS = re.compile(r"(?i)^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|"
                           r"signature|sig|token|access_token|id_token|auth|key|api_key|apikey|password|"
                           r"passwd|secret|client_secret)$")
REDACTED = "REDACTED"


def redact_url(url: str) -> str:
    """`url` without credentials: user:password@ and the values of signature / token query parameters."""
    if not isinstance(url, str) or not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_PARAMS.match(name) for name, _ in pairs):
            query = "&".join(f"{quote(name, safe='')}={REDACTED if SECRET_PARAMS.match(name) else quote(value, safe='')}"
                             for name, value in pairs)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
