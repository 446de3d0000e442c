"""Every job's events in a per-job Redis Stream: the worker writes (`writer`), the API reads
(`reader`) for `GET /api/ai/stream/{jobId}`. `events` names what both sides agree on."""
