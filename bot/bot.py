"""The bot itself: a discord.py Bot that owns the generation engine and the job service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import astuple
from typing import Any

import discord
from discord.ext import commands, tasks

from generation.engine.musicgen import MusicGenEngine
from generation.jobs.job import QueueLimits
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.service import JobService
from generation.jobs.store import open_store

from .access import Access
from .config import Config
from .delivery import JobReporter
from .errors import on_app_command_error

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.music", "bot.cogs.remix", "bot.cogs.jam")
#: How often the running bot applies the retention policy and forgets expired tokens.
PRUNE_INTERVAL_MINUTES = 10


class MusicGenBot(commands.Bot):
    """Slash commands only: it needs no privileged intents."""

    service: JobService
    reporter: JobReporter
    access: Access

    def __init__(self, config: Config, **options: Any) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.config = config
        self._recovering = False
        device = config.generation.device
        self.engine = MusicGenEngine(
            device=None if device == "auto" else device,
            max_duration=config.generation.max_duration,
            memory_budget_gb=config.generation.memory_budget_gb,
        )

    async def setup_hook(self) -> None:
        queue, generation = self.config.queue, self.config.generation
        store = await open_store(self.config.storage.database)
        self.reporter = JobReporter(self, queue.progress_interval)
        self.service = JobService(
            self.engine,
            store,
            self.reporter,
            limits=QueueLimits(queue.max_jobs_per_user, queue.max_jobs_per_guild),
            hourly_limit=queue.max_jobs_per_user_per_hour,
            max_attempts=queue.max_attempts,
            progress_interval=queue.progress_interval,
            job_timeout=queue.job_timeout,
            batch_policy=BatchPolicy(
                generation.max_batch, queue.max_model_wait, generation.batch_window
            ),
        )
        self.access = Access(store, self.config)
        self.tree.on_error = on_app_command_error
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.sync_commands()

    async def on_ready(self) -> None:
        """Once connected (the bot shows online at once), recover the last run's jobs; until
        then new requests are told to come back in a few seconds (see
        :meth:`JobService.start`). Runs once: ``on_ready`` also follows a reconnection."""
        if self._recovering:
            return
        self._recovering = True
        try:
            await self.service.start()
        except Exception:  # as a failed start-up did: stop, rather than refuse every request
            log.exception("recovering the jobs of the last run failed: stopping")
            await self.close()
            return
        log.info("picked up the jobs of the last run")
        self.prune.start()

    async def close(self) -> None:
        """Stop taking jobs, let the running batch finish (or queue its jobs again), close
        the store."""
        if self.prune.is_running():
            self.prune.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.prune.get_task()
        if hasattr(self, "service"):
            await self.service.shutdown(self.config.queue.shutdown_grace)
        await super().close()

    @tasks.loop(minutes=PRUNE_INTERVAL_MINUTES)
    async def prune(self) -> None:
        """Apply the retention policy (the store deletes files on a thread), at start-up and
        then every :data:`PRUNE_INTERVAL_MINUTES`; a failure waits for the next round.

        Time is Discord's (``utcnow``), the clock interaction tokens expire by."""
        try:
            pruned = await self.service.store.prune(
                self.config.storage.retention, now=discord.utils.utcnow().timestamp()
            )
        except Exception:
            log.exception("pruning the database failed (tried again later)")
            return
        if any(astuple(pruned)):
            log.info(
                "pruned: %d jobs, the tracks of %d, %d uploaded clips, %d expired tokens",
                pruned.jobs,
                pruned.results,
                pruned.uploads,
                pruned.tokens,
            )

    async def sync_commands(self) -> None:
        """Sync to the configured servers (instant), or globally."""
        guilds = self.config.discord.guilds
        if not guilds:
            synced = await self.tree.sync()
            log.info(
                "synced %d commands globally: Discord can take up to an hour to show them; "
                "list your servers in discord.guilds to have them at once",
                len(synced),
            )
            return
        for guild_id in guilds:
            guild = discord.Object(guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands to guild %d", len(synced), guild_id)


class ShardedMusicGenBot(MusicGenBot, commands.AutoShardedBot):
    """The same bot on discord.py's shard manager: ``discord.shard_count`` gateway connections
    in this process ("auto": as many as Discord recommends), for bots in many servers."""

    def __init__(self, config: Config) -> None:
        count = config.discord.shard_count
        super().__init__(config, shard_count=None if count == "auto" else count)


def create_bot(config: Config) -> MusicGenBot:
    """An unstarted bot, sharded if ``discord.shard_count`` is set; it opens its database and
    syncs its commands in ``setup_hook``, and recovers its jobs once connected."""
    if config.discord.shard_count is None:
        return MusicGenBot(config)
    return ShardedMusicGenBot(config)
