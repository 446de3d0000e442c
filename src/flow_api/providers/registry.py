"""Which providers this process can use, built from settings once; the only place they are made."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flow_api.errors import ProviderNotConfigured
from flow_api.models import GenerateOptions
from flow_api.providers.base import Provider
from flow_api.settings import Settings, WorkerSettings

log = logging.getLogger(__name__)

PROVIDER_ORDER = ("openai", "azure", "anthropic", "local", "fake")

CLIENT_TIMEOUT_MARGIN_S = 5.0


def client_timeout_s(worker: WorkerSettings) -> float:
    """The SDK clients' own timeout: longer than any attempt may last, so the attempt's limit
    (`timeoutMs`, else `FLOW_WORKER_JOB_TIMEOUT_S`, enforced around the call by the worker) is
    the one that ends a call. Clients built with the worker default cut longer `timeoutMs`
    calls short, and the retry made a second paid call."""
    return max(worker.job_timeout_s, worker.max_job_timeout_s) + CLIENT_TIMEOUT_MARGIN_S


class ProviderRegistry:
    """The configured providers, by name, and the default."""

    def __init__(self, providers: Iterable[Provider], default: str | None = None) -> None:
        self.providers = {p.name: p for p in providers}
        configured = [name for name in PROVIDER_ORDER if name in self.providers]
        if default is not None and default not in self.providers:
            raise ValueError(
                f"FLOW_PROVIDER_DEFAULT={default!r} is not configured "
                f"(configured: {', '.join(configured) or 'none'})"
            )
        self.default = default or (configured[0] if configured else None)

    @property
    def names(self) -> list[str]:
        return sorted(self.providers)

    def get(self, name: str | None) -> Provider:
        chosen = name or self.default
        provider = self.providers.get(chosen) if chosen else None
        if provider is None:
            configured = ", ".join(self.names) or "none"
            raise ProviderNotConfigured(
                f"provider {chosen!r} is not configured on this service (configured: {configured})"
                if chosen
                else "no provider is configured on this service",
                field="options.provider",
            )
        return provider

    def resolve(self, options: GenerateOptions) -> tuple[Provider, str]:
        """The provider and model a request will run on; raises a 422 error at submit."""
        provider = self.get(options.provider)
        return provider, provider.resolve_model(options.model)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()


def build_registry(settings: Settings) -> ProviderRegistry:
    """Every provider whose configuration is present, and the fake one when enabled."""
    timeout = client_timeout_s(settings.worker)
    providers: list[Provider] = []
    if settings.openai.api_key is not None or settings.openai.base_url:
        from flow_api.providers.openai import OpenAIProvider

        providers.append(OpenAIProvider(settings.openai, timeout))
    if settings.azure.api_key is not None and settings.azure.endpoint:
        from flow_api.providers.azure import AzureProvider

        providers.append(AzureProvider(settings.azure, timeout))
    if settings.anthropic.api_key is not None:
        from flow_api.providers.anthropic import AnthropicProvider

        providers.append(AnthropicProvider(settings.anthropic, timeout))
    local = local_provider(settings)
    if local is not None:
        providers.append(local)
    if settings.provider.fake_enabled:
        from flow_api.providers.fake import FakeProvider

        providers.append(FakeProvider())
    return ProviderRegistry(providers, settings.provider.default)


def local_provider(settings: Settings) -> Provider | None:
    """The llama.cpp provider when enabled (or installed, with `enabled` unset); see local.py."""
    if settings.local.enabled is False:
        return None
    try:
        from flow_api.providers.local import LocalProvider
    except ImportError:
        if settings.local.enabled:
            raise
        return None
    if settings.local.enabled is None and not LocalProvider.available(settings.local):
        return None
    provider: Provider = LocalProvider(settings.local)
    return provider
