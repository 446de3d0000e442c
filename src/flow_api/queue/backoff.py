"""`RedisBackoff`: how a worker's slots wait out a Redis that refuses them, together.

When Redis is out of memory (`noeviction`) or unreachable, every slot's take and finish fails at
once. Retried at once, that was a hot loop (thousands of warnings a second, a CPU busy doing
nothing). Here the slots of one worker share one backoff: the first failure of a round sets the
next try (exponential, jittered, capped), and every slot waits for it. The episode ends with a
success that comes `quiet_s` after the last failure, not with any success: a Redis at its memory
limit still runs some calls (a script whose first write frees memory goes through, so a take
that finds a job in a tenant's line, or a finish, can succeed between refused ones), and ending
the episode on each of those reset the backoff and brought the hot loop back. The log gets one
line when trouble starts, one every `log_every_s` with the counts meanwhile, and one when Redis
answers again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter

log = logging.getLogger(__name__)


class RedisBackoff:
    """A worker's shared backoff while Redis refuses its calls; recovers by itself."""

    def __init__(
        self,
        base_s: float = 0.05,
        cap_s: float = 2.0,
        log_every_s: float = 5.0,
        quiet_s: float | None = None,
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.log_every_s = log_every_s
        self.quiet_s = 2 * cap_s if quiet_s is None else quiet_s
        """Failure-free time after which a success ends the episode (over `cap_s`, so calls
        that fail and succeed in turn keep it going at the capped pace)."""
        self._last_failure = 0.0
        self._round = 0
        self._resume_at = 0.0
        self._since: float | None = None
        self._logged_at = 0.0
        self._errors: Counter[str] = Counter()
        self.total_errors = 0
        """Failures since the worker started (tests and the metrics read it)."""

    @property
    def troubled(self) -> bool:
        """Whether an episode is on: a failure within `quiet_s`, or no success since one."""
        return self._since is not None

    async def wait(self) -> None:
        """Wait for the next try when an episode is on; return at once otherwise."""
        delay = self._resume_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def failed(self, operation: str, exc: BaseException) -> None:
        """Count a failed `operation` ("take", "finish"...), log if due, wait for the next try."""
        now = time.monotonic()
        self._last_failure = now
        self.total_errors += 1
        self._errors[f"{operation} {type(exc).__name__}"] += 1
        if now >= self._resume_at:  # the first failure of this round sets the next one
            self._round += 1
            ceiling = min(self.cap_s, self.base_s * 2 ** min(self._round - 1, 30))
            self._resume_at = now + random.uniform(ceiling / 2, ceiling)
        if self._since is None:
            self._since = self._logged_at = now
            log.warning(
                "Redis refused the worker's %s (%s: %s); backing off, up to %.1f s between "
                "tries, until it answers again",
                operation,
                type(exc).__name__,
                _first_line(exc),
                self.cap_s,
            )
            self._errors.clear()
        elif now - self._logged_at >= self.log_every_s:
            self._logged_at = now
            log.warning(
                "Redis still refusing the worker for %.0f s: %s in the last %.0f s",
                now - self._since,
                _counts(self._errors),
                self.log_every_s,
            )
            self._errors.clear()
        await self.wait()

    def succeeded(self) -> None:
        """A call went through: end the episode (and say so once) if none failed for `quiet_s`."""
        if self._since is None:
            return
        now = time.monotonic()
        if now - self._last_failure < self.quiet_s:
            return
        took = self._last_failure - self._since
        log.warning("Redis answers the worker again after %.1f s of refusals", took)
        self._since = None
        self._round = 0
        self._resume_at = 0.0
        self._errors.clear()


def _counts(errors: Counter[str]) -> str:
    return ", ".join(f"{n} x {what}" for what, n in errors.most_common()) or "no new errors"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
