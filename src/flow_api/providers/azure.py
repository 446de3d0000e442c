"""Azure OpenAI, through `langchain_openai.AzureChatOpenAI`; the model name is the deployment."""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel

from flow_api.providers.openai import OpenAIProvider
from flow_api.providers.openai_inline import InlineAzureChatOpenAI
from flow_api.settings import AzureSettings, OpenAISettings


class AzureProvider(OpenAIProvider):
    name = "azure"

    def __init__(self, settings: AzureSettings, client_timeout_s: float) -> None:
        super().__init__(
            OpenAISettings(model=settings.deployment or "gpt-4o-mini", models=settings.models),
            client_timeout_s,
        )
        self.azure = settings

    def build(self, model: str) -> BaseChatModel:
        return InlineAzureChatOpenAI(
            azure_deployment=model,
            azure_endpoint=self.azure.endpoint,
            api_version=self.azure.api_version,
            api_key=self.azure.api_key,
            max_retries=0,
            timeout=self.client_timeout_s,
            http_async_client=self.http_client(),
        )
