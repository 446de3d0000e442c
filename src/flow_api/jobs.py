"""`JobData`: the one typed envelope that crosses the queue, with the rules that belong to a job.

The API writes it (`JobData.submitted`), the queue stores it as the BullMQ job's data, and the
worker, the quota meter, the rate budget, the history views and the benchmarks read it back
(`JobData.parse`). Its wire names (`request`, `provider`, `model`, `tenant`, `startBy`,
`tokenCharge`) are those jobs have always been stored with, so jobs queued before this module
existed are read the same way.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flow_api.errors import InvalidRequest
from flow_api.models import GenerateRequest, WebhookOptions

DEFAULT_TENANT = "default"
"""The tenant of every request while authentication is off, and of jobs stored before tenants
existed: turning auth on later, keys of this tenant still see those jobs."""

CHARS_PER_TOKEN = 4
"""Characters a token, for estimates made before a model has told us better."""


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch: the unit of every time stored with a job."""
    return int(time.time() * 1000)


def prompt_chars(request: GenerateRequest) -> int:
    """Characters of text a request sends: its prompt and its system message."""
    return len(request.prompt) + len(request.options.system or "")


def estimate_tokens(
    request: GenerateRequest,
    default_completion: int,
    tokens_per_char: float = 1 / CHARS_PER_TOKEN,
) -> int:
    """The one token estimate: what a request may spend before the provider says what it did.

    Prompt and system text at `tokens_per_char` (1/4 unless a model's answers taught a worker
    better), plus the request's `maxTokens`, or `default_completion` when it sets none.
    """
    completion = request.options.max_tokens or default_completion
    return math.ceil(prompt_chars(request) * tokens_per_char) + completion


MESSAGE_OVERHEAD_TOKENS = 16
"""Tokens a chat request may add around its text (role markers, the reply's priming, a
template's framing such as the local model's `Question: ... Answer:`): OpenAI's format adds
about 4 a message and 3 for the reply; 16 covers a system and a user message."""


def quota_bound(request: GenerateRequest, default_completion: int) -> int:
    """The most tokens a request can spend: what a key's quota reserves at submit.

    Prompt and system text count one token per UTF-8 byte, plus `MESSAGE_OVERHEAD_TOKENS`,
    plus the completion cap (`maxTokens`, or `default_completion`, which the worker then passes
    to the provider as the call's limit). A byte per token is a true upper bound for every
    tokenizer the providers use (byte-level BPE such as OpenAI's and Anthropic's, and
    SentencePiece with byte fallback such as Gemma's: a token never stands for less than one
    byte). It is the bound used offline too: tiktoken's exact counts need its BPE files, which
    it downloads on first use. For English text it reserves about four times the real prompt
    tokens; the settle gives the difference back as soon as the job ends.
    """
    text = len(request.prompt.encode("utf-8", "surrogatepass"))
    system = request.options.system
    if system:
        text += len(system.encode("utf-8", "surrogatepass"))
    completion = request.options.max_tokens or default_completion
    return text + MESSAGE_OVERHEAD_TOKENS + completion


class Charge(BaseModel):
    """Tokens reserved for one job in one key's quota window, settled by the worker."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    window: int
    tokens: int
    completion: int | None = None
    """The completion tokens included in `tokens`: the worker holds a request without its own
    `maxTokens` to this many (None for reservations made before this existed)."""


class JobData(BaseModel):
    """What one job carries through the queue. Frozen: nobody edits a queued job's data."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    request: GenerateRequest
    provider: str | None = None
    model: str | None = None
    tenant: str = DEFAULT_TENANT
    start_by_ms: int | None = Field(default=None, alias="startBy")
    """Wall-clock deadline for the first attempt to start (`startWithinMs` after submit)."""
    charge: Charge | None = Field(default=None, alias="tokenCharge")
    """The key's token reservation the worker settles with the real usage; None without one."""
    trimmed_chars: int | None = Field(default=None, alias="trimmedChars")
    """Set once the job completed and its prompt was cut (`trimmed`): the characters of prompt
    and system text it was submitted with."""
    webhook: WebhookOptions | None = None
    """Where the job's ending is sent: `options.webhook`, else its tenant's default at submit."""

    @classmethod
    def submitted(
        cls,
        request: GenerateRequest,
        *,
        provider: str,
        model: str,
        tenant: str,
        charge: Charge | None = None,
        now: int | None = None,
    ) -> JobData:
        """The envelope of a job accepted now (`now`, in ms, for tests)."""
        within = request.options.start_within_ms
        start_by = None if within is None else (now_ms() if now is None else now) + within
        return cls(
            request=request,
            provider=provider,
            model=model,
            tenant=tenant,
            start_by_ms=start_by,
            charge=charge,
        )

    @classmethod
    def parse(cls, raw: Any) -> JobData:
        """Read stored job data; raises `InvalidRequest` when it is not a job of ours."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise InvalidRequest(f"the stored job is not a valid request: {exc}") from exc

    def with_charge(self, charge: Charge | None) -> JobData:
        return self.model_copy(update={"charge": charge})

    def with_webhook(self, webhook: WebhookOptions | None) -> JobData:
        return self.model_copy(update={"webhook": webhook})

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict stored as the BullMQ job's data."""
        data: dict[str, Any] = {"request": self.request.wire(), "tenant": self.tenant}
        if self.provider is not None:
            data["provider"] = self.provider
        if self.model is not None:
            data["model"] = self.model
        if self.start_by_ms is not None:
            data["startBy"] = self.start_by_ms
        if self.charge is not None:
            data["tokenCharge"] = self.charge.model_dump(exclude_none=True)
        if self.trimmed_chars is not None:
            data["trimmedChars"] = self.trimmed_chars
        if self.webhook is not None:
            data["webhook"] = self.webhook.wire()
        return data

    def trimmed(self, keep_chars: int) -> JobData:
        """This envelope with prompt and system text cut to `keep_chars` each, for a completed
        job: its answer is stored, so Redis need not keep a large prompt for its retention.
        Returns `self` when nothing is longer."""
        options = self.request.options
        system = options.system or ""
        if len(self.request.prompt) <= keep_chars and len(system) <= keep_chars:
            return self
        cut_options = options.model_copy(update={"system": system[:keep_chars] or None})
        request = self.request.model_copy(
            update={"prompt": self.request.prompt[:keep_chars], "options": cut_options}
        )
        return self.model_copy(
            update={"request": request, "trimmed_chars": prompt_chars(self.request)}
        )

    def expired(self, now: int, *, started_before: bool = False) -> bool:
        """True when the job missed its start deadline: no attempt started before it, and it
        has passed. A job that started once is never expired (a retry is not a late start)."""
        return not started_before and self.start_by_ms is not None and now > self.start_by_ms

    def estimate_tokens(
        self, default_completion: int, tokens_per_char: float = 1 / CHARS_PER_TOKEN
    ) -> int:
        """`estimate_tokens` for this job's request."""
        return estimate_tokens(self.request, default_completion, tokens_per_char)

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The client's own `options.metadata`, echoed on every view of the job."""
        return self.request.options.metadata
