"""Provider rate limits (requests and tokens per minute) shared by every worker through Redis.

One concept per module:

- `dimensions.py`: what a provider limits (requests, tokens, input tokens, output tokens).
- `charges.py`: what its limiter charges a call, before and after, and the models' output limits.
- `headers.py`: what its rate-limit headers say (OpenAI/Azure `x-ratelimit-*`, Anthropic
  `anthropic-ratelimit-*`).
- `ledger.py`: the shared ledger in Redis (GCRA per dimension, cooldowns, probe, averages).
- `rate_budget.py`: the worker's side: `admit` before a call, `settle` after an answer,
  `failed` after a failure (refund; after a 429, cooldown and put-back).

Why hand-written Lua rather than a limiter library (the `limits` package serves per-key API
rate limits in `auth/rate.py`): a limiter answers "may I, now?", while a queue needs "when may
I?" with that time reserved for the asker, a variable cost in tokens, and a correction of that
cost after the call. None of the `limits` strategies (fixed, moving or sliding window) reserve
a future slot or take a cost back; GCRA does all three with one number per dimension.
"""

from flow_api.budget.dimensions import Amounts, Dimension
from flow_api.budget.ledger import MINUTE_MS
from flow_api.budget.rate_budget import RateBudget, Ticket

__all__ = ["MINUTE_MS", "Amounts", "Dimension", "RateBudget", "Ticket"]
