"""``musicgen-bot``: ``run`` starts the Discord bot; ``generate`` makes one track offline;
``prune`` applies the retention policy to the database now."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import discord

from generation import cli as generation_cli
from generation.retention import Retention
from generation.store import JobStore, Pruned, StoreError

from .config import TOKEN_VARIABLE, ConfigError, load_config
from .log_redaction import redact_logs

NO_TOKEN = f"""\
musicgen-bot: no Discord bot token.
  1. Open https://discord.com/developers/applications, create an application (or pick one),
     and under "Bot" press "Reset Token" to get its token.
  2. Give it to the bot in the {TOKEN_VARIABLE} environment variable, or as
     token = "..." under [discord] in {{config}} (keep that file private).
  3. Invite the bot with the "bot" and "applications.commands" scopes (OAuth2 > URL Generator).
"""


def add_run_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "run", help="start the Discord bot", description="Start the Discord bot."
    )
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="the TOML configuration (see config.example.toml)",
    )
    parser.set_defaults(handler=run_bot, command_parser=parser)


def run_bot(args: argparse.Namespace) -> int:
    """Start the bot and run until it is stopped (Ctrl+C or SIGTERM)."""
    from . import create_bot

    try:
        config = load_config(args.config)
    except ConfigError as error:
        args.command_parser.error(f"--config: {error}")
    if not config.discord.token:
        print(NO_TOKEN.format(config=args.config), end="", file=sys.stderr)
        return 2
    try:  # a damaged database is reported before connecting to Discord
        asyncio.run(_check_database(config.storage.database))
    except StoreError as error:
        print(f"musicgen-bot: error: {error}", file=sys.stderr)
        return 1
    discord.utils.setup_logging(level=logging.INFO, root=True)
    # At DEBUG, discord.py and aiosqlite log URLs, events and SQL with tokens in them.
    redact_logs(config.discord.token)
    # discord.py closes cleanly on KeyboardInterrupt; treat `docker stop` (SIGTERM) the same.
    signal.signal(signal.SIGTERM, _interrupt)
    create_bot(config).run(config.discord.token, log_handler=None)
    return 0


def add_prune_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "prune",
        help="delete what the retention policy no longer keeps",
        description="Delete the tracks, uploads and jobs older than the [storage] keep_* "
        "settings allow, and expired interaction tokens (the running bot also does it on "
        "its own, every few minutes).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="the TOML configuration (see config.example.toml)",
    )
    parser.set_defaults(handler=prune_storage, command_parser=parser)


def prune_storage(args: argparse.Namespace) -> int:
    """Prune the configured database once; safe while the bot runs."""
    try:
        config = load_config(args.config)
    except ConfigError as error:
        args.command_parser.error(f"--config: {error}")
    try:
        pruned = asyncio.run(_prune(config.storage.database, config.storage.retention))
    except StoreError as error:
        print(f"musicgen-bot: error: {error}", file=sys.stderr)
        return 1
    print(
        f"Deleted {pruned.jobs} jobs, the tracks of {pruned.results}, {pruned.uploads} "
        f"uploaded clips and {pruned.tokens} expired interaction tokens."
    )
    return 0


async def _prune(path: Path, retention: Retention) -> Pruned:
    store = await JobStore.open(path)
    try:
        return await store.prune(retention)
    finally:
        await store.close()


async def _check_database(path: Path) -> None:
    store = await JobStore.open(path)
    await store.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    return generation_cli.main(argv, adders=[add_run_command, add_prune_command])


if __name__ == "__main__":
    sys.exit(main())
