"""LLM providers: one module per family, a registry, and the SDK error mapping."""

from flow_api.providers.base import Provider
from flow_api.providers.registry import ProviderRegistry, build_registry

__all__ = ["Provider", "ProviderRegistry", "build_registry"]
