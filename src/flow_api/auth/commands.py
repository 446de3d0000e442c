"""`flow-api keys create | list | revoke`: manage API keys in the deployment's Redis.

The new key goes alone to stdout (`KEY=$(flow-api keys create ...)`); notes go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
from pydantic.alias_generators import to_camel

from flow_api.auth.api_keys import ApiKey, ApiKeyStore
from flow_api.auth.principal import Scope
from flow_api.errors import FlowError
from flow_api.queue.connection import connect
from flow_api.settings import Settings

DEFAULT_SCOPES = "submit,read"
MAX_EXPIRY_DAYS = 36_500


def _days(text: str) -> float:
    """`--expires-in-days`: more than 0, at most `MAX_EXPIRY_DAYS` (a date must follow)."""
    try:
        days = float(text)
    except ValueError:
        days = float("nan")
    if not 0 < days <= MAX_EXPIRY_DAYS:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of days from more than 0 to {MAX_EXPIRY_DAYS} (100 years)"
        )
    return days


def add_commands(sub: Any) -> None:
    """Add `keys` and its subcommands to the CLI's subparsers."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="a new key; shown once")
    create.add_argument("--tenant", required=True, help="the team the key acts for")
    create.add_argument("--name", required=True, help="what the key is for, e.g. ci")
    create.add_argument(
        "--scopes",
        default=DEFAULT_SCOPES,
        help=f"comma-separated: submit, read, admin (default {DEFAULT_SCOPES})",
    )
    create.add_argument("--expires-in-days", type=_days, help="default: never")
    create.add_argument("--requests-per-minute", type=int, help="default FLOW_AUTH_ setting")
    create.add_argument("--tokens-per-day", type=int, help="default FLOW_AUTH_ setting")
    create.add_argument(
        "--spend-per-day", type=float, help="spend cap in FLOW_USAGE_CURRENCY; 0 = none"
    )
    create.add_argument("--json", action="store_true", help="print the key and record as JSON")
    listing = actions.add_parser("list", help="every key (never the keys themselves)")
    listing.add_argument("--tenant")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="refuse a key from the next request on")
    revoke.add_argument("key_id")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one `keys` subcommand; the exit code."""
    try:
        return asyncio.run(_run(args, settings))
    except (FlowError, ValueError) as exc:
        print(f"flow-api keys: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    redis = connect(settings.redis)
    try:
        store = ApiKeyStore(redis, settings.redis.queue_name)
        if args.keys_command == "create":
            return await _create(store, args)
        if args.keys_command == "list":
            return _print_list(await store.list(args.tenant), as_json=args.json)
        key = await store.revoke(args.key_id)
        if key is None:
            print(f"flow-api keys: no key with id {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked key {key.id} ({key.tenant}/{key.name})")
        return 0
    finally:
        await redis.aclose()


def _scopes(text: str) -> frozenset[Scope]:
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = names - {s.value for s in Scope}
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(sorted(unknown))}; use submit, read, admin")
    return frozenset(Scope(name) for name in names)


_Limit = TypeVar("_Limit", int, float)


def _limit(value: _Limit | None, flag: str) -> _Limit | None:
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be 0 (unlimited) or more")
    return value


async def _create(store: ApiKeyStore, args: argparse.Namespace) -> int:
    days = args.expires_in_days
    key, plaintext = await store.create(
        args.tenant,
        args.name,
        _scopes(args.scopes),
        expires_in=timedelta(days=days) if days is not None else None,
        requests_per_minute=_limit(args.requests_per_minute, "--requests-per-minute"),
        tokens_per_day=_limit(args.tokens_per_day, "--tokens-per-day"),
        spend_per_day=_limit(args.spend_per_day, "--spend-per-day"),
    )
    if args.json:
        print(orjson.dumps({"key": plaintext, **_describe(key)}).decode())
        return 0
    expires = key.expires_at.isoformat() if key.expires_at else "never"
    print(
        f"created key {key.id} for tenant {key.tenant} ({key.name}), scopes "
        f"{_join(key.scopes)}, expires {expires}. The key is shown only this once:",
        file=sys.stderr,
    )
    print(plaintext)
    return 0


def _describe(key: ApiKey) -> dict[str, Any]:
    record = key.model_dump(mode="json", exclude={"digest"})
    record["scopes"] = sorted(key.scopes)
    record["status"] = "expired" if key.expired() else "active"
    return {to_camel(name): value for name, value in record.items()}  # as on the wire


def _join(scopes: frozenset[Scope]) -> str:
    return ",".join(sorted(scopes))


def _print_list(keys: list[ApiKey], *, as_json: bool) -> int:
    if as_json:
        print(orjson.dumps([_describe(k) for k in keys]).decode())
        return 0
    rows = [("ID", "TENANT", "NAME", "SCOPES", "CREATED", "EXPIRES", "STATUS")]
    now = datetime.now(UTC)
    for key in keys:
        rows.append(
            (
                key.id,
                key.tenant,
                key.name,
                _join(key.scopes),
                key.created_at.isoformat(),
                key.expires_at.isoformat() if key.expires_at else "never",
                "expired" if key.expired(now) else "active",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0
