"""`/v1/files` storage: a file lives in Redis as a list of byte pieces beside a small hash, so
every API and worker process can read it, and no process ever holds a whole file in memory.

Pieces are `FLOW_BATCH_CHUNK_BYTES` long; both keys carry the retention TTL
(`FLOW_WORKER_RETENTION_S`). Lines are read piece by piece (`FileStore.lines`), and written
the same way (`FileWriter`), so a 50 000-line batch costs a piece of memory at a time.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

from redis.asyncio import Redis

from flow_api.errors import BatchFileRejected, FileNotFound, PayloadTooLarge
from flow_api.keys import file_chunks_key, file_key
from flow_api.queue.connection import redis_errors_as_unavailable


class FilePurpose(StrEnum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file's description (what `FileObject` answers)."""

    id: str
    tenant: str
    filename: str
    purpose: FilePurpose
    size: int
    lines: int
    created_at: int
    """Seconds since the epoch, as OpenAI's `created_at`."""
    expires_at: int


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class FileStore:
    """Files of every tenant, in Redis; another tenant's file is a `FileNotFound`."""

    def __init__(self, redis: Redis, queue_name: str, chunk_bytes: int, ttl_s: int) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.chunk_bytes = chunk_bytes
        self.ttl_s = ttl_s

    def writer(self, tenant: str, filename: str, purpose: FilePurpose) -> FileWriter:
        return FileWriter(self, tenant, filename, purpose)

    async def get(self, file_id: str, tenant: str) -> StoredFile:
        with redis_errors_as_unavailable():
            raw = cast(
                dict[bytes, bytes], await self.redis.hgetall(file_key(self.queue_name, file_id))
            )
        if not raw or raw.get(b"tenant", b"").decode() != tenant:
            raise FileNotFound(file_id)
        return StoredFile(
            id=file_id,
            tenant=tenant,
            filename=raw[b"filename"].decode(),
            purpose=FilePurpose(raw[b"purpose"].decode()),
            size=int(raw[b"size"]),
            lines=int(raw[b"lines"]),
            created_at=int(raw[b"created"]),
            expires_at=int(raw[b"expires"]),
        )

    async def delete(self, file_id: str, tenant: str) -> None:
        await self.get(file_id, tenant)
        with redis_errors_as_unavailable():
            await self.redis.delete(
                file_key(self.queue_name, file_id), file_chunks_key(self.queue_name, file_id)
            )

    async def chunks(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes, one stored piece at a time."""
        key = file_chunks_key(self.queue_name, file_id)
        index = 0
        while True:
            with redis_errors_as_unavailable():
                piece = cast(bytes | None, await self.redis.lindex(key, index))
            if piece is None:
                return
            yield bytes(piece)
            index += 1

    async def lines(self, file_id: str, start: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        """`(line number from 0, line without its newline)` from line `start` on. Blank lines
        are yielded too (the validation names them); a final line without a newline counts."""
        number = 0
        rest = b""
        async for piece in self.chunks(file_id):
            parts = (rest + piece).split(b"\n")
            rest = parts.pop()
            for line in parts:
                if number >= start:
                    yield number, line
                number += 1
        if rest and number >= start:
            yield number, rest


class FileWriter:
    """Appends a file piece by piece (an upload as it arrives, or a batch's output as it is
    assembled); `close()` describes it. Until then the file has no hash: nobody can read it."""

    def __init__(self, store: FileStore, tenant: str, filename: str, purpose: FilePurpose) -> None:
        self.store = store
        self.id = new_file_id()
        self.tenant = tenant
        self.filename = filename
        self.purpose = purpose
        self.size = 0
        self.lines = 0
        self._ends_with_newline = True
        self._buffer = bytearray()

    async def write(self, data: bytes, *, max_bytes: int | None = None) -> None:
        if not data:
            return
        self.size += len(data)
        if max_bytes is not None and self.size > max_bytes:
            raise PayloadTooLarge(f"the file exceeds {max_bytes} bytes (FLOW_BATCH_MAX_FILE_BYTES)")
        self.lines += data.count(b"\n")
        self._ends_with_newline = data.endswith(b"\n")
        self._buffer += data
        if len(self._buffer) >= self.store.chunk_bytes:
            await self._flush()

    def check_lines(self, max_lines: int) -> None:
        if self.line_count > max_lines:
            raise BatchFileRejected(
                f"the file has more than {max_lines} lines (FLOW_BATCH_MAX_LINES)", field="file"
            )

    @property
    def line_count(self) -> int:
        return self.lines + (0 if self._ends_with_newline else 1)

    async def _flush(self) -> None:
        store = self.store
        key = file_chunks_key(store.queue_name, self.id)
        size = store.chunk_bytes
        while len(self._buffer) >= size or (self._buffer and self._closing):
            piece, self._buffer = bytes(self._buffer[:size]), self._buffer[size:]
            with redis_errors_as_unavailable():
                async with store.redis.pipeline(transaction=False) as pipe:
                    pipe.rpush(key, piece)
                    pipe.expire(key, store.ttl_s)
                    await pipe.execute()

    _closing = False

    async def close(self) -> StoredFile:
        """Store what is left and the file's description; returns it."""
        self._closing = True
        await self._flush()
        store = self.store
        now = int(time.time())
        described = StoredFile(
            id=self.id,
            tenant=self.tenant,
            filename=self.filename,
            purpose=self.purpose,
            size=self.size,
            lines=self.line_count,
            created_at=now,
            expires_at=now + store.ttl_s,
        )
        key = file_key(store.queue_name, self.id)
        with redis_errors_as_unavailable():
            async with store.redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    key,
                    mapping={
                        "tenant": self.tenant,
                        "filename": self.filename,
                        "purpose": self.purpose.value,
                        "size": self.size,
                        "lines": described.lines,
                        "created": now,
                        "expires": described.expires_at,
                    },
                )
                pipe.expire(key, store.ttl_s)
                await pipe.execute()
        return described

    async def discard(self) -> None:
        """Drop the pieces stored so far (an upload refused half way)."""
        with redis_errors_as_unavailable():
            await self.store.redis.delete(file_chunks_key(self.store.queue_name, self.id))
