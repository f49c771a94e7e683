"""``musicgen-bot``: ``run`` starts the Discord bot; ``generate`` makes one track offline;
``prune`` applies the retention policy to the database now.

Only the standard library and light modules load before the arguments are read: ``--help``
and argument errors answer at once, without discord.py, torch or audiocraft.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from generation import cli as generation_cli
from generation.jobs.retention import Retention
from generation.jobs.store import is_postgres

from .config import TOKEN_VARIABLE, Config, ConfigError, load_config
from .log_redaction import redact_logs
from .worker_command import NEEDS_POSTGRES, add_worker_command, serve, worker_settings

if TYPE_CHECKING:
    from generation.jobs.store import Pruned

EXAMPLE_CONFIG = "config.example.toml"

NO_TOKEN = f"""\
musicgen-bot: no Discord bot token.
  1. Open https://discord.com/developers/applications, create an application (or pick one),
     and under "Bot" press "Reset Token" to get its token.
  2. Give it to the bot in the {TOKEN_VARIABLE} environment variable:
       {TOKEN_VARIABLE}=... musicgen-bot run --config {{config}}
     {{keep_in_file}}
  3. Invite the bot with the "bot" and "applications.commands" scopes (OAuth2 > URL Generator).
"""

#: Step 2's second half: the example is tracked by git, so the token goes in a private copy.
KEEP_IN_COPY = """\
or keep it in your own configuration (git ignores config.toml):
       cp config.example.toml config.toml    # then set token = "..." under [discord]
       musicgen-bot run --config config.toml"""
KEEP_IN_FILE = 'or set token = "..." under [discord] in {config} (keep that file private).'


def add_run_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "run",
        help="start the Discord bot, generating in the same process",
        description="Start the Discord bot, generating in the same process (SQLite or PostgreSQL).",
    )
    _add_config_argument(parser)
    parser.set_defaults(handler=run_bot, command_parser=parser)


def add_gateway_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "gateway",
        help="start the Discord bot without generating (workers generate)",
        description="Start the Discord bot without generating: `musicgen-bot worker` "
        "processes sharing its PostgreSQL database generate.",
    )
    _add_config_argument(parser)
    parser.set_defaults(handler=run_gateway, command_parser=parser)


def run_gateway(args: argparse.Namespace) -> int:
    """Start a gateway: Discord, the queue and delivery; no torch in this process."""
    config = _load_config(args)
    if not is_postgres(config.storage.database):
        return _fail(f"gateway: {NEEDS_POSTGRES}")
    return run_bot(args, config=config, generates=False)


def run_worker(args: argparse.Namespace) -> int:
    """Start a generation worker and run until SIGTERM or Ctrl+C."""
    config = _load_config(args)
    if not is_postgres(config.storage.database):
        return _fail(f"worker: {NEEDS_POSTGRES}")
    try:
        settings = worker_settings(config, args.device, args.models)
    except ValueError as error:
        args.command_parser.error(str(error))
    from generation.jobs.store import StoreError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(config, settings))
    except StoreError as error:
        return _fail(str(error))
    return 0


def run_bot(
    args: argparse.Namespace, *, config: Config | None = None, generates: bool = True
) -> int:
    """Start the bot and run until it is stopped (Ctrl+C or SIGTERM); ``generates=False``
    is a gateway."""
    config = config or _load_config(args)
    if not config.discord.token:
        print(no_token_message(args.config), end="", file=sys.stderr)
        return 2

    import aiohttp
    import discord

    from generation.jobs.store import StoreError

    from . import create_bot

    try:  # a damaged database, or one in use, is reported before connecting to Discord
        asyncio.run(_check_database(config.storage.database))
    except StoreError as error:
        return _fail(str(error))
    _setup_logging()
    # At DEBUG, discord.py and aiosqlite log URLs, events and SQL with tokens in them.
    redact_logs(config.discord.token)
    # discord.py closes cleanly on KeyboardInterrupt; treat `docker stop` (SIGTERM) the same.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        create_bot(config, generates=generates).run(config.discord.token, log_handler=None)
    except discord.LoginFailure:
        return _fail(
            f"Discord refused the bot token: reset it in the Developer Portal (Bot > Reset "
            f"Token) and give the new one in {TOKEN_VARIABLE} or discord.token in {args.config}."
        )
    except aiohttp.ClientConnectionError as error:
        return _fail(f"cannot reach Discord ({error}): check the network and try again.")
    return 0


def no_token_message(config: Path) -> str:
    """How to get a token and where to put it (never in the tracked example file)."""
    keep = KEEP_IN_COPY if config.name == EXAMPLE_CONFIG else KEEP_IN_FILE.format(config=config)
    return NO_TOKEN.format(config=config, keep_in_file=keep)


def _setup_logging() -> None:
    """One handler on the root logger, coloured on a terminal; no warnings about voice."""
    import discord

    # INFO, never DEBUG: below it discord.py and aiosqlite log URLs and SQL with tokens in them.
    discord.utils.setup_logging(level=logging.INFO, root=True)
    # The bot never joins a voice channel, so the voice libraries it lacks do not matter.
    discord.VoiceClient.warn_nacl = False
    discord.VoiceClient.warn_dave = False


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="the TOML configuration (see config.example.toml); "
        "relative paths in it are relative to this file",
    )


def _load_config(args: argparse.Namespace) -> Config:
    """The ``--config`` file's configuration; a bad one ends the command (exit 2) with one
    line naming it."""
    try:
        return load_config(args.config)
    except ConfigError as error:
        args.command_parser.error(f"--config: {error}")


def _fail(message: str) -> int:
    print(f"musicgen-bot: error: {message}", file=sys.stderr)
    return 1


def add_prune_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "prune",
        help="delete what the retention policy no longer keeps",
        description="Delete the tracks, uploads and jobs older than the [storage] keep_* "
        "settings allow, and expired interaction tokens (the running bot also does it on "
        "its own, every few minutes).",
    )
    _add_config_argument(parser)
    parser.set_defaults(handler=prune_storage, command_parser=parser)


def prune_storage(args: argparse.Namespace) -> int:
    """Prune the configured database once; safe while the bot runs."""
    config = _load_config(args)
    from generation.jobs.store import StoreError

    try:
        pruned = asyncio.run(_prune(config.storage.database, config.storage.retention))
    except StoreError as error:
        return _fail(str(error))
    print(
        f"Deleted {pruned.jobs} jobs, the tracks of {pruned.results}, {pruned.uploads} "
        f"uploaded clips and {pruned.tokens} expired interaction tokens."
    )
    return 0


async def _prune(database: str, retention: Retention) -> Pruned:
    from generation.jobs.store import open_store

    # Not the owner: prune runs beside the bot, and never runs or recovers a job.
    store = await open_store(database, owner=False)
    try:
        return await store.prune(retention)
    finally:
        await store.close()


async def _check_database(database: str) -> None:
    """Refuse a damaged database, or one another bot owns, before connecting to Discord."""
    from generation.jobs.store import open_store

    store = await open_store(database)
    await store.close()


def add_migrate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "migrate",
        help="move an SQLite bot's jobs, results, uploads, settings and jams into PostgreSQL",
        description="Copy the configured SQLite database (stop the bot first) into an empty "
        "PostgreSQL database, keeping every id; then point storage.database at it.",
    )
    _add_config_argument(parser)
    parser.add_argument(
        "--to", required=True, metavar="URL", help="the PostgreSQL database: postgresql://..."
    )
    parser.set_defaults(handler=migrate_storage, command_parser=parser)


def migrate_storage(args: argparse.Namespace) -> int:
    """Move the configured SQLite database into ``--to``."""
    config = _load_config(args)
    if is_postgres(config.storage.database):
        args.command_parser.error("storage.database is PostgreSQL already: nothing to migrate.")
    if not is_postgres(args.to):
        args.command_parser.error("--to must be a postgresql:// address.")
    from generation.jobs.addresses import redacted
    from generation.jobs.store import StoreError

    try:
        moved = asyncio.run(_migrate(config, args.to))
    except StoreError as error:
        return _fail(str(error))
    counts = ", ".join(f"{count} {table}" for table, count in moved.rows.items() if count)
    print(f"Moved {counts or 'nothing'}, and {moved.results} result files.")
    print(f'Now set storage.database = "{redacted(args.to)}" and start the bot again.')
    return 0


async def _migrate(config: Config, target: str):
    from generation.jobs.store import open_store
    from generation.jobs.transfer import migrate

    # As the owner: a bot still running on the file is refused, nothing is copied half-way.
    source = await open_store(config.storage.database)
    try:
        return await migrate(source, target, max_attempts=config.queue.max_attempts)
    finally:
        await source.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    return generation_cli.main(
        argv,
        adders=[
            add_run_command,
            add_gateway_command,
            lambda commands: add_worker_command(commands, _add_config_argument, run_worker),
            add_prune_command,
            add_migrate_command,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
