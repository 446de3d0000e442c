"""A batch's output and error files, in OpenAI's line format, assembled as a stream.

A line that completed goes to the output file:
`{"id": "batch_req_…", "custom_id": …, "response": {"status_code": 200, "request_id": <job id>,
"body": <a chat.completion>}, "error": null}`. Every other line goes to the error file: a line
the provider or the service refused carries the answer a direct call would have had
(`response.status_code` 4xx/5xx and `body.error`); a line that never ran or was cut short
carries `response: null` and `error: {"code": "batch_cancelled" | "batch_expired" | …}`.
Lines keep the input's order; each is read from its job's stored record as it is written, a
chunk of jobs at a time, so neither file is ever whole in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from flow_api.batch.files import FilePurpose, FileStore, FileWriter, StoredFile
from flow_api.batch.requests import custom_id_of
from flow_api.batch.store import BatchStore
from flow_api.errors import FlowError, JobNotFound
from flow_api.history import JobHistory
from flow_api.models import ErrorInfo, Generation, JobStatus
from flow_api.queue.store import JobStore

FINISH_REASONS = ("stop", "length", "content_filter", "tool_calls")
READ_AHEAD = 64
"""Jobs read at once while assembling (one snapshot script each)."""


def line_job_id(batch_id: str, line: int) -> str:
    """The job id of a batch's line: derived, so a chunk queued twice adds no second job."""
    return hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:32]


PROVIDER_STATUSES = {
    "provider_rejected": 400,
    "context_too_long": 400,
    "content_filtered": 400,
    "provider_auth_failed": 401,
    "provider_rate_limited": 429,
    "provider_timeout": 504,
}
"""What the provider answered, as a direct call would have seen it (the service's own table
answers 502 for all of them: to a job's client they are the provider's failure)."""


def _status_of(code: str) -> int:
    if code in PROVIDER_STATUSES:
        return PROVIDER_STATUSES[code]
    pending: list[type[FlowError]] = [FlowError]
    while pending:
        kind = pending.pop()
        if kind.code == code:
            return kind.status
        pending.extend(kind.__subclasses__())
    return 500


def completion_body(job_id: str, generation: Generation, finished_s: int) -> dict[str, Any]:
    """OpenAI's `chat.completion` object for a completed line."""
    usage = generation.usage
    reason = generation.finish_reason if generation.finish_reason in FINISH_REASONS else "stop"
    return {
        "id": f"chatcmpl-{job_id}",
        "object": "chat.completion",
        "created": finished_s,
        "model": generation.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": generation.text, "refusal": None},
                "finish_reason": reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "system_fingerprint": None,
    }


def _error_line(job_id: str, custom_id: str | None, error: ErrorInfo) -> dict[str, Any]:
    line: dict[str, Any] = {"id": f"batch_req_{job_id}", "custom_id": custom_id}
    if error.code in ("cancelled", "expired", "not_run"):
        code = {"cancelled": "batch_cancelled", "expired": "batch_expired"}.get(
            error.code, "batch_cancelled"
        )
        line.update(response=None, error={"code": code, "message": error.message})
        return line
    body = {
        "error": {"message": error.message, "type": error.code, "param": None, "code": error.code}
    }
    line.update(
        response={"status_code": _status_of(error.code), "request_id": job_id, "body": body},
        error=None,
    )
    return line


async def _outcome(
    jobs: JobStore, batches: BatchStore, batch_id: str, line: int
) -> tuple[Generation | None, ErrorInfo | None, int]:
    job_id = line_job_id(batch_id, line)
    try:
        stored = await jobs.fetch(job_id, with_logs=True)
    except JobNotFound:  # never queued: refused at enqueue, or the batch was cancelled first
        refused = await batches.refusal(batch_id, line)
        if refused is not None:
            return None, ErrorInfo.model_validate(refused), 0
        return None, ErrorInfo(code="not_run", message="the batch was cancelled first"), 0
    history = JobHistory(stored)
    status, error = history.outcome
    finished_s = (stored.finished_ms or 0) // 1000
    if status is JobStatus.COMPLETED and history.generation is not None:
        return history.generation, None, finished_s
    return None, error or ErrorInfo(code="job_failed", message="the job failed"), finished_s


class OutputAssembly:
    """Writes a finished batch's output and error files from its input and its jobs."""

    def __init__(self, files: FileStore, jobs: JobStore, batches: BatchStore) -> None:
        self.files = files
        self.jobs = jobs
        self.batches = batches

    async def assemble(
        self, batch_id: str, tenant: str, input_file_id: str
    ) -> tuple[StoredFile | None, StoredFile | None, int]:
        """(output file or None when no line completed, error file or None, lines expired)."""
        output = self.files.writer(tenant, f"{batch_id}_output.jsonl", FilePurpose.BATCH_OUTPUT)
        errors = self.files.writer(tenant, f"{batch_id}_error.jsonl", FilePurpose.BATCH_OUTPUT)
        expired = 0
        async for chunk in _chunks(self.files.lines(input_file_id), READ_AHEAD):
            ids = [line_job_id(batch_id, number) for number, _ in chunk]
            outcomes = await asyncio.gather(
                *(_outcome(self.jobs, self.batches, batch_id, number) for number, _ in chunk)
            )
            for (_, raw), job_id, (generation, error, finished_s) in zip(
                chunk, ids, outcomes, strict=True
            ):
                custom_id = custom_id_of(raw)
                if generation is not None:
                    line = {
                        "id": f"batch_req_{job_id}",
                        "custom_id": custom_id,
                        "response": {
                            "status_code": 200,
                            "request_id": job_id,
                            "body": completion_body(job_id, generation, finished_s),
                        },
                        "error": None,
                    }
                    await output.write(orjson.dumps(line) + b"\n")
                else:
                    assert error is not None
                    expired += error.code == "expired"
                    await errors.write(orjson.dumps(_error_line(job_id, custom_id, error)) + b"\n")
        return await _close(output), await _close(errors), expired


async def _close(writer: FileWriter) -> StoredFile | None:
    if writer.size == 0:
        return None
    return await writer.close()


async def _chunks(
    lines: AsyncIterator[tuple[int, bytes]], size: int
) -> AsyncIterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    async for item in lines:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
