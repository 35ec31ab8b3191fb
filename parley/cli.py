"""The `parley` command: run the stack, and talk to it.

    parley up                      all four services in one process (embedded PostgreSQL/Redis if unset)
    parley serve <service>         one service against DATABASE_URL / REDIS_URL
    parley ask "..." [--session]   one turn, streamed
    parley chat                    interactive chat (/new, /session, /quit)
    parley migrate                 apply database migrations to DATABASE_URL
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys

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


def cmd_up(args: argparse.Namespace) -> int:
    from parley.runtime.logging import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json)
    asyncio.run(_serve_until_signalled(settings, list(SERVICE_NAMES), settings.chat_port, embedded=True))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from parley.runtime.logging import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json)
    asyncio.run(_serve_until_signalled(settings, [args.service], settings.port_of(args.service), embedded=False))
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


def cmd_ask(args: argparse.Namespace) -> int:
    from parley.client import TerminalChat

    settings = _settings(args)
    chat = TerminalChat(args.addr or settings.addr_of("chat"), args.user or _default_user(), json_output=args.json)
    return asyncio.run(chat.ask(" ".join(args.message), session_id=args.session or ""))


def cmd_chat(args: argparse.Namespace) -> int:
    from parley.client import TerminalChat

    settings = _settings(args)
    chat = TerminalChat(args.addr or settings.addr_of("chat"), args.user or _default_user())
    return asyncio.run(chat.repl(session_id=args.session or ""))


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

    for name, helptext in (("ask", "ask one question (streams the answer)"), ("chat", "interactive chat")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--addr", help="chat service address (default: PARLEY_CHAT_ADDR or 127.0.0.1:50050)")
        p.add_argument("--user", help="user id (default: PARLEY_USER or your login name)")
        p.add_argument("--session", help="session id to continue (default: a new session)")
        if name == "ask":
            p.add_argument("--json", action="store_true", help="print the final response as JSON")
            p.add_argument("message", nargs="+", help="the message")
            p.set_defaults(func=cmd_ask)
        else:
            p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
