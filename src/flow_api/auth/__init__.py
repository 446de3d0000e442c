"""Who may do what: API keys, tenants, scopes, per-key submit rates and token quotas.

- `principal.py`: who a request acts as (`Principal`, `Scope`) and `ensure_owner` for jobs.
- `api_keys.py`: the key store; keys are kept only as SHA-256 hashes.
- `access.py`: `AccessControl`, from an `Authorization` header to a `Principal`, plus limits.
- `rate.py` / `quota.py`: submits per window (the `limits` library) and tokens per day (Lua).
- the worker side of the quota (settling each job with its real usage) is the `Quota` step of
  `worker/steps.py`.
- `exposure.py`: the start-up guard against serving beyond loopback without keys.
- `commands.py`: `flow-api keys create | list | revoke`.
"""
