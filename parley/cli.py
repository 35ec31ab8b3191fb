"""The `parley` command: run the stack, and talk to it.

    parley up                      all four services in one process (embedded PostgreSQL/Redis if unset)
    parley serve <service>         one service against DATABASE_URL / REDIS_URL
    parley ask "..." [--session]   one turn, streamed
    parley chat                    interactive chat (/new, /session, /quit)
    parley migrate                 apply database migrations to DATABASE_URL
    parley keys create --user U    issue an API key (keys list / keys revoke ID)
    parley seed-sales              load demo sales data
    parley health [ADDR]           gRPC health check
    parley dashboard               the operator dashboard (Streamlit)
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from parley.runtime.config import SERVICE_NAMES, Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def _default_user() -> str:
    user = os.environ.get("PARLEY_USER")
    if user:
        return user
    try:
        return getpass.getuser() or "local"
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "local"


async def _serve_until_signalled(settings: Settings, services: list[str], port: int, embedded: bool) -> None:
    from parley.runtime.app import running
    from parley.runtime.logging import get_logger

    log = get_logger("parley")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings, services, port=port, embedded=embedded) as app:
        log.info("ready", address=app.address, services=list(app.services),
                 hint=f"try: parley ask \"Hello\"  (PARLEY_CHAT_ADDR={app.address})")
        await stop.wait()
        log.info("shutting_down")


def _run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a server on uvloop: grpc.aio works on it, and its event loop costs less per RPC than asyncio's own
    (about 0.15-0.3 ms of CPU per streamed inference request, measured with bench/inference/proxy_overhead)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def cmd_up(args: argparse.Namespace) -> int:
    from parley.runtime.logging import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json)
    _run_server(_serve_until_signalled(settings, list(SERVICE_NAMES), settings.chat_port, embedded=True))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from parley.runtime.logging import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json)
    _run_server(_serve_until_signalled(settings, [args.service], settings.port_of(args.service), embedded=False))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from parley.runtime.db import migrate

    settings = _settings(args)
    if not settings.database_url:
        print("parley migrate: DATABASE_URL is not set", file=sys.stderr)
        return 2
    asyncio.run(migrate(settings.database_url))
    print("migrations applied")
    return 0


def _chat_options(args: argparse.Namespace):
    from parley.chat.v1 import chat_pb2

    options = chat_pb2.ChatOptions(model=args.model or "", max_tokens=args.max_tokens or 0)
    if args.temperature is not None:
        options.temperature = args.temperature
    return options


def cmd_ask(args: argparse.Namespace) -> int:
    from parley.client import TerminalChat

    settings = _settings(args)
    chat = TerminalChat(args.addr or settings.addr_of("chat"), args.user or _default_user(), json_output=args.json,
                        api_key=args.api_key, options=_chat_options(args))
    return asyncio.run(chat.ask(" ".join(args.message), session_id=args.session or ""))


def cmd_chat(args: argparse.Namespace) -> int:
    from parley.client import TerminalChat

    settings = _settings(args)
    chat = TerminalChat(args.addr or settings.addr_of("chat"), args.user or _default_user(), api_key=args.api_key,
                        options=_chat_options(args))
    return asyncio.run(chat.repl(session_id=args.session or ""))


def cmd_seed_sales(args: argparse.Namespace) -> int:
    from services.tools.sales import seed_with_settings

    r = asyncio.run(seed_with_settings(_settings(args), days=args.days, seed=args.seed, replace=args.replace))
    print(json.dumps({"inserted": r.inserted, "from": str(r.first_date), "to": str(r.last_date),
                      "skipped": r.skipped}))
    return 1 if r.skipped else 0


async def _with_engine(settings: Settings, action):
    """Run `action(engine)` against DATABASE_URL, or the embedded PostgreSQL of the data directory."""
    from parley.runtime.app import migrated_database

    async with migrated_database(settings) as database:
        return await action(database.engine)


def cmd_keys(args: argparse.Namespace) -> int:
    from services.chat.guards.auth import create_api_key, list_api_keys, revoke_api_key

    settings = _settings(args)
    if args.keys_command == "create":
        key = asyncio.run(_with_engine(settings, lambda e: create_api_key(e, args.user, args.admin, args.name)))
        print(key)
        print("store this key now: it is not shown again", file=sys.stderr)
        return 0
    if args.keys_command == "revoke":
        ok = asyncio.run(_with_engine(settings, lambda e: revoke_api_key(e, args.key_id)))
        print("revoked" if ok else f"no active key {args.key_id}")
        return 0 if ok else 1
    keys = asyncio.run(_with_engine(settings, lambda e: list_api_keys(e, args.user, args.all)))
    for k in keys:
        state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
        print(f"{k.key_id}\t{k.user_id}\t{'admin' if k.is_admin else 'user'}\t{k.name}\t{state}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from parley.health import run

    return run(args)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from parley.health import run_dashboard

    return run_dashboard(args.port, args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run all four services in one process")
    up.add_argument("--data-dir", help="embedded stack data directory (default: PARLEY_DATA_DIR)")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=SERVICE_NAMES)
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations to DATABASE_URL")
    migrate.set_defaults(func=cmd_migrate)

    seed = sub.add_parser("seed-sales", help="load demo sales data (idempotent)")
    seed.add_argument("--days", type=int, default=730)
    seed.add_argument("--seed", type=int, default=20261121)
    seed.add_argument("--replace", action="store_true", help="replace existing demo rows")
    seed.add_argument("--data-dir")
    seed.set_defaults(func=cmd_seed_sales)

    keys = sub.add_parser("keys", help="API keys of the chat service (stored hashed)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="issue a key (printed once)")
    create.add_argument("--user", required=True)
    create.add_argument("--admin", action="store_true", help="may act for any user")
    create.add_argument("--name", default="")
    listing = keys_sub.add_parser("list", help="list keys")
    listing.add_argument("--user")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    for p in (create, listing, revoke):
        p.add_argument("--data-dir")
    keys.set_defaults(func=cmd_keys)

    for name, helptext in (("ask", "ask one question (streams the answer)"), ("chat", "interactive chat")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--addr", help="chat service address (default: PARLEY_CHAT_ADDR or 127.0.0.1:50050)")
        p.add_argument("--user", help="user id (default: PARLEY_USER or your login name)")
        p.add_argument("--session", help="session id to continue (default: a new session)")
        p.add_argument("--api-key", default=os.environ.get("PARLEY_API_KEY"),
                       help="API key or JWT when auth is on (default: PARLEY_API_KEY)")
        p.add_argument("--model", help="model to use (default: the server's default)")
        p.add_argument("--max-tokens", type=int, help="longest answer, in tokens")
        p.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
        if name == "ask":
            p.add_argument("--json", action="store_true", help="print the final response as JSON")
            p.add_argument("message", nargs="+", help="the message")
            p.set_defaults(func=cmd_ask)
        else:
            p.set_defaults(func=cmd_chat)
    from parley.health import add_arguments as add_health_arguments  # argparse only, no grpc import

    health = sub.add_parser("health", help="gRPC health check of running services (exit 0 when SERVING)")
    add_health_arguments(health)
    health.set_defaults(func=cmd_health)
    dashboard = sub.add_parser("dashboard", help="the operator dashboard (Streamlit; reads DATABASE_URL)")
    dashboard.add_argument("--port", type=int, default=8501)
    dashboard.add_argument("--address", default="127.0.0.1")
    dashboard.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
