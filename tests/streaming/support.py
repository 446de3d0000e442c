"""Reading a job's stream as a client does: `httpx-sse` over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from httpx_sse import aconnect_sse
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk

from flow_api.providers import ProviderRegistry
from flow_api.providers.fake import EchoChatModel, FakeProvider


@dataclass(frozen=True)
class Event:
    id: str
    event: str
    data: dict[str, Any]


async def read_stream(
    client: httpx.AsyncClient,
    job_id: str,
    *,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    headers: dict[str, str] | None = None,
    read_timeout_s: float = 30,
) -> list[Event]:
    """The job's events until the server closes the stream (or `stop_after` of them, then
    hang up, as a client that loses its connection)."""
    sent = dict(headers or {})
    if last_event_id is not None:
        sent["Last-Event-ID"] = last_event_id
    events: list[Event] = []
    timeout = httpx.Timeout(10, read=read_timeout_s)  # events may be a keep-alive apart
    path = f"/api/ai/stream/{job_id}"
    async with aconnect_sse(client, "GET", path, headers=sent, timeout=timeout) as source:
        assert source.response.status_code == 200, await source.response.aread()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for sse in source.aiter_sse():
            events.append(Event(sse.id, sse.event, orjson.loads(sse.data)))
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def streamed_text(events: list[Event]) -> str:
    """The answer as a client rebuilds it: the tokens of the last attempt that started."""
    text: list[str] = []
    for event in events:
        if event.event == "status" and event.data["status"] == "active":
            text = []  # a new attempt: an earlier one's partial text is discarded
        elif event.event == "token":
            text.append(event.data["text"])
    return "".join(text)


class PacedEchoModel(EchoChatModel):
    """The echo model, its words `gap_s` apart when streamed (as a provider produces them)."""

    gap_s: float = 0.02

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in super()._astream(messages, stop, run_manager, **kwargs):
            await asyncio.sleep(self.gap_s)
            yield chunk


class PacedProvider(FakeProvider):
    def build(self, model: str) -> BaseChatModel:
        return PacedEchoModel(model_name=model)


def paced() -> ProviderRegistry:
    return ProviderRegistry([PacedProvider()])
