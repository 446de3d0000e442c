"""Anthropic's Messages API, through `langchain_anthropic.ChatAnthropic`."""

from __future__ import annotations

import anthropic
from langchain_anthropic import ChatAnthropic
from langchain_core.language_models import BaseChatModel

from flow_api.errors import ProviderError
from flow_api.providers.base import Provider
from flow_api.providers.sdk_errors import map_sdk_error
from flow_api.settings import AnthropicSettings


class AnthropicProvider(Provider):
    name = "anthropic"

    def __init__(self, settings: AnthropicSettings, timeout_s: float) -> None:
        super().__init__(settings.model, settings.models)
        self.settings = settings
        self.timeout_s = timeout_s

    def build(self, model: str) -> BaseChatModel:
        kwargs = {"base_url": self.settings.base_url} if self.settings.base_url else {}
        return ChatAnthropic(
            model_name=model,
            api_key=self.settings.api_key or anthropic_missing_key(),
            max_retries=0,
            default_request_timeout=self.timeout_s,
            max_tokens=self.settings.default_max_tokens,
            **kwargs,
        )

    def map_error(self, exc: BaseException) -> ProviderError | None:
        return map_sdk_error(exc, anthropic)


def anthropic_missing_key() -> str:
    # The registry only builds this provider when a key is set; this keeps mypy and users honest.
    raise ValueError("ANTHROPIC_API_KEY is not set")
