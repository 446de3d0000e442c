"""An OpenAI- and Anthropic-compatible LLM provider simulator on loopback, for tests and benchmarks.

It answers `POST /v1/chat/completions` (and Azure's
`/openai/deployments/{deployment}/chat/completions`) and `POST /v1/messages` in the real wire
formats, deterministically: `"sim: " + <last user message>`, cut to `max_tokens` words. Tokens are
whitespace-separated words. Latency, per-minute request/token limits and scripted faults
(`[[sim:KEY:STEP,...]]` in a prompt, see `script.py`) make it behave like a provider on a bad day.

In-process: `async with Simulator(SimulatorConfig(latency_s=1)) as sim: ... sim.base_url`.
As a process: `python -m flow_api.testing.simulator --port 0 --latency 1 --rpm 600` prints
`listening on http://127.0.0.1:PORT` once ready and stops on SIGTERM/SIGINT; other processes read
its counters at `GET /_sim/stats`, clear them with `POST /_sim/reset` and change its config with
`POST /_sim/config` (a JSON object of `SimulatorConfig` fields).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import signal
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from flow_api.testing.limits import Charge, RateLimits, SlidingWindow, retry_after_header
from flow_api.testing.script import OK, Script, Step, StepKind
from flow_api.testing.state import SimulatorConfig, SimulatorStats
from flow_api.testing.streaming import stream_events
from flow_api.testing.wire import (
    DEFAULT_COST_TOKENS,
    Answer,
    Api,
    BadRequest,
    Chat,
    answer,
    completion,
    context_error,
    error_body,
    filter_error,
    parse_chat,
)

__all__ = ["Simulator", "SimulatorConfig", "SimulatorStats", "main"]

MAX_OUTPUT_TOKENS = 16_384  # the simulated models' longest completion
RECENT_BODIES = 256  # request bodies kept for tests (bounded: benchmarks send thousands)
MALFORMED_BODY = b'{"id": "sim-malformed", "object": "chat.completion", "choices": [{"index'
_JSON = "application/json"


class Simulator:
    """The simulator server. `start()` binds an ephemeral loopback port unless `port` is given."""

    def __init__(
        self, config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or SimulatorConfig()
        self.host = host
        self.port = port
        self.stats = SimulatorStats()
        self.bodies: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_BODIES)
        """The last chat request bodies as sent (tests assert what reached the provider)."""
        self._script = Script()
        self._window = SlidingWindow()
        self._ids = itertools.count(1)
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The server root, `http://127.0.0.1:PORT` (also the Azure endpoint)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's `base_url`."""
        return f"{self.url}/v1"

    @property
    def anthropic_url(self) -> str:
        """The Anthropic SDK's `base_url` (it appends `/v1/messages` itself)."""
        return self.url

    @property
    def azure_endpoint(self) -> str:
        """The Azure OpenAI `azure_endpoint`."""
        return self.url

    def app(self) -> web.Application:
        """The aiohttp application (routes only; `start()` serves it)."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_get("/_sim/stats", self._get_stats)
        app.router.add_post("/_sim/reset", self._post_reset)
        app.router.add_post("/_sim/config", self._post_config)
        return app

    async def start(self) -> None:
        """Serve on `host:port`; afterwards `port` is the bound port."""
        self._closing.clear()
        # No access log: it costs CPU per request in benchmarks. Cancelling the handler when the
        # client goes away frees hung requests at once.
        runner = web.AppRunner(
            self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=4096)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop serving; hung requests are dropped."""
        self._closing.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def reset(self) -> None:
        """Clear the counters, the scripts' positions and the rate-limit windows."""
        self.stats = SimulatorStats()
        self.bodies.clear()
        self._script.reset()
        self._window.reset()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- routes ---------------------------------------------------------------------------

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, Api.OPENAI, None)

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, Api.OPENAI, request.match_info["deployment"])

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, Api.ANTHROPIC, None)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.to_dict()), content_type=_JSON)

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b'{"ok":true}', content_type=_JSON)

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict) or not all(
                _is_number(value) or (value is None and name in _OPTIONAL)
                for name, value in changes.items()
            ):
                raise TypeError("expected an object of numbers (or null for optional fields)")
            self.config = dataclasses.replace(self.config, **changes)
        except (orjson.JSONDecodeError, TypeError) as exc:
            return web.Response(status=400, text=f"bad config: {exc}")
        return web.Response(body=orjson.dumps(dataclasses.asdict(self.config)), content_type=_JSON)

    # --- one chat request -----------------------------------------------------------------

    async def _chat(self, request: web.Request, api: Api, model: str | None) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.by_api[api.value] = stats.by_api.get(api.value, 0) + 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await self._handle(request, api, model)
        finally:
            stats.in_flight -= 1

    async def _handle(
        self, request: web.Request, api: Api, model: str | None
    ) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
            if isinstance(body, dict):
                self.bodies.append(body)
            chat = parse_chat(api, body, model)
        except (orjson.JSONDecodeError, BadRequest) as exc:
            return self._respond(400, error_body(api, 400, f"simulator: {exc}"), {})
        if chat.max_tokens is not None and chat.max_tokens > MAX_OUTPUT_TOKENS:
            # Checked before the rate limiter, as the providers do: a 400, charged nothing.
            message = (
                f"max_tokens is too large: {chat.max_tokens}. This model supports at most "
                f"{MAX_OUTPUT_TOKENS} completion tokens."
            )
            return self._respond(400, error_body(api, 400, message), {})
        config = self.config
        now = asyncio.get_running_loop().time()
        limits = RateLimits(config.rpm, config.tpm, config.itpm, config.otpm)
        estimate = chat.max_tokens if chat.max_tokens is not None else DEFAULT_COST_TOKENS
        admission = self._window.admit(
            now, chat.prompt_tokens, estimate, limits, chat.api, config.window_s
        )
        headers = admission.headers
        if admission.retry_after is not None:
            self.stats.throttled += 1
            message = f"Rate limit reached for {admission.limit} per min (simulated)"
            return self._rate_limited(chat, headers, admission.retry_after, message)
        step = OK
        if chat.marker is not None:
            key = chat.marker.key
            self.stats.by_key[key] = self.stats.by_key.get(key, 0) + 1
            step = self._script.next(chat.marker)
        if step is OK:
            return await self._complete(request, chat, headers, charge=admission.charge)
        return await self._fault(request, chat, step, headers)

    async def _fault(
        self, request: web.Request, chat: Chat, step: Step, headers: dict[str, str]
    ) -> web.StreamResponse:
        kind = step.kind
        if kind is StepKind.HANG:
            if await self._closed_within(step.seconds or 0.0):
                return self._drop(request)
            return await self._complete(request, chat, headers, delay=False)
        if kind is StepKind.RATE_LIMITED:
            seconds = step.seconds if step.seconds is not None else self.config.retry_after_s
            wait = seconds if step.retry_after_header else None
            return self._rate_limited(chat, headers, wait, "Rate limit reached (simulated)")
        if kind is StepKind.STATUS:
            body = error_body(chat.api, step.status, f"simulated {step.status} error")
            return self._respond(step.status, body, headers)
        if kind is StepKind.CONTEXT:
            return self._respond(400, context_error(chat), headers)
        if kind is StepKind.FILTER:
            return self._respond(400, filter_error(chat), headers)
        if kind is StepKind.MALFORMED:
            return self._respond(200, MALFORMED_BODY, headers)
        return self._drop(request)

    async def _complete(
        self,
        request: web.Request,
        chat: Chat,
        headers: dict[str, str],
        *,
        delay: bool = True,
        charge: Charge | None = None,
    ) -> web.StreamResponse:
        config = self.config
        ans = answer(chat)
        if charge is not None and (chat.api is Api.ANTHROPIC or chat.max_tokens is None):
            # Anthropic corrects its up-front output estimate to the real output; so does the
            # simulator for an OpenAI request that named no max_tokens (see limits.py).
            self._window.settle(charge, ans.tokens)
        tokens_per_s = config.tokens_per_s
        if chat.stream:
            if delay and config.latency_s > 0:
                await asyncio.sleep(config.latency_s)
            return await self._stream(request, chat, ans, headers)
        if delay:
            wait = config.latency_s + (ans.tokens / tokens_per_s if tokens_per_s else 0.0)
            if wait > 0:
                await asyncio.sleep(wait)
        self.stats.prompt_tokens += chat.prompt_tokens
        self.stats.tokens_served += ans.tokens
        if chat.marker is not None:
            answered = self.stats.answered_by_key
            answered[chat.marker.key] = answered.get(chat.marker.key, 0) + 1
        return self._respond(200, completion(chat, ans, f"sim{next(self._ids)}"), headers)

    async def _stream(
        self, request: web.Request, chat: Chat, ans: Answer, headers: dict[str, str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "text/event-stream"
        response.headers["cache-control"] = "no-cache"
        self._count(200)
        await response.prepare(request)
        tokens_per_s = self.config.tokens_per_s
        gap = 1 / tokens_per_s if tokens_per_s else 0.0
        for frame, is_token in stream_events(chat, ans, f"sim{next(self._ids)}"):
            if is_token and gap:
                await asyncio.sleep(gap)
            await response.write(frame)
        await response.write_eof()
        self.stats.prompt_tokens += chat.prompt_tokens
        self.stats.tokens_served += ans.tokens
        return response

    def _rate_limited(
        self, chat: Chat, headers: dict[str, str], wait: float | None, message: str
    ) -> web.Response:
        self.stats.rate_limited += 1
        if wait is not None:
            headers = {
                **headers,
                "retry-after": retry_after_header(wait),
                "retry-after-ms": str(round(wait * 1000)),
            }
        return self._respond(429, error_body(chat.api, 429, message), headers)

    def _respond(self, status: int, body: bytes, headers: dict[str, str]) -> web.Response:
        self._count(status)
        if status >= 400 and self.config.error_note:
            answer = orjson.loads(body)
            answer["error"]["message"] += f" {self.config.error_note}"
            body = orjson.dumps(answer)
        return web.Response(status=status, body=body, headers=headers, content_type=_JSON)

    def _count(self, status: int) -> None:
        by_status = self.stats.by_status
        by_status[status] = by_status.get(status, 0) + 1

    def _drop(self, request: web.Request) -> web.Response:
        """Close the connection without an answer; aiohttp then skips writing the response."""
        self.stats.resets += 1
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)

    async def _closed_within(self, seconds: float) -> bool:
        """Wait `seconds`, or less if the server stops; True if it stopped."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return False
        return True


_OPTIONAL = frozenset({"tokens_per_s", "rpm", "tpm", "itpm", "otpm"})


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- the process entry point --------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[SimulatorConfig, str, int]:
    """The config, host and port from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m flow_api.testing.simulator", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--tokens-per-s", type=float, default=None, help="generation speed")
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute budget")
    parser.add_argument("--tpm", type=int, default=None, help="tokens per minute budget")
    parser.add_argument("--itpm", type=int, default=None, help="Anthropic input tokens/min")
    parser.add_argument("--otpm", type=int, default=None, help="Anthropic output tokens/min")
    parser.add_argument("--retry-after", type=float, default=1.0, help="scripted 429 wait")
    parser.add_argument(
        "--window", type=float, default=60.0, help="seconds the per-minute limits count over (60)"
    )
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        latency_s=args.latency,
        tokens_per_s=args.tokens_per_s,
        rpm=args.rpm,
        tpm=args.tpm,
        itpm=args.itpm,
        otpm=args.otpm,
        retry_after_s=args.retry_after,
        window_s=args.window,
    )
    return config, args.host, args.port


async def serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Run until SIGTERM or SIGINT, announcing the address on stdout once ready."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    simulator = Simulator(config, host=host, port=port)
    await simulator.start()
    try:
        sys.stdout.write(f"listening on {simulator.url}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await simulator.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m flow_api.testing.simulator`: uvloop when installed, to spare CPU."""
    config, host, port = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, host, port))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, host, port))


if __name__ == "__main__":
    main()
