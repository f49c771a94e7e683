"""The bot itself: a discord.py Bot that owns the job service, and, when it generates too
(``musicgen-bot run``), a generation worker in its own process.

A gateway (``musicgen-bot gateway``) only talks to Discord and the store; it never imports
torch: the worker is imported only when this process generates."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import astuple
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands, tasks

from generation.jobs.job import QueueLimits
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.service import JobService
from generation.jobs.store import JobStore, is_postgres, open_store

from .access import Access
from .config import Config

if TYPE_CHECKING:
    from generation.jobs.worker import Worker
from .delivery import JobReporter
from .errors import on_app_command_error

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.music", "bot.cogs.remix", "bot.cogs.jam")
#: How often the running bot applies the retention policy and forgets expired tokens.
PRUNE_INTERVAL_MINUTES = 10
#: How often the job service and the worker look at the store without a notification.
TICK_SECONDS = 5.0


class MusicGenBot(commands.Bot):
    """Slash commands only: it needs no privileged intents."""

    service: JobService
    reporter: JobReporter
    access: Access

    def __init__(
        self,
        config: Config,
        *,
        generates: bool = True,
        store: JobStore | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.config = config
        self.generates = generates
        self._store = store
        #: The generation worker in this process (``run``), once started.
        self.worker: Worker | None = None
        self._recovering = False

    async def setup_hook(self) -> None:
        queue, generation = self.config.queue, self.config.generation
        database = self.config.storage.database
        store = self._store or await open_store(database)
        self.reporter = JobReporter(self, queue.progress_interval)
        self.service = JobService(
            store,
            self.reporter,
            limits=QueueLimits(queue.max_jobs_per_user, queue.max_jobs_per_guild),
            hourly_limit=queue.max_jobs_per_user_per_hour,
            max_attempts=queue.max_attempts,
            batch_policy=self.batch_policy,
            # One process owns an SQLite database: what it had running died with it.
            recover_running=not is_postgres(database),
            device="cpu" if generation.device == "auto" else generation.device,
            lease_seconds=queue.lease_seconds,
        )
        self.access = Access(store, self.config)
        self.tree.on_error = on_app_command_error
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.sync_commands()

    @property
    def batch_policy(self) -> BatchPolicy:
        generation = self.config.generation
        return BatchPolicy(
            generation.max_batch, self.config.queue.max_model_wait, generation.batch_window
        )

    async def on_ready(self) -> None:
        """Once connected (the bot shows online at once), recover the last run's jobs; until
        then new requests are told to come back in a few seconds (see
        :meth:`JobService.start`). Runs once: ``on_ready`` also follows a reconnection."""
        if self._recovering:
            return
        self._recovering = True
        try:
            await self.service.start(discord.utils.utcnow().timestamp())
            if self.generates:
                await self._start_worker()
        except Exception:  # as a failed start-up did: stop, rather than refuse every request
            log.exception("recovering the jobs of the last run failed: stopping")
            await self.close()
            return
        log.info("picked up the jobs of the last run")
        self.prune.start()
        # Often enough that an in-process worker's heartbeats keep its leases.
        self.tick.change_interval(seconds=min(TICK_SECONDS, self.config.queue.lease_seconds / 4))
        self.tick.start()

    async def _start_worker(self) -> None:
        from generation.jobs.serving import WorkerSettings, start_worker  # torch

        generation, queue = self.config.generation, self.config.queue
        settings = WorkerSettings(
            device=generation.device,
            models=generation.models,
            max_duration=generation.max_duration,
            memory_budget_gb=generation.memory_budget_gb,
            precision=generation.precision,
            batch_policy=self.batch_policy,
            max_attempts=queue.max_attempts,
            progress_interval=queue.progress_interval,
            job_timeout=queue.job_timeout,
            leases=WorkerSettings.leases_of(queue.lease_seconds),
        )
        self.worker = await start_worker(self.service.store, settings)

    async def close(self) -> None:
        """Stop taking jobs, let the running batch finish (or queue its jobs again), close
        the store."""
        for loop in (self.prune, self.tick):
            if loop.is_running():
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop.get_task()
        if self.worker is not None:
            await self.worker.stop(self.config.queue.shutdown_grace)
        if hasattr(self, "service"):
            await self.service.shutdown()
        await super().close()

    @tasks.loop(seconds=TICK_SECONDS)
    async def tick(self) -> None:
        """Look at the store now and then, whatever notifications said: jobs other
        processes started or ended, leases to renew and expired ones to take back."""
        await self.service.watcher.tick()
        if self.worker is not None:
            await self.worker.tick()

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

    def __init__(
        self, config: Config, *, generates: bool = True, store: JobStore | None = None
    ) -> None:
        count = config.discord.shard_count
        super().__init__(
            config,
            generates=generates,
            store=store,
            shard_count=None if count == "auto" else count,
        )


def create_bot(
    config: Config, *, generates: bool = True, store: JobStore | None = None
) -> MusicGenBot:
    """An unstarted bot, sharded if ``discord.shard_count`` is set; it opens its database
    (unless given an open ``store``, which it then owns) and syncs its commands in
    ``setup_hook``, and recovers its jobs once connected. ``generates=False`` is a gateway:
    workers in other processes generate."""
    kind = MusicGenBot if config.discord.shard_count is None else ShardedMusicGenBot
    return kind(config, generates=generates, store=store)
