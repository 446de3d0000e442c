"""`/v1/files`, as OpenAI's Files API (the subset batches use): upload, describe, download,
delete. An upload is copied to Redis piece by piece as it is read (`batch/files.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from flow_api.api.auth import ReaderDep, WriterDep
from flow_api.api.responses import errors
from flow_api.batch.files import FilePurpose, FileStore, StoredFile
from flow_api.errors import BatchFileRejected, FlowError, InvalidRequest
from flow_api.settings import Settings

router = APIRouter(prefix="/v1", tags=["batches"])

READ_BYTES = 262_144
UPLOAD_PATH = "/v1/files"
"""Uploads here get the batch file limits instead of the API's body limits (`api/limits.py`)."""


async def _files(request: Request) -> FileStore:  # async: no thread hop (deps.py)
    files: FileStore = request.app.state.files
    return files


FilesDep = Annotated[FileStore, Depends(_files)]


def file_object(stored: StoredFile) -> dict[str, Any]:
    """OpenAI's `FileObject`."""
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.size,
        "created_at": stored.created_at,
        "expires_at": stored.expires_at,
        "filename": stored.filename,
        "purpose": stored.purpose.value,
        "status": "processed",
        "status_details": None,
    }


@router.post(
    UPLOAD_PATH.removeprefix("/v1"),
    responses=errors(400, 401, 403, 413, 422, 503),
    summary="Upload a batch input file (multipart: `file`, `purpose=batch`)",
)
async def upload(request: Request, files: FilesDep, principal: WriterDep) -> dict[str, Any]:
    """At most `FLOW_BATCH_MAX_FILE_BYTES` (413) and `FLOW_BATCH_MAX_LINES` lines (400)."""
    settings: Settings = request.app.state.settings
    limits = settings.batch
    # Starlette spools the file part to disk past 1 MB; it is copied to Redis a piece at a
    # time, so no upload is ever whole in memory. A malformed form is Starlette's 400.
    async with request.form(max_files=1, max_fields=4) as form:
        purpose, upload_file = form.get("purpose"), form.get("file")
        if purpose != FilePurpose.BATCH.value:
            raise BatchFileRejected("purpose must be 'batch'", field="purpose")
        if not isinstance(upload_file, UploadFile):
            raise InvalidRequest("expected multipart/form-data with a file part", field="file")
        name = upload_file.filename or "upload.jsonl"
        writer = files.writer(principal.tenant, name, FilePurpose.BATCH)
        try:
            while piece := await upload_file.read(READ_BYTES):
                await writer.write(piece, max_bytes=limits.max_file_bytes)
                writer.check_lines(limits.max_lines)
            stored = await writer.close()
        except FlowError:
            await writer.discard()
            raise
    return file_object(stored)


@router.get("/files/{file_id}", responses=errors(401, 403, 404, 503), summary="Describe a file")
async def describe(file_id: str, files: FilesDep, principal: ReaderDep) -> dict[str, Any]:
    return file_object(await files.get(file_id, principal.tenant))


@router.get(
    "/files/{file_id}/content",
    responses=errors(401, 403, 404, 503),
    summary="A file's bytes (input, output or error file)",
    response_class=StreamingResponse,
)
async def content(file_id: str, files: FilesDep, principal: ReaderDep) -> StreamingResponse:
    stored = await files.get(file_id, principal.tenant)

    async def body() -> AsyncIterator[bytes]:
        async for piece in files.chunks(stored.id):
            yield piece

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(stored.size)},
    )


@router.delete("/files/{file_id}", responses=errors(401, 403, 404, 503), summary="Delete a file")
async def delete(file_id: str, files: FilesDep, principal: WriterDep) -> dict[str, Any]:
    await files.delete(file_id, principal.tenant)
    return {"id": file_id, "object": "file", "deleted": True}
