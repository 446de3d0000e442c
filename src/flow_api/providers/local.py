"""The `local` provider: llama.cpp on a GGUF model, in supervised model processes.

`LocalProvider` builds one `LocalChatModel` (a LangChain chat model, so options, usage and finish
reasons behave as with the cloud providers) over a `ModelPool` (`local_supervisor.py`):
`LocalSettings.instances` model processes, each serving one call at a time, started on first use
or at worker start. Native model code never runs in this process: a crash of llama.cpp fails the
attempt it was running with the retryable `local_model_crashed`, and the pool starts a new model
process; if model processes keep dying before they can answer, the provider reports itself
unavailable (`health()`, `/readyz`, `flow-api check`) with the command that fixes the build.
Cancelling the awaiting coroutine stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib.util import find_spec
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from flow_api.errors import LocalModelUnavailable, ProviderError
from flow_api.providers import gguf
from flow_api.providers.base import Provider
from flow_api.providers.local_model import (
    ANSWER,
    PLAIN_STOP,
    QUESTION,
    Completion,
    CompletionRequest,
    LoadedModel,
    Turn,
    plain_prompt,
    thread_count,
)
from flow_api.providers.local_supervisor import Health, ModelPool
from flow_api.settings import LocalSettings

__all__ = [
    "ANSWER",
    "PLAIN_STOP",
    "QUESTION",
    "Completion",
    "CompletionRequest",
    "LoadedModel",
    "LocalChatModel",
    "LocalProvider",
    "ModelPool",
    "Turn",
    "plain_prompt",
    "thread_count",
]

log = logging.getLogger(__name__)

# How long `flow-api check` waits for a model process to load and pass its self-test.
CHECK_TIMEOUT_S = 120.0


_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def to_turn(message: BaseMessage) -> Turn:
    """A LangChain message as a chat-template turn."""
    role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type, "user")
    return Turn(role, message.text)


class LocalChatModel(BaseChatModel):
    """A LangChain chat model over a `ModelPool`; per-call `temperature`, `max_tokens`, `stop`,
    `seed` as keyword arguments (or `.bind()`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pool: ModelPool = Field(exclude=True, repr=False)
    model_name: str
    temperature: float = 0.8
    max_tokens: int = 256

    @property
    def _llm_type(self) -> str:
        return "flow-llama-cpp"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> CompletionRequest:
        temperature = kwargs.get("temperature")
        max_tokens = kwargs.get("max_tokens")
        seed = kwargs.get("seed")
        return CompletionRequest(
            turns=tuple(to_turn(m) for m in messages),
            max_tokens=int(max_tokens) if max_tokens is not None else self.max_tokens,
            temperature=float(temperature) if temperature is not None else self.temperature,
            stop=tuple(stop or ()),
            seed=int(seed) if seed is not None else None,
        )

    def _result(self, completion: Completion) -> ChatResult:
        usage = UsageMetadata(
            input_tokens=completion.prompt_tokens,
            output_tokens=completion.completion_tokens,
            total_tokens=completion.prompt_tokens + completion.completion_tokens,
        )
        message = AIMessage(
            content=completion.text,
            usage_metadata=usage,
            response_metadata={
                "finish_reason": completion.finish_reason,
                "model_name": self.model_name,
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        return self._result(self.pool.complete_blocking(request))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        return self._result(await self.pool.complete(request))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """The model process's text as it generates it (its `token` messages, relayed by the
        supervisor thread), then a last chunk with what the answer adds (the text the model
        process held back) and its usage and finish reason."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def relay(text: str) -> None:  # on the supervisor thread
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        request = self._request(messages, stop, kwargs)
        call = asyncio.ensure_future(self.pool.complete(request, relay))
        call.add_done_callback(lambda _: pieces.put_nowait(None))
        sent = ""
        try:
            while (piece := await pieces.get()) is not None:
                sent += piece
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager is not None:
                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            completion = await call
        finally:
            call.cancel()  # a cancelled caller stops the generation (`ModelPool.complete`)
        if not completion.text.startswith(sent):  # the model process's holdback failed
            log.warning("local model: streamed text is not a prefix of the answer")
        rest = completion.text[len(sent) :] if completion.text.startswith(sent) else ""
        final = self._result(completion).generations[0].message
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content=rest,
                usage_metadata=getattr(final, "usage_metadata", None),
                response_metadata=final.response_metadata,
                chunk_position="last",
            )
        )


class LocalProvider(Provider):
    """llama.cpp on a GGUF: the bundled Gemma 3 270M, or `FLOW_LOCAL_MODEL_PATH`."""

    name = "local"

    def __init__(self, settings: LocalSettings) -> None:
        default = gguf.model_name(settings)
        super().__init__(default, [default])
        self.settings = settings
        self.max_concurrency = settings.instances
        self._pool: ModelPool | None = None

    @classmethod
    def available(cls, settings: LocalSettings | None = None) -> bool:
        """llama.cpp is installed, and a model is too (bundled package, or a configured path).

        Looks packages up without importing them: llama_cpp loads a native library.
        """
        if find_spec("llama_cpp") is None:
            return False
        if settings is not None and settings.model_path is not None:
            return True
        return find_spec(gguf.BUNDLED_PACKAGE) is not None

    def pool(self) -> ModelPool:
        """The shared model pool, created on first use (no process starts until a call)."""
        if self._pool is None:
            self._pool = ModelPool(self.settings)
        return self._pool

    def resolve_model(self, model: str | None) -> str:
        """As for every provider, and refused (503) while the model processes cannot start."""
        health = self.health()
        if health.state == "unavailable":
            raise LocalModelUnavailable(str(health.message))
        return super().resolve_model(model)

    def health(self) -> Health:
        """The model processes' state in this process (idle until a worker starts them)."""
        return self._pool.health() if self._pool is not None else Health("idle")

    def health_problem(self) -> str | None:
        health = self.health()
        return health.message if health.state == "unavailable" else None

    async def self_test(self) -> str | None:
        """Start one model process apart from the pool, wait for its self-test, stop it."""
        pool = ModelPool(self.settings.model_copy(update={"instances": 1}), start_failure_limit=1)
        try:
            await asyncio.to_thread(pool.wait_ready, CHECK_TIMEOUT_S)
        except ProviderError as exc:
            return exc.message
        finally:
            await pool.aclose()
        return None

    def build(self, model: str) -> BaseChatModel:
        return LocalChatModel(
            pool=self.pool(), model_name=model, max_tokens=self.settings.default_max_tokens
        )

    async def warm_up(self) -> None:
        """Start the model processes now rather than on the first job."""
        await self.pool().warm_up()

    async def aclose(self) -> None:
        await super().aclose()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()
