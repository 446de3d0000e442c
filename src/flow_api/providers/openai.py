"""OpenAI and any OpenAI-compatible endpoint, through `langchain_openai.ChatOpenAI`."""

from __future__ import annotations

from typing import Any

import openai
from langchain_core.language_models import BaseChatModel

from flow_api.errors import ProviderError
from flow_api.providers.base import Provider
from flow_api.providers.openai_inline import InlineChatOpenAI
from flow_api.providers.sdk_errors import map_sdk_error
from flow_api.settings import OpenAISettings


class OpenAIProvider(Provider):
    """Calls go through the SDK's aiohttp transport: measured here at about twice the calls/s
    of the default httpx transport at high concurrency (see the README, Performance)."""

    name = "openai"

    def __init__(self, settings: OpenAISettings, client_timeout_s: float) -> None:
        super().__init__(settings.model, settings.models)
        self.settings = settings
        self.client_timeout_s = client_timeout_s  # see `registry.client_timeout_s`
        self._http: openai.DefaultAioHttpClient | None = None

    def http_client(self) -> Any:
        if self._http is None:
            self._http = openai.DefaultAioHttpClient(timeout=self.client_timeout_s)
        return self._http

    def build(self, model: str) -> BaseChatModel:
        key = self.settings.api_key
        return InlineChatOpenAI(
            model=model,
            api_key=key if key is not None else None,
            base_url=self.settings.base_url,
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
