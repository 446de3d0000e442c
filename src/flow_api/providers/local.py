"""The `local` provider: llama.cpp running a GGUF model inside the worker process.

`LocalProvider` builds one `LocalChatModel` (a LangChain chat model, so options, usage and finish
reasons behave as with the cloud providers) over a `ModelPool`: `LocalSettings.instances` llama.cpp
contexts, loaded lazily in a thread on first use, each used by one call at a time. Inference runs
on the pool's own threads, never on the event loop; concurrent calls queue for a free instance.
Cancelling the awaiting coroutine stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, NamedTuple

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field

from flow_api.errors import (
    ContextTooLong,
    ProviderMisconfigured,
    ProviderRejected,
    ProviderUnavailable,
)
from flow_api.providers import gguf
from flow_api.providers.base import Provider
from flow_api.settings import LocalSettings

log = logging.getLogger(__name__)

# Base models (the bundled Gemma 3 270M) have no chat template: `create_chat_completion` answered
# empty and Gemma's turn markers made it loop, while this plain framing answered sensibly.
QUESTION, ANSWER = "Question:", "Answer:"
PLAIN_STOP = ("\nQuestion:",)


class Turn(NamedTuple):
    """One message of a conversation, in chat-template roles (system, user, assistant)."""

    role: str
    text: str


@dataclass(frozen=True)
class CompletionRequest:
    """What one call asks of the model."""

    turns: tuple[Turn, ...]
    max_tokens: int
    temperature: float
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """What the model answered, with exact token counts from llama.cpp."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def plain_prompt(turns: Sequence[Turn]) -> str:
    """Frame a conversation as `Question: ...\\nAnswer:`; system text is a preamble line."""
    parts: list[str] = []
    for turn in turns:
        if turn.role == "system":
            parts.append(f"{turn.text}\n\n")
        elif turn.role == "assistant":
            parts.append(f"{ANSWER} {turn.text}\n\n")
        else:
            parts.append(f"{QUESTION} {turn.text}\n")
    return "".join(parts) + ANSWER


