"""`POST /api/ai/generate`: validate, resolve the provider, enqueue, answer 202 at once."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from flow_api.api.deps import QueueDep, RegistryDep, SettingsDep
from flow_api.errors import InvalidRequest
from flow_api.models import GenerateRequest, JobAccepted

router = APIRouter(prefix="/api/ai", tags=["jobs"])


@router.post(
    "/generate",
    status_code=202,
    response_model=JobAccepted,
    summary="Submit a prompt; answers with a job id as soon as the job is durably queued",
)
async def submit(
    body: GenerateRequest, queue: QueueDep, registry: RegistryDep, settings: SettingsDep
) -> JSONResponse:
    limits = settings.api
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
    provider, model = registry.resolve(body.options)
    job_id = await queue.enqueue(
        {"request": body.wire(), "provider": provider.name, "model": model},
        priority=body.options.priority,
    )
    return JSONResponse(
        JobAccepted(job_id=job_id).wire(),
        status_code=202,
        headers={"Location": f"/api/ai/status/{job_id}"},
    )
