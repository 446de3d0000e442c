"""Scrub credential-shaped text from messages that leave the process (job errors, answers).

Providers sometimes quote the key they refused (OpenAI's 401 says "Incorrect API key provided:
sk-ab***...wxyz"); such text is stored on the job and shown to its submitter, who is not the
operator who owns the key.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

_CREDENTIALS = re.compile(
    r"\b(?:sk|rk|pk)-[A-Za-z0-9_*.\-]{6,}"  # OpenAI and Anthropic (sk-ant-...) keys, masked too
    r"|(?-i:\bflow_)[A-Za-z0-9_\-]{20,}"  # our own API keys (not FLOW_ setting names)
    r"|\bBearer\s+[A-Za-z0-9._~+/=*\-]+",  # an Authorization header value
    re.IGNORECASE,
)
# `scheme://user:password@host`: the password (a gateway or proxy URL quoted in an error).
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")
# A credential as a query parameter or header-like `name=value` / `name: value`
# (`?api-key=...`, `&access_token=...`, `api-key: ...`, `password=...`).
_NAMED_SECRET = re.compile(
    r"(\b(?:api[-_]?key|access[-_]?token|token|secret|password|passwd|pwd|sig|signature)"
    r"[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;}]+",
    re.IGNORECASE,
)


def redact_secrets(text: str) -> str:
    """`text` with every credential-shaped substring replaced by `[redacted]`: API keys, bearer
    tokens, URL passwords and named credentials (`api-key=...`, `password: ...`)."""
    text = _CREDENTIALS.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    return _NAMED_SECRET.sub(rf"\1{REDACTED}", text)


_SECRET_PARAMS = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)
_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact_url(url: str) -> str:
    """`url` with its password, and query parameters that look like credentials
    (`?password=...`, `&token=...`), replaced by `[redacted]`; safe to print."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
        query = urlencode(
            [
                (name, REDACTED if _SECRET_PARAMS.search(name) else value)
                for name, value in parse_qsl(parts.query, keep_blank_values=True)
            ],
            safe="[]",
        )
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:  # not a URL we can parse: scrub what looks like user:password@
        return _USERINFO.sub(rf"\1{REDACTED}@", url)