class LoadedModel:
    """One llama.cpp context, and how prompts are framed for it (its own template, or plain)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.n_ctx: int = llm.n_ctx()
        self.formatter: Any = None
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos, bos = llm.token_eos(), llm.token_bos()
            self.formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(eos),
                bos_token=self._token_text(bos),
                stop_token_ids=[eos],
            )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text: bytes = self.llm.detokenize([token], special=True)
        return text.decode("utf-8", errors="ignore")

    def prompt(self, turns: Sequence[Turn]) -> tuple[list[int], list[str]]:
        """Prompt tokens and the stop sequences the framing needs."""
        if self.formatter is None:
            # special=False: user text must not be able to inject control tokens.
            tokens = self.llm.tokenize(plain_prompt(turns).encode(), add_bos=True, special=False)
            return list(tokens), list(PLAIN_STOP)
        messages = [{"role": t.role, "content": t.text} for t in turns]
        try:
            framed = self.formatter(messages=messages)
        except Exception as exc:  # a template's raise_exception(), e.g. roles out of order
            raise ProviderRejected(
                f"the model's chat template refused the messages: {exc}"
            ) from exc
        tokens = self.llm.tokenize(
            framed.prompt.encode(), add_bos=not framed.added_special, special=True
        )
        stop = framed.stop if isinstance(framed.stop, list) else [framed.stop or ""]
        return list(tokens), [s for s in stop if s]

    def complete(self, request: CompletionRequest, should_stop: Callable[[], bool]) -> Completion:
        """Generate (blocking); asks `should_stop()` between tokens."""
        from llama_cpp import StoppingCriteriaList

        tokens, stop = self.prompt(request.turns)
        if len(tokens) >= self.n_ctx:
            raise ContextTooLong(
                f"the prompt is {len(tokens)} tokens; the local model's context is {self.n_ctx} "
                "(FLOW_LOCAL_CONTEXT_SIZE)"
            )
        result = self.llm.create_completion(
            prompt=tokens,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            stop=stop + list(request.stop),
            # Without a seed each call samples differently; with one it is reproducible.
            seed=request.seed if request.seed is not None else random.randrange(2**31),
            stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: should_stop()]),
        )
        choice, usage = result["choices"][0], result["usage"]
        return Completion(
            text=str(choice["text"]).strip(),
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            finish_reason=str(choice["finish_reason"] or "stop"),
        )

    def close(self) -> None:
        self.llm.close()


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, as containers set it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(settings: LocalSettings) -> int:
    """llama.cpp threads per instance: `settings.threads`, else half the cores, shared.

    Half (llama-cpp-python's own default) because llama.cpp's threads spin at barriers: when
    the event loop or other processes take a core, they stall. Measured on a busy 2-core box:
    decoding with 2 threads 3-25 tokens/s, with 1 thread 27-38; a 20-token prompt took 0.7-3.9 s
    to evaluate with 2 threads, 0.2 s with 1.
    """
    return settings.threads or max(1, cpu_count() // 2 // settings.instances)


def load_model(settings: LocalSettings) -> LoadedModel:
    """Resolve, check and load the GGUF (blocking: seconds on the first run)."""
    import llama_cpp

    path = gguf.resolve_model_file(settings)
    threads = thread_count(settings)
    started = time.perf_counter()
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=settings.context_size,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    except ValueError as exc:  # llama.cpp's "Failed to load model from file"
        raise ProviderMisconfigured(f"llama.cpp could not load {str(path)!r}: {exc}") from exc
    model = LoadedModel(llm)
    log.info(
        "loaded local model %s in %.1f s (%d threads, context %d, %s prompts)",
        path.name,
        time.perf_counter() - started,
        threads,
        model.n_ctx,
        "chat-template" if model.formatter is not None else "plain",
    )
    return model


class ModelPool:
    """`settings.instances` loaded models, each used by one call at a time.

    The executor has exactly one thread per instance, so its work queue is where concurrent
    calls wait, and a thread always finds an instance free. No side effects until first use.
    """

    def __init__(self, settings: LocalSettings) -> None:
        self.settings = settings
        self._idle: queue.SimpleQueue[LoadedModel] = queue.SimpleQueue()
        self._loaded = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._executor: ThreadPoolExecutor | None = None

    def _pool_executor(self) -> ThreadPoolExecutor:
        if self._closing.is_set():
            raise ProviderUnavailable("the local model is shut down")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.settings.instances, thread_name_prefix="flow-llama"
            )
        return self._executor

    async def complete(self, request: CompletionRequest) -> Completion:
        """Run `request` on a free instance; cancelling the caller stops the generation."""
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool_executor(), self._run, request, cancel)
        try:
            return await future
        except asyncio.CancelledError:
            # A queued call is dropped by the executor; a running one ends at its next token.
            cancel.set()
            raise

    def complete_blocking(self, request: CompletionRequest) -> Completion:
        """`complete` for synchronous callers (LangChain's `invoke`)."""
        return self._pool_executor().submit(self._run, request, threading.Event()).result()

    async def warm_up(self) -> None:
        """Load one instance now (for example at worker start) instead of on the first job."""
        await asyncio.get_running_loop().run_in_executor(self._pool_executor(), self._warm)

    def _warm(self) -> None:
        self._idle.put(self._checkout())

    def _run(self, request: CompletionRequest, cancel: threading.Event) -> Completion:
        model = self._checkout()
        try:
            started = time.perf_counter()
            completion = model.complete(request, lambda: cancel.is_set() or self._closing.is_set())
        finally:
            self._idle.put(model)
        if self._closing.is_set():
            raise ProviderUnavailable("the local model was shut down during generation")
        log.debug(
            "local completion: %d prompt + %d completion tokens in %.2f s (%s)",
            completion.prompt_tokens,
            completion.completion_tokens,
            time.perf_counter() - started,
            completion.finish_reason,
        )
        return completion

    def _checkout(self) -> LoadedModel:
        if self._closing.is_set():
            raise ProviderUnavailable("the local model is shut down")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            load = self._loaded < self.settings.instances
            if load:
                self._loaded += 1
        if not load:
            return self._idle.get()
        try:
            return load_model(self.settings)
        except BaseException:
            with self._lock:
                self._loaded -= 1
            raise

    async def aclose(self) -> None:
        """Stop running generations, wait for the threads, free the models."""
        self._closing.set()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break


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
        """The shared model pool, created on first use."""
        if self._pool is None:
            self._pool = ModelPool(self.settings)
        return self._pool

    def build(self, model: str) -> BaseChatModel:
        return LocalChatModel(
            pool=self.pool(), model_name=model, max_tokens=self.settings.default_max_tokens
        )

    async def warm_up(self) -> None:
        """Load the model now rather than on the first job."""
        await self.pool().warm_up()

    async def aclose(self) -> None:
        await super().aclose()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()
