"""`POST /api/ai/generate`: validate, resolve the provider, enqueue, answer 202 at once."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Response

from flow_api.api.auth import AccessDep, SubmitterDep
from flow_api.api.deps import (
    AdmissionDep,
    IdempotencyDep,
    QueueDep,
    RegistryDep,
    SettingsDep,
    StoreDep,
    WebhooksDep,
)
from flow_api.api.responses import errors
from flow_api.api.routes.listing import IndexDep
from flow_api.errors import FlowError, InvalidRequest
from flow_api.jobs import JobData, now_ms
from flow_api.listing import JobIndex
from flow_api.models import GenerateRequest, JobAccepted
from flow_api.observability.metrics import METRICS
from flow_api.observability.spans import SubmitSpanDep
from flow_api.observability.tracing import carrier_of_current
from flow_api.queue.admission import job_bytes
from flow_api.queue.producer import new_job_id
from flow_api.settings import ApiSettings, WorkerSettings

router = APIRouter(prefix="/api/ai", tags=["jobs"])
log = logging.getLogger(__name__)


def check_limits(body: GenerateRequest, limits: ApiSettings, worker: WorkerSettings) -> None:
    if len(body.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"prompt is {len(body.prompt)} characters; the limit is {limits.max_prompt_chars}",
            field="prompt",
        )
    metadata = body.options.metadata
    if metadata is not None and len(orjson.dumps(metadata)) > limits.max_metadata_bytes:
        raise InvalidRequest(
            f"options.metadata is over {limits.max_metadata_bytes} bytes of JSON",
            field="options.metadata",
        )
    timeout_ms, most_ms = body.options.timeout_ms, round(worker.max_job_timeout_s * 1000)
    if timeout_ms is not None and timeout_ms > most_ms:
        raise InvalidRequest(
            f"options.timeoutMs is {timeout_ms}; this service allows at most {most_ms} ms "
            "(FLOW_WORKER_MAX_JOB_TIMEOUT_S)",
            field="options.timeoutMs",
        )


@router.post(
    "/generate",
    status_code=202,
    response_model=JobAccepted,
    response_model_exclude_none=True,
    responses=errors(
        400, 401, 403, 408, 409, 413, 415, 422, 429, 503, s409="`idempotency_key_reused`"
    ),
    summary="Submit a prompt; answers with a job id as soon as the job is durably queued",
)
async def submit(
    body: GenerateRequest,
    queue: QueueDep,
    store: StoreDep,
    registry: RegistryDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
    admission: AdmissionDep,
    principal: SubmitterDep,
    access: AccessDep,
    span: SubmitSpanDep,
    index: IndexDep,
    webhooks: WebhooksDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobAccepted:
    """With an `Idempotency-Key`, the same key and body answer the first request's outcome (the
    202 of the same job, or the same error) and create no second job, for
    `FLOW_API_IDEMPOTENCY_TTL_S`; the same key with another body is a 409.
    A 503 `queue_full` (with `Retry-After`) while the job store has no room for more jobs."""
    check_limits(body, settings.api, settings.worker)
    provider, model = registry.resolve(body.options)
    data = JobData.submitted(
        body,
        provider=provider.name,
        model=model,
        tenant=principal.tenant,
        trace=carrier_of_current(),
    )
    webhook = await webhooks.resolve(principal.tenant, body.options.webhook)  # or 422
    data = data.with_webhook(webhook)
    size = job_bytes((body.prompt, body.options.system))
    await admission.admit(principal.tenant, size)  # or 503 queue_full: Redis keeps room to drain
    job_id, created_ms = new_job_id(), now_ms()  # one creation time: the record's, the index's
    span.set_attribute("flow.job_id", job_id)
    claim = None
    if idempotency_key is not None:
        fingerprint = orjson.dumps(body.wire(), option=orjson.OPT_SORT_KEYS)
        claim, earlier = await idempotency.claim(
            principal.tenant, idempotency_key, fingerprint, job_id
        )
        if earlier is not None:
            replayed = await idempotency.replay(claim, earlier, store.exists)
            return _accepted(response, replayed, replayed=True)
    charge = spend = None
    try:
        charge = await access.reserve_tokens(principal, body, job_id)  # or 429
        spend = await access.reserve_spend(principal, body, data, job_id)  # or 429
        data = data.with_charge(charge, spend)
        if webhook is not None:  # before the job exists: no ending can slip past the outbox
            await webhooks.register(job_id)
        await queue.enqueue(
            data, priority=body.options.priority, job_id=job_id, created_ms=created_ms
        )
    except Exception as error:
        await access.refund(charge, job_id)
        await access.refund_spend(spend, job_id)
        if claim is not None and isinstance(error, FlowError):
            with contextlib.suppress(FlowError):  # unrecorded, the pending claim expires
                await idempotency.failed(claim, error)
        raise
    await _index(index, principal.tenant, job_id, created_ms)
    if claim is not None:
        # The job is queued whatever happens here: a replay finds it by its id even if this
        # record is never written.
        with contextlib.suppress(FlowError):
            await idempotency.accepted(claim)
    METRICS.jobs_submitted.labels(*METRICS.job_labels(provider.name, model, principal.tenant)).inc()
    return _accepted(response, job_id)


async def _index(index: JobIndex, tenant: str, job_id: str, created_ms: int) -> None:
    """List the job (`GET /api/ai/jobs`). It is queued already: if Redis fails here it runs,
    and shows everywhere but in the listing, rather than the client being told 503."""
    try:
        await index.add(tenant, job_id, created_ms)
    except FlowError as exc:
        log.warning("job %s not listed: %s", job_id, exc.code)


def _accepted(response: Response, job_id: str, *, replayed: bool = False) -> JobAccepted:
    response.headers["Location"] = f"/api/ai/status/{job_id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobAccepted(job_id=job_id)
