"""/music: generate, queue, cancel, models, help, and the admin pause and resume."""

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from generation.audio_input import AudioLimits, check_size, decode_audio
from generation.errors import AudioInputError, GenerationError, InvalidOption, JobNotFound
from generation.models import resolve_model
from generation.queue import FairQueue, Job, JobStatus, QueueLimits
from generation.request import (
    MAX_CFG_COEF,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    WINDOW_SECONDS,
    AudioClip,
    GenerationRequest,
)
from generation.worker import Worker

from .. import presentation
from ..delivery import JobReporter
from ..errors import reply_privately, user_message

if TYPE_CHECKING:
    from ..bot import MusicGenBot

log = logging.getLogger(__name__)

DEFAULTS = GenerationRequest(prompt="", model="")
#: Seconds to read uploads before deferring the response (Discord's deadline is 3 s).
ACKNOWLEDGE_WITHIN = 2.0


class Music(commands.Cog):
    """Members make music; one worker serves every server in turn."""

    music = app_commands.Group(
        name="music", description="Make music with MusicGen", guild_only=True
    )
    admin = app_commands.Group(
        name="admin", description="Server controls (Manage Server)", parent=music
    )

    def __init__(self, bot: "MusicGenBot") -> None:
        self.bot = bot
        config = bot.config
        self.models: tuple[str, ...] = config.generation.models
        self.upload_limits = AudioLimits(
            max_bytes=int(config.generation.max_upload_mib * 2**20),
            max_seconds=config.generation.max_duration,
        )
        self.queue = FairQueue(
            QueueLimits(config.queue.max_jobs_per_user, config.queue.max_jobs_per_guild)
        )
        self.reporter = JobReporter(bot)
        self.worker = Worker(
            bot.engine,
            self.queue,
            self.reporter,
            progress_interval=config.queue.progress_interval,
        )
        self.music.add_command(generate_command(self, self.models, config.generation.max_duration))

    async def cog_load(self) -> None:
        # Load the default model now, so the first member does not wait for it.
        preload = self.worker.run_blocking(lambda: self.bot.engine.load(self.models[0]))
        preload.add_done_callback(_log_preload_failure)

    async def cog_unload(self) -> None:
        self.worker.close()

    async def generate(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        uploads: dict[str, discord.Attachment | None],
    ) -> None:
        """Check the request, read its uploads, and queue it.

        Everything that can be checked at once is, so a mistake gets a private answer; the
        response is deferred (publicly) only if the uploads take long to read.
        """
        guild_id, channel_id = interaction.guild_id, interaction.channel_id
        assert guild_id is not None and channel_id is not None
        user_id = interaction.user.id
        try:
            request = request.with_seed()
            self.bot.engine.validate(request)
            self.queue.check_room(guild_id, user_id)
            clips = await self._read_uploads_in_time(interaction, uploads)
            request = replace(request, **clips)
            self.bot.engine.validate(request)
            job = self.queue.submit(
                request, guild_id=guild_id, channel_id=channel_id, user_id=user_id
            )
        except GenerationError as error:
            await reply_privately(interaction, user_message(error))
            return
        log.info(
            "job %d queued: guild %d, user %d, %s, %.0f s",
            job.id,
            guild_id,
            user_id,
            request.model,
            request.duration,
        )
        self.reporter.track(job, interaction)
        status = presentation.queued_text(
            job, self.queue.position(job), self.worker.eta(job), self.queue.is_paused(guild_id)
        )
        if interaction.response.is_done():
            await interaction.edit_original_response(content=status)
        else:
            await interaction.response.send_message(status)
        self.worker.wake()

    async def _read_uploads_in_time(
        self, interaction: discord.Interaction, uploads: dict[str, discord.Attachment | None]
    ) -> dict[str, AudioClip]:
        """Read the uploads, deferring the response if that outlasts Discord's 3 s deadline."""
        for option, attachment in uploads.items():
            if attachment is not None:
                try:
                    check_size(attachment.size, self.upload_limits, option)
                except AudioInputError as error:
                    raise InvalidOption(option, str(error)) from error
        reading = asyncio.ensure_future(self._read_uploads(uploads))
        done, _ = await asyncio.wait({reading}, timeout=ACKNOWLEDGE_WITHIN)
        if not done:
            await interaction.response.defer(thinking=True)
        return await reading

    async def _read_uploads(
        self, uploads: dict[str, discord.Attachment | None]
    ) -> dict[str, AudioClip]:
        """Read each attachment at once (their URLs expire), size checked first."""
        clips = {}
        loop = asyncio.get_running_loop()
        for option, attachment in uploads.items():
            if attachment is None:
                continue
            try:
                data = await attachment.read()
                clips[option] = await loop.run_in_executor(
                    None, decode_audio, data, self.upload_limits, option
                )
            except AudioInputError as error:
                raise InvalidOption(option, str(error)) from error
            except discord.HTTPException as error:
                raise InvalidOption(
                    option, f"Could not download the {option} attachment; try again."
                ) from error
        return clips

    @music.command(name="queue", description="This server's queue and the job running now")
    async def show_queue(self, interaction: discord.Interaction) -> None:
        guild_id = interaction.guild_id
        running = self.queue.running
        if running is not None and running.guild_id != guild_id:
            running = None
        queued = [
            (job, self.queue.position(job), self.worker.eta(job))
            for job in self.queue.queued(guild_id)
        ]
        embed = presentation.queue_embed(running, queued, self.queue.is_paused(guild_id))
        await interaction.response.send_message(
            embed=embed, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
        )

    @music.command(name="cancel", description="Cancel your queued or running job")
    @app_commands.describe(job="The job number (default: your latest); Manage Server: anyone's")
    async def cancel(
        self, interaction: discord.Interaction, job: app_commands.Range[int, 1] | None = None
    ) -> None:
        target = self._job_to_cancel(interaction, job)
        if self.worker.cancel(target):
            await self.reporter.job_cancelled(target)
            await interaction.response.send_message(f"Cancelled job #{target.id}.", ephemeral=True)
        else:
            await interaction.response.send_message(f"Stopping job #{target.id}...", ephemeral=True)

    def _job_to_cancel(self, interaction: discord.Interaction, job_id: int | None) -> Job:
        mine = interaction.user.id
        if job_id is None:
            own = [job for job in self._live_jobs(interaction.guild_id) if job.user_id == mine]
            if not own:
                raise JobNotFound("You have no queued or running job in this server.")
            return own[-1]
        job = self.queue.get(job_id)
        if job.guild_id != interaction.guild_id:
            raise JobNotFound(f"There is no queued or running job #{job_id} in this server.")
        if job.user_id != mine and not interaction.permissions.manage_guild:
            raise JobNotFound(
                f"Job #{job_id} is not yours: only members with Manage Server can cancel it."
            )
        if job.status is JobStatus.RUNNING and job.cancel_event.is_set():
            raise JobNotFound(f"Job #{job_id} is already stopping.")
        return job

    def _live_jobs(self, guild_id: int | None) -> list[Job]:
        running = self.queue.running
        live = [running] if running is not None and running.guild_id == guild_id else []
        return live + self.queue.queued(guild_id or 0)

    @music.command(name="models", description="The models you can pick, and what each can do")
    async def show_models(self, interaction: discord.Interaction) -> None:
        specs = [resolve_model(name) for name in self.models]
        await interaction.response.send_message(
            embed=presentation.models_embed(specs), ephemeral=True
        )

    @music.command(name="help", description="What each option does, and tips")
    async def show_help(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(embed=presentation.help_embed(), ephemeral=True)

    @admin.command(name="pause", description="Stop starting jobs from this server's queue")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def pause(self, interaction: discord.Interaction) -> None:
        self.queue.pause(interaction.guild_id)
        log.info("guild %d paused by %d", interaction.guild_id, interaction.user.id)
        await interaction.response.send_message(
            "Paused: queued jobs stay queued and members can still queue new ones; "
            "none starts until `/music admin resume`."
        )

    @admin.command(name="resume", description="Start jobs from this server's queue again")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def resume(self, interaction: discord.Interaction) -> None:
        self.queue.resume(interaction.guild_id)
        log.info("guild %d resumed by %d", interaction.guild_id, interaction.user.id)
        await interaction.response.send_message("Resumed: queued jobs will start again.")
        self.worker.wake()


def generate_command(cog: Music, models: tuple[str, ...], max_duration: float):
    """/music generate, with the enabled models as choices and the configured longest duration.

    Built per bot because both come from the configuration; Discord enforces the declared
    ranges in the client, and the engine checks them again.
    """
    default_duration = min(DEFAULTS.duration, max_duration)

    @app_commands.command(name="generate", description="Generate music from a prompt")
    @app_commands.describe(**presentation.OPTION_HELP)
    @app_commands.choices(model=[app_commands.Choice(name=name, value=name) for name in models])
    async def generate(
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        model: str | None = None,
        duration: app_commands.Range[float, 1.0, max_duration] = default_duration,
        temperature: app_commands.Range[float, 0.0, 2.0] = DEFAULTS.temperature,
        top_k: app_commands.Range[int, 0, 2048] = DEFAULTS.top_k,
        top_p: app_commands.Range[float, 0.0, 1.0] = DEFAULTS.top_p,
        cfg_coef: app_commands.Range[float, 0.0, MAX_CFG_COEF] = DEFAULTS.cfg_coef,
        no_sampling: bool = False,
        melody: discord.Attachment | None = None,
        continuation: discord.Attachment | None = None,
        two_step_cfg: bool = DEFAULTS.two_step_cfg,
        extend_stride: app_commands.Range[float, 1.0, WINDOW_SECONDS - 1] = DEFAULTS.extend_stride,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
    ) -> None:
        request = GenerationRequest(
            prompt=prompt,
            model=model or models[0],
            duration=duration,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cfg_coef=cfg_coef,
            use_sampling=not no_sampling,
            two_step_cfg=two_step_cfg,
            extend_stride=extend_stride,
            seed=seed,
        )
        await cog.generate(interaction, request, {"melody": melody, "continuation": continuation})

    return generate


def _log_preload_failure(future: "asyncio.Future[object]") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("could not preload the default model: %s", future.exception())


async def setup(bot: "MusicGenBot") -> None:
    await bot.add_cog(Music(bot))
