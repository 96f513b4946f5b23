"""`tuneline token create --role R [--subject NAME]`: mint a bearer token for the HTTP API (printed once,
stored hashed; services/common/tokens.py)."""

from __future__ import annotations

import asyncio
import sys

from services.common import tokens


def cmd_token_create(main, args) -> int:
    try:
        tokens.check(args.role, args.subject)
    except ValueError as exc:
        print(f"tuneline token create: {exc}", file=sys.stderr)
        return 2
    _, owner_dsn = main.urls()  # the owner mints; the API may only read tokens
    token = asyncio.run(tokens.create(owner_dsn, args.role, args.subject))
    print(token)
    print(f"({args.role} token for {args.subject}; shown once, only its sha256 is kept)", file=sys.stderr)
    return 0


def add_parser(sub, main) -> None:
    from services.cli.registry_cmds import default_actor

    t = sub.add_parser("token", help="bearer tokens for the HTTP API")
    tsub = t.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="mint a token for a role; prints it once")
    c.add_argument("--role", required=True, choices=tokens.ROLES)
    c.add_argument("--subject", default=default_actor(), help="who the token acts as (the actor in events)")
    c.set_defaults(fn=lambda a: cmd_token_create(main, a))
