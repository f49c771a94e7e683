"""The bot itself: a discord.py Bot that owns the generation engine and the job service."""

from __future__ import annotations

import logging

import discord
from discord.ext import commands

from generation.engine import MusicGenEngine
from generation.queue import QueueLimits
from generation.scheduling import BatchPolicy
from generation.service import JobService
from generation.store import JobStore

from .access import Access
from .config import Config
from .delivery import JobReporter
from .errors import on_app_command_error

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.music", "bot.cogs.remix", "bot.cogs.jam")


class MusicGenBot(commands.Bot):
    """Slash commands only: it needs no privileged intents."""

    service: JobService
    access: Access

    def __init__(self, config: Config) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.config = config
        device = config.generation.device
        self.engine = MusicGenEngine(
            device=None if device == "auto" else device,
            max_duration=config.generation.max_duration,
            memory_budget_gb=config.generation.memory_budget_gb,
        )

    async def setup_hook(self) -> None:
        queue, generation = self.config.queue, self.config.generation
        store = await JobStore.open(self.config.storage.database)
        self.service = JobService(
            self.engine,
            store,
            JobReporter(self),
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
        await self.service.start()

    async def close(self) -> None:
        """Stop taking jobs, let the running batch finish (or queue its jobs again), close
        the store."""
        if hasattr(self, "service"):
            await self.service.shutdown(self.config.queue.shutdown_grace)
        await super().close()

    async def sync_commands(self) -> None:
        """Sync to the configured servers (instant), or globally."""
        guilds = self.config.discord.guilds
        if not guilds:
            synced = await self.tree.sync()
            log.info("synced %d commands globally", len(synced))
            return
        for guild_id in guilds:
            guild = discord.Object(guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands to guild %d", len(synced), guild_id)


def create_bot(config: Config) -> MusicGenBot:
    """An unstarted bot; it opens its database and syncs its commands in ``setup_hook``."""
    return MusicGenBot(config)
