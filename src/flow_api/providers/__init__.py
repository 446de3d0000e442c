"""LLM providers: one module per family, a registry, and the SDK error mapping.

The names below load on first use (PEP 562), so a model process, which imports only
`providers.local_process` and its llama.cpp helpers, never pays for importing LangChain
(seconds on a busy machine, at every model process start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flow_api.providers.base import Provider
    from flow_api.providers.registry import ProviderRegistry, build_registry

__all__ = ["Provider", "ProviderRegistry", "build_registry"]

_HOMES = {
    "Provider": "flow_api.providers.base",
    "ProviderRegistry": "flow_api.providers.registry",
    "build_registry": "flow_api.providers.registry",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
