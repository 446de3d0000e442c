"""llama.cpp on a GGUF: prompt framing and generation. Runs only inside a model process.

Nothing here imports LangChain, and `llama_cpp` is imported only by `load_model`, which only the
model process (`local_process.py`) calls: native model code never runs in a worker, API or test
process, so a build that crashes on this CPU takes down one model process, not the service.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from flow_api.errors import ContextTooLong, ProviderMisconfigured, ProviderRejected
from flow_api.providers import gguf
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


class TokenStream:
    """Turns the growing token list llama.cpp reports into text pieces, one per new token.

    llama.cpp's stopping criteria see the tokens evaluated so far, so a piece trails the newest
    sampled token by one; the final answer carries the whole text anyway.
    """

    def __init__(self, llm: Any, prompt_length: int, emit: Callable[[str], None]) -> None:
        self.llm = llm
        self.seen = prompt_length
        self.emit = emit
        # A token can end mid-character; the incremental decoder holds the bytes back.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: Sequence[int]) -> None:
        for token in ids[self.seen :]:
            piece = self.decoder.decode(self.llm.detokenize([token]))
            if piece:
                self.emit(piece)
        self.seen = max(self.seen, len(ids))


class AnswerText:
    """Passes on only text the final answer keeps, as it grows.

    The answer is the generated text cut at the first stop sequence, then stripped: so text is
    held back while it could be the start of a stop sequence, and whitespace while it could be
    the answer's end (or its start). What was passed on is always a prefix of the answer.
    """

    def __init__(self, stops: Sequence[str], emit: Callable[[str], None]) -> None:
        self.stops = [s for s in stops if s]
        self.emit = emit
        self.text = ""
        self.sent = 0
        self.ended = False

    def __call__(self, piece: str) -> None:
        if self.ended:
            return
        self.text += piece
        text = self.text.lstrip()
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.ended = text[: min(cuts)], True
        else:
            text = text[: len(text) - self._partial_stop(text)]
        text = text.rstrip()
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)

    def _partial_stop(self, text: str) -> int:
        """The length of the longest end of `text` that begins a stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest


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

    def complete(
        self,
        request: CompletionRequest,
        should_stop: Callable[[], bool],
        on_token: Callable[[str], None] | None = None,
    ) -> Completion:
        """Generate (blocking); asks `should_stop()` and reports text to `on_token` per token."""
        from llama_cpp import StoppingCriteriaList

        tokens, stop = self.prompt(request.turns)
        if len(tokens) >= self.n_ctx:
            raise ContextTooLong(
                f"the prompt is {len(tokens)} tokens; the local model's context is {self.n_ctx} "
                "(FLOW_LOCAL_CONTEXT_SIZE)"
            )
        stops = stop + list(request.stop)
        stream = None
        if on_token is not None:
            stream = TokenStream(self.llm, len(tokens), AnswerText(stops, on_token))

        def stop_here(ids: Any, _logits: Any) -> bool:  # numpy arrays
            if stream is not None:
                stream(ids)
            return should_stop()

        result = self.llm.create_completion(
            prompt=tokens,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            stop=stops,
            # Without a seed each call samples differently; with one it is reproducible.
            seed=request.seed if request.seed is not None else random.randrange(2**31),
            stopping_criteria=StoppingCriteriaList([stop_here]),
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


def system_info() -> str:
    """llama.cpp's compiled-in CPU features (`AVX2 = 1 | AVX512 = 0 | ...`)."""
    import llama_cpp

    info: bytes = llama_cpp.llama_print_system_info()
    return info.decode(errors="replace").strip()
