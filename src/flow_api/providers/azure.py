"""Azure OpenAI, through `langchain_openai.AzureChatOpenAI`; the model name is the deployment."""

from __future__ import annotations

from typing import Any

import openai
from langchain_core.language_models import BaseChatModel

from flow_api.errors import ProviderError
from flow_api.providers.base import Provider
from flow_api.providers.openai_inline import InlineAzureChatOpenAI
from flow_api.providers.sdk_errors import map_sdk_error
from flow_api.settings import AzureSettings


class AzureProvider(Provider):
    """Calls go through the SDK's aiohttp transport: measured here at about twice the calls/s
    of the default httpx transport at high concurrency."""

    name = "azure"

    def __init__(self, settings: AzureSettings, client_timeout_s: float) -> None:
        super().__init__(settings.deployment or "gpt-4o-mini", settings.models)
        self.azure = settings
        self.client_timeout_s = client_timeout_s  # see `registry.client_timeout_s`
        self._http: openai.DefaultAioHttpClient | None = None

    def http_client(self) -> Any:
        if self._http is None:
            self._http = openai.DefaultAioHttpClient(timeout=self.client_timeout_s)
        return self._http

    def build(self, model: str) -> BaseChatModel:
        return InlineAzureChatOpenAI(
            azure_deployment=model,
            azure_endpoint=self.azure.endpoint,
            api_version=self.azure.api_version,
            api_key=self.azure.api_key,
            max_retries=0,  # the queue retries, with backoff and a record of each attempt
            timeout=self.client_timeout_s,
            http_async_client=self.http_client(),
        )

    async def warm_up(self) -> None:
        """Build the default model at worker start, not in the first job: the first build sets
        up the SDK client and its lazy imports (a few hundred ms of CPU)."""
        self.chat_model(self.default_model)

    def map_error(self, exc: BaseException) -> ProviderError | None:
        return map_sdk_error(exc, openai)

    async def aclose(self) -> None:
        await super().aclose()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
