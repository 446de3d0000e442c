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
    r"|\bflow_[A-Za-z0-9_\-]{20,}"  # our own API keys
    r"|\bBearer\s+[A-Za-z0-9._~+/=*\-]+",  # an Authorization header value
    re.IGNORECASE,
)


def redact_secrets(text: str) -> str:
    """`text` with every credential-shaped substring replaced by `[redacted]`."""
    return _CREDENTIALS.sub(REDACTED, text)
