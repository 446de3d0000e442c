"""`flow-api webhooks secret rotate | default set | default clear | default list`.

Admin commands against the deployment's Redis. `secret rotate` prints the tenant's new secret
alone on stdout (`SECRET=$(flow-api webhooks secret rotate --tenant T)`), notes on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from flow_api.errors import FlowError
from flow_api.models import WebhookEventType, WebhookOptions
from flow_api.queue.connection import connect
from flow_api.settings import Settings
from flow_api.webhooks.address import AllowList, check_url
from flow_api.webhooks.defaults import DefaultWebhooks
from flow_api.webhooks.secrets import SecretStore

ALL_EVENTS = ",".join(kind.value for kind in WebhookEventType)


def add_commands(sub: Any) -> None:
    """Add `webhooks` and its subcommands to the CLI's subparsers."""
    hooks = sub.add_parser("webhooks", help="webhook signing secrets and tenants' defaults")
    groups = hooks.add_subparsers(dest="webhooks_group", required=True)
    secret = groups.add_parser("secret", help="a tenant's signing secret")
    secret_actions = secret.add_subparsers(dest="webhooks_command", required=True)
    rotate = secret_actions.add_parser(
        "rotate", help="a new secret (printed once); the old one signs too for the grace period"
    )
    rotate.add_argument("--tenant", required=True)
    default = groups.add_parser("default", help="a tenant's default webhook")
    default_actions = default.add_subparsers(dest="webhooks_command", required=True)
    setting = default_actions.add_parser("set", help="jobs naming no webhook get this one")
    setting.add_argument("--tenant", required=True)
    setting.add_argument("--url", required=True)
    setting.add_argument("--events", default=ALL_EVENTS, help=f"default {ALL_EVENTS}")
    clear = default_actions.add_parser("clear", help="no default webhook for the tenant")
    clear.add_argument("--tenant", required=True)
    default_actions.add_parser("list", help="every tenant's default, as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one `webhooks` subcommand; the exit code."""
    try:
        return asyncio.run(_run(args, settings))
    except (FlowError, ValueError) as exc:
        print(f"flow-api webhooks: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    redis = connect(settings.redis)
    queue_name = settings.redis.queue_name
    try:
        if args.webhooks_group == "secret":
            fresh = await SecretStore(redis, queue_name).rotate(
                args.tenant, settings.webhook.secret_grace_s
            )
            print(fresh.current)
            if fresh.previous is not None:
                print(
                    f"the previous secret also signs for {settings.webhook.secret_grace_s} s",
                    file=sys.stderr,
                )
            return 0
        defaults = DefaultWebhooks(redis, queue_name)
        if args.webhooks_command == "set":
            events = [WebhookEventType(e.strip()) for e in args.events.split(",") if e.strip()]
            webhook = WebhookOptions(url=args.url, events=events)
            await check_url(webhook.url, AllowList.parse(settings.webhook.allow_hosts))
            await defaults.set(args.tenant, webhook)
            print(f"default webhook of {args.tenant!r} set", file=sys.stderr)
            return 0
        if args.webhooks_command == "clear":
            found = await defaults.clear(args.tenant)
            print(
                f"default webhook of {args.tenant!r} {'cleared' if found else 'not set'}",
                file=sys.stderr,
            )
            return 0
        listing = {tenant: hook.wire() for tenant, hook in (await defaults.all()).items()}
        print(orjson.dumps(listing, option=orjson.OPT_INDENT_2).decode())
        return 0
    finally:
        await redis.aclose()
