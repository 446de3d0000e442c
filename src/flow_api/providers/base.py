"""What every provider family offers the pipeline: a cached LangChain chat model per model name."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

from langchain_core.language_models import BaseChatModel

from flow_api.errors import ModelNotAllowed, ProviderError
from flow_api.models import GenerateOptions


class Provider(abc.ABC):
    """One provider family. Models are built once per process and reused (building costs ~0.3 ms
    and each holds an HTTP client)."""

    name: ClassVar[str]
    #: Calls this process may make at once (None = no limit). Jobs beyond it wait for a turn
    #: before their attempt's timeout starts, so a queue on a slow local model is not a timeout.
    max_concurrency: int | None = None

    def __init__(self, default_model: str, allowed_models: Sequence[str] = ()) -> None:
        self.default_model = default_model
        self.allowed_models = frozenset(allowed_models)
        self._models: dict[str, BaseChatModel] = {}

    def resolve_model(self, model: str | None) -> str:
        """The model a request will use; raises `ModelNotAllowed` at submit time."""
        chosen = model or self.default_model
        if self.allowed_models and chosen not in self.allowed_models:
            allowed = ", ".join(sorted(self.allowed_models))
            raise ModelNotAllowed(
                f"model {chosen!r} is not allowed for provider {self.name!r}; allowed: {allowed}",
                field="options.model",
            )
        return chosen

    def chat_model(self, model: str) -> BaseChatModel:
        """The shared chat model for `model`, built on first use."""
        built = self._models.get(model)
        if built is None:
            built = self._models[model] = self.build(model)
        return built

    def call_options(self, options: GenerateOptions) -> dict[str, Any]:
        """Per-call keyword arguments for the chat model (bound, not baked into the model)."""
        kwargs: dict[str, Any] = {}
        if options.temperature is not None:
            kwargs["temperature"] = float(options.temperature)
        if options.max_tokens is not None:
            kwargs["max_tokens"] = options.max_tokens
        if options.stop:
            kwargs["stop"] = list(options.stop)
        if options.seed is not None:
            kwargs["seed"] = options.seed
        return kwargs

    def map_error(self, exc: BaseException) -> ProviderError | None:
        """Translate this family's SDK exception into a domain error, or None if unknown."""
        return None

    @abc.abstractmethod
    def build(self, model: str) -> BaseChatModel:
        """Construct the LangChain chat model for `model`."""

    async def warm_up(self) -> None:  # noqa: B027 - optional hook, most providers need none
        """Prepare ahead of the first job (load a model); a no-op for network providers."""

    def health_problem(self) -> str | None:
        """Why this provider cannot serve right now (with the fix), or None; never blocks."""
        return None

    async def self_test(self) -> str | None:
        """`flow-api check`: prove this provider can answer; a problem with the fix, or None."""
        return None

    async def aclose(self) -> None:
        """Release HTTP clients and other resources."""
        self._models.clear()
