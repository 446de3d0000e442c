"""The batch driver: what moves a batch from its upload to its output, run by API processes.

Every API process runs one `BatchDriver` (started by the app's lifespan). A batch with work
left is in the work set (`<prefix>:<queue>:batches:work`); a driver takes it under a lease
(`…:lease`, renewed while it works, `FLOW_BATCH_LEASE_S`), so one process drives a batch at a
time and any other takes over when that one dies. The steps, each resumable:

1. validate (`validating`): read the input file line by line, collect what is wrong with each
   (OpenAI's `errors.data[]`, with line numbers); any error ends the batch `failed`. A crash
   here starts the pass again (it writes nothing).
2. enqueue (`in_progress`): `FLOW_BATCH_ENQUEUE_CHUNK` lines at a time, one bulk add each, then
   the cursor (`cursor` in the batch's hash) moves past them. Job ids are derived from the
   batch and line (`output.line_job_id`), so a chunk queued again after a crash adds nothing.
3. wait: nothing to do. Each line's job is counted at its end by the worker that ended it
   (`tally.py`); the count that completes the batch puts it back in the work set. Every
   `FLOW_BATCH_RECONCILE_S` a driver recounts the lines from their jobs' states (the same
   idempotent tally), for a job that ended without its count (its worker died between the
   job's end and the count, or a Redis failover lost the count's write).
4. assemble (`finalizing`, or `cancelling`): write the output and error files (`output.py`),
   end the batch `completed` (`expired` when lines missed the completion window, `cancelled`
   after a cancel).

A cancel (`cancelling`) stops the enqueue: the lines never queued count as failed, and every
queued job gets the ordinary job cancel (a waiting job never calls its provider; a running one
is interrupted); the batch ends once they all did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import orjson

from flow_api.api.routes.generate import check_limits
from flow_api.auth.access import AccessControl
from flow_api.auth.principal import ALL_SCOPES, Principal
from flow_api.batch.files import FileStore
from flow_api.batch.output import OutputAssembly, line_job_id
from flow_api.batch.requests import BatchRequest, LineError, flow_error_line, parse_line
from flow_api.batch.store import BatchRecord, BatchStatus, BatchStore
from flow_api.batch.tally import BatchTally
from flow_api.errors import FlowError, JobNotFound, QuotaExhausted
from flow_api.jobs import BatchLine, JobData
from flow_api.providers import ProviderRegistry
from flow_api.queue.admission import Admission, job_bytes
from flow_api.queue.producer import JobQueue
from flow_api.queue.store import JobStore
from flow_api.settings import Settings

log = logging.getLogger(__name__)

MAX_ERRORS = 100
"""Line errors kept on a failed batch (the count of the rest is named in the last one)."""
CANCEL_AT_ONCE = 64
"""Jobs cancelled (or recounted) at once."""


def check_line(request: BatchRequest, settings: Settings, registry: ProviderRegistry) -> None:
    """The checks `POST /api/ai/generate` makes of a request, beyond its schema."""
    check_limits(request.request, settings.api, settings.worker)
    registry.resolve(request.request.options)


class BatchDriver:
    """Drives the batches in the work set; `run()` until cancelled (one per API process)."""

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        batches: BatchStore,
        files: FileStore,
        jobs: JobStore,
        registry: ProviderRegistry,
        access: AccessControl,
        admission: Admission,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.batches = batches
        self.files = files
        self.registry = registry
        self.access = access
        self.admission = admission
        self.assembly = OutputAssembly(files, jobs, batches)
        self.tally = BatchTally(queue.redis, queue.bull.toKey)
        self._token = secrets.token_hex(8)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the work set now (a batch was created or cancelled by this process)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                for batch_id in await self.batches.due(16):
                    await self.drive(batch_id)
            except FlowError as exc:  # Redis away or full: try again at the next sweep
                log.warning("batch driver: %s", exc.message)
            except Exception:
                log.exception("batch driver: unexpected error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.batch.sweep_s)
            self._wake.clear()

    async def drive(self, batch_id: str) -> None:
        """Do the batch's pending step(s), if no other process is doing them."""
        lease_ms = int(self.settings.batch.lease_s * 1000)
        if not await self.batches.lease(batch_id, self._token, lease_ms):
            return
        renewing = asyncio.create_task(self._renew(batch_id, lease_ms))
        try:
            await self._step(batch_id)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, FlowError):
                await renewing
            with contextlib.suppress(FlowError):
                await self.batches.release(batch_id, self._token)

    async def _renew(self, batch_id: str, lease_ms: int) -> None:
        while True:
            await asyncio.sleep(lease_ms / 3000)
            if not await self.batches.renew(batch_id, self._token, lease_ms):
                log.warning("batch %s: lease lost; another process takes over", batch_id)
                return

    async def _step(self, batch_id: str) -> None:
        try:
            record = await self.batches.get(batch_id)
        except FlowError:  # expired or removed: nothing left to drive
            await self.batches.settle_work(batch_id)
            return
        acted = False
        if record.status is BatchStatus.VALIDATING:
            if not await self._validate(record):
                return
            record, acted = await self.batches.get(batch_id), True
        if record.status is BatchStatus.IN_PROGRESS and not record.enqueued:
            await self._enqueue(record)
            record, acted = await self.batches.get(batch_id), True
        if record.status is BatchStatus.CANCELLING and not record.cancel_sent:
            await self._cancel(record)
            record, acted = await self.batches.get(batch_id), True
        if not (acted or record.ready or record.status.ended) and record.enqueued:
            await self._reconcile(record)  # due again with nothing else to do: recount
            record = await self.batches.get(batch_id)
        if record.ready and record.status in (BatchStatus.FINALIZING, BatchStatus.CANCELLING):
            await self._finalize(record)
            return
        await self.batches.settle_work(batch_id)

    async def _reconcile(self, record: BatchRecord) -> None:
        """Count every line's job that ended without its tally (a worker that died between the
        job's end and its count). The tally is idempotent per job, so lines counted already
        count nothing more."""
        data = {"batch": {"id": record.id}}
        lines = range(record.total)
        for start in range(0, len(lines), CANCEL_AT_ONCE):
            await asyncio.gather(
                *(
                    self.tally.settled(line_job_id(record.id, line), data)
                    for line in lines[start : start + CANCEL_AT_ONCE]
                )
            )

    async def _validate(self, record: BatchRecord) -> bool:
        """Check every line; True when the batch may run (it is then `in_progress`)."""
        errors: list[LineError] = []
        seen: set[str] = set()
        lines = 0
        async for number, raw in self.files.lines(record.input_file_id):
            lines += 1
            found = self._check(raw, number, seen)
            if found is not None:
                errors.append(found)
        if lines == 0:
            errors.append(LineError("empty_file", "the input file has no lines", 1))
        if errors:
            kept = [error.wire() for error in errors[:MAX_ERRORS]]
            if len(errors) > MAX_ERRORS:
                kept[-1]["message"] += f" ({len(errors) - MAX_ERRORS} more lines have errors)"
            await self.batches.end(record.id, BatchStatus.FAILED, errors=_json(kept), total=lines)
            return False
        await self.batches.start(record.id, lines)
        return True

    def _check(self, raw: bytes, number: int, seen: set[str]) -> LineError | None:
        if not raw.strip():
            return LineError("invalid_json", "the line is empty", number + 1)
        parsed = parse_line(raw, number)
        if isinstance(parsed, LineError):
            return parsed
        if parsed.custom_id in seen:
            return LineError(
                "duplicate_custom_id",
                f"custom_id {parsed.custom_id!r} is used by an earlier line",
                number + 1,
                "custom_id",
            )
        seen.add(parsed.custom_id)
        try:
            check_line(parsed, self.settings, self.registry)
        except FlowError as error:
            return flow_error_line(error, number)
        return None

    async def _enqueue(self, record: BatchRecord) -> None:
        size = self.settings.batch.enqueue_chunk
        chunk: list[tuple[int, BatchRequest]] = []
        cursor = record.cursor
        async for number, raw in self.files.lines(record.input_file_id, record.cursor):
            parsed = parse_line(raw, number)
            if isinstance(parsed, LineError):  # validated before: the file cannot change
                raise RuntimeError(f"batch {record.id}: line {number + 1} no longer parses")
            chunk.append((number, parsed))
            if len(chunk) >= size:
                cursor = await self._add(record, chunk)
                chunk = []
                current = await self.batches.get(record.id)
                if current.status is not BatchStatus.IN_PROGRESS:
                    return  # cancelled meanwhile: `_step` goes on with the cancel
        if chunk:
            cursor = await self._add(record, chunk)
        await self.batches.mark_enqueued(record.id, cursor)

    async def _add(self, record: BatchRecord, chunk: list[tuple[int, BatchRequest]]) -> int:
        """Queue one chunk of lines in one bulk add; returns the cursor past it."""
        principal = None
        if record.key_id is not None and record.tokens_per_day:
            principal = Principal(
                tenant=record.tenant,
                scopes=ALL_SCOPES,
                key_id=record.key_id,
                tokens_per_day=record.tokens_per_day,
            )
        start_by_ms = record.times["expires_at"] * 1000
        datas: list[JobData] = []
        ids: list[str] = []
        for number, line in chunk:
            job_id = line_job_id(record.id, number)
            request = line.request
            provider, model = self.registry.resolve(request.options)
            size = job_bytes((request.prompt, request.options.system))
            await self.admission.admit(record.tenant, size)  # or QueueFull: the next sweep
            charge = None
            if principal is not None:
                try:
                    charge = await self.access.reserve_tokens(principal, request, job_id)
                except QuotaExhausted as refused:
                    await self.batches.refuse(
                        record.id, number, {"code": refused.code, "message": refused.message}
                    )
                    continue
            data = JobData.submitted(
                request, provider=provider.name, model=model, tenant=record.tenant
            )
            where = BatchLine(batch_id=record.id, line=number, custom_id=line.custom_id)
            datas.append(
                data.model_copy(
                    update={
                        "charge": charge,
                        "start_by_ms": start_by_ms,
                        "batch": where,
                    }
                )
            )
            ids.append(job_id)
        if datas:
            await self.queue.enqueue_many(datas, batch=len(datas), ids=ids)
        cursor = chunk[-1][0] + 1
        await self.batches.update(record.id, cursor=cursor)
        return cursor

    async def _cancel(self, record: BatchRecord) -> None:
        if not record.enqueued:
            await self.batches.skip_rest(record.id, record.total - record.cursor, record.total)
        queued = range(record.cursor)
        for start in range(0, len(queued), CANCEL_AT_ONCE):
            await asyncio.gather(
                *(
                    self._cancel_job(line_job_id(record.id, line))
                    for line in queued[start : start + CANCEL_AT_ONCE]
                )
            )
        await self.batches.update(record.id, cancel_sent=1)

    async def _cancel_job(self, job_id: str) -> None:
        with contextlib.suppress(JobNotFound):  # refused at enqueue: never queued
            await self.queue.request_cancel(job_id)

    async def _finalize(self, record: BatchRecord) -> None:
        output, errors, expired = await self.assembly.assemble(
            record.id, record.tenant, record.input_file_id
        )
        fields: dict[str, str | int] = {}
        if output is not None:
            fields["output_file_id"] = output.id
        if errors is not None:
            fields["error_file_id"] = errors.id
        if record.status is BatchStatus.CANCELLING:
            status = BatchStatus.CANCELLED
        elif expired:
            status = BatchStatus.EXPIRED
        else:
            status = BatchStatus.COMPLETED
        await self.batches.end(record.id, status, **fields)
        log.info("batch %s %s (%d lines)", record.id, status, record.total)


def _json(value: object) -> str:
    return orjson.dumps(value).decode()
