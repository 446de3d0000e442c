"""OpenAI and any OpenAI-compatible endpoint, through our own LangChain chat model on aiohttp."""

from __future__ import annotations

import aiohttp
from langchain_core.language_models import BaseChatModel

from flow_api.errors import ProviderError
from flow_api.providers.base import Provider
from flow_api.providers.openai_compatible import OpenAICompatibleChat
from flow_api.providers.sdk_errors import map_http_error
from flow_api.settings import OpenAISettings

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIProvider(Provider):
    """Calls go through `OpenAICompatibleChat` (a `BaseChatModel`) on one pooled aiohttp session:
    measured at under half the worker CPU per call of `ChatOpenAI` on the SDK's aiohttp
    transport (README, Performance)."""

    name = "openai"

    def __init__(self, settings: OpenAISettings, client_timeout_s: float) -> None:
        super().__init__(settings.model, settings.models)
        self.settings = settings
        self.client_timeout_s = client_timeout_s  # see `registry.client_timeout_s`
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The shared session, opened on first use (on the running event loop)."""
        if self._session is None or self._session.closed:
            # No connection cap of our own (aiohttp's default is 100): the worker's concurrency
            # already bounds the calls in flight, and a cap below it would queue calls inside
            # their attempt's timeout.
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.client_timeout_s),
                raise_for_status=False,
            )
        return self._session

    def build(self, model: str) -> BaseChatModel:
        return OpenAICompatibleChat(
            model_name=model,
            base_url=self.settings.base_url or DEFAULT_BASE_URL,
            api_key=self.settings.api_key,
            session=self.session,
        )

    async def warm_up(self) -> None:
        """Build the default model at worker start, not in the first job."""
        self.chat_model(self.default_model)

    def map_error(self, exc: BaseException) -> ProviderError | None:
        return map_http_error(exc)

    async def aclose(self) -> None:
        await super().aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None
