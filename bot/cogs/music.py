"""/music: generate, queue, cancel, history, show, models, help, and the admin commands."""

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from generation.audio.input import AudioLimits, check_size, decode_upload
from generation.audio.loop import MAX_LOOP_BARS
from generation.engine.models import resolve_model
from generation.errors import (
    AudioInputError,
    GenerationError,
    InvalidOption,
    JobNotFound,
)
from generation.jobs.job import Job, JobStatus, ReplyAddress
from generation.jobs.store import GuildSettings
from generation.origin import Origin
from generation.request import (
    DECODERS,
    MAX_CFG_COEF,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    WINDOW_SECONDS,
    AudioClip,
    GenerationRequest,
    check_audio_options,
    validate_request,
)

from .. import limits, presentation
from ..access import Rules, may_manage, rules_for
from ..delivery import result_message
from ..errors import answering, reply_privately, user_message
from ..views import CancelButton, status_view

if TYPE_CHECKING:
    from ..bot import MusicGenBot

log = logging.getLogger(__name__)

DEFAULTS = GenerationRequest(prompt="", model="")
HISTORY_LENGTH = 10
#: Recent jobs an autocomplete looks through for what the member typed.
CHOICES_SCANNED = 100


class Music(commands.Cog):
    """Members make music; the servers take turns in the queue, whatever the workers."""

    music = app_commands.Group(
        name="music", description="Make music with MusicGen", guild_only=True
    )
    admin = app_commands.Group(
        name="admin", description="Server controls (Manage Server)", parent=music
    )

    def __init__(self, bot: "MusicGenBot") -> None:
        self.bot = bot
        self.service = bot.service
        self.store = bot.service.store
        config = bot.config
        self.models: tuple[str, ...] = config.generation.models
        self.max_duration = config.generation.max_duration
        self.upload_limits = AudioLimits(
            max_bytes=int(config.generation.max_upload_mib * 2**20),
            max_seconds=config.generation.max_duration,
        )
        self.music.add_command(generate_command(self))
        self.admin.add_command(settings_command(self))

    def validate(self, request: GenerationRequest) -> None:
        """Check ``request`` as the engine will (the gateway has no engine of its own).

        Raises:
            InvalidOption: naming the option at fault.
        """
        validate_request(request, resolve_model(request.model), max_duration=self.max_duration)

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(CancelButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(CancelButton)

    # /music generate

    async def generate(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        uploads: dict[str, discord.Attachment | None],
    ) -> None:
        """Queue a /music generate request with its uploads (read once it is checked)."""

        async def with_uploads(request: GenerationRequest) -> GenerationRequest:
            self.validate(request)
            clips = await self._read_uploads_in_time(interaction, request, uploads)
            return replace(request, **clips)

        await self.queue_request(
            interaction, request, prepare=with_uploads, melody=uploads.get("melody") is not None
        )

    async def queue_request(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        *,
        prepare: Callable[[GenerationRequest], Awaitable[GenerationRequest]] | None = None,
        note: str = "",
        takes: int = 1,
        origin: Origin | None = None,
        melody: bool = False,
    ) -> Job | None:
        """Check a request against the server's settings and the member's limits, and queue it.

        Everything that can be checked at once is, so a mistake gets a private answer;
        ``prepare`` then completes the request (it may defer the response and read audio),
        and the result is checked again. ``note`` is added to the queued message; ``takes``
        variations are generated together; ``origin`` says what the job was made from;
        ``melody``: ``prepare`` adds a melody, so the model must follow one (with no model
        picked, the server's melody model is used). Returns the job, or None when the member
        was told why it was not queued.
        """
        user_id = interaction.user.id
        try:
            rules = await self.bot.access.check(interaction)
            guild_id, channel_id = interaction.guild_id or 0, interaction.channel_id or 0
            if melody:
                request, picked = _with_melody_model(request, rules)
                note = " ".join(part for part in (picked, note) if part)
            request = _apply_rules(request, rules).with_seed()
            await self.service.check_room(guild_id, user_id, rules.max_jobs_per_user)
            if prepare is not None:
                request = _apply_rules(await prepare(request), rules)
            self.validate(request)
            job = await self.service.submit(
                request,
                guild_id=guild_id,
                channel_id=channel_id,
                user_id=user_id,
                per_user_limit=rules.max_jobs_per_user,
                takes=takes,
                origin=origin,
            )
        except GenerationError as error:
            await reply_privately(interaction, user_message(error))
            return None
        reply = None
        try:
            reply = await self._acknowledge(interaction, job, note)
        finally:
            await self.service.release(job, reply)
        return job

    async def _read_uploads_in_time(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        uploads: dict[str, discord.Attachment | None],
    ) -> dict[str, AudioClip]:
        """Check the uploads against the model and their sizes, then defer the response
        (downloading may outlast Discord's 3 s deadline) and read them."""
        given = {option: attachment for option, attachment in uploads.items() if attachment}
        if not given:
            return {}
        check_audio_options(
            resolve_model(request.model),
            melody="melody" in given,
            continuation="continuation" in given,
        )
        for option, attachment in given.items():
            try:
                check_size(attachment.size, self.upload_limits, option)
            except AudioInputError as error:
                raise InvalidOption(option, str(error)) from error
        await interaction.response.defer(thinking=True)
        return await self.read_uploads(given)

    async def read_uploads(self, uploads: dict[str, discord.Attachment]) -> dict[str, AudioClip]:
        """Download each attachment at once (their URLs expire), once there is room to
        decode it, and decode it off the loop."""
        clips = {}
        for option, attachment in uploads.items():
            try:
                clips[option] = await decode_upload(attachment.read, self.upload_limits, option)
            except AudioInputError as error:
                raise InvalidOption(option, str(error)) from error
            except discord.HTTPException as error:
                raise InvalidOption(
                    option, f"Could not download the {option} attachment; try again."
                ) from error
        return clips

    async def _acknowledge(
        self, interaction: discord.Interaction, job: Job, note: str = ""
    ) -> ReplyAddress:
        """Answer with the job's place in the queue and a Cancel button; returns where to
        reach the member."""
        estimate = await self.service.estimate(job)
        status = presentation.queued_text(job, estimate)
        if note:
            status = limits.fit_content(f"{note}\n{status}")
        view = status_view(job.id)
        if interaction.response.is_done():
            message = await interaction.edit_original_response(content=status, view=view)
            message_id = message.id
        else:
            callback = await interaction.response.send_message(status, view=view)
            message_id = callback.message_id
        self.bot.reporter.acknowledged(job, note, status)
        return ReplyAddress(
            application_id=interaction.application_id,
            token=interaction.token,
            expires_at=interaction.expires_at.timestamp(),
            message_id=message_id,
            max_upload_bytes=interaction.filesize_limit,
        )

    # Queue and jobs

    @music.command(name="queue", description="This server's queue and the job running now")
    async def show_queue(self, interaction: discord.Interaction) -> None:
        guild_id = interaction.guild_id
        running = [job for job in await self.store.running() if job.guild_id == guild_id]
        queued = [
            (job, await self.service.estimate(job)) for job in await self.store.queued(guild_id)
        ]
        paused = guild_id in await self.store.paused_guilds()
        embed = presentation.queue_embed(running, queued, paused)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @music.command(name="cancel", description="Cancel your queued or running job")
    @app_commands.describe(job="The job number (default: your latest); Manage Server: anyone's")
    async def cancel(
        self, interaction: discord.Interaction, job: app_commands.Range[int, 1] | None = None
    ) -> None:
        await self._cancel(interaction, job)

    async def cancel_from_button(self, interaction: discord.Interaction, job_id: int) -> None:
        """The Cancel button under a job's status message."""
        async with answering(interaction):
            await self._cancel(interaction, job_id)

    async def _cancel(self, interaction: discord.Interaction, job_id: int | None) -> None:
        target = await self._job_to_cancel(interaction, job_id)
        if await self.service.cancel(target):
            message = f"Cancelled job #{target.id}."
        else:
            message = f"Stopping job #{target.id}..."
        await interaction.response.send_message(message, ephemeral=True)

    @cancel.autocomplete("job")
    async def cancel_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[int]]:
        """The member's queued and running jobs (Manage Server: everyone's) matching what
        they typed."""
        jobs = [
            job
            for job in await self._live_jobs(interaction.guild_id)
            if may_manage(interaction, job.user_id)
        ]
        return self._choices(interaction, jobs, current)

    async def _job_to_cancel(self, interaction: discord.Interaction, job_id: int | None) -> Job:
        mine = interaction.user.id
        if job_id is None:
            live = await self._live_jobs(interaction.guild_id)
            own = [job for job in live if job.user_id == mine]
            if not own:
                raise JobNotFound("You have no queued or running job in this server.")
            return own[-1]
        job = await self.store.get(job_id)
        if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise JobNotFound(f"There is no queued or running job #{job_id}.")
        if job.guild_id != interaction.guild_id:
            raise JobNotFound(f"There is no queued or running job #{job_id} in this server.")
        if not may_manage(interaction, job.user_id):
            raise JobNotFound(
                f"Job #{job_id} is not yours: only members with Manage Server can cancel it."
            )
        return job

    async def _live_jobs(self, guild_id: int | None) -> list[Job]:
        """A server's running jobs, then its queued ones in order (at most the server's
        queue limit: both reads go through indexes)."""
        running = [job for job in await self.store.running() if job.guild_id == guild_id]
        return running + await self.store.queued(guild_id or 0)

    @music.command(name="history", description="Your recent tracks in this server")
    async def history(self, interaction: discord.Interaction) -> None:
        jobs = await self.store.history(interaction.guild_id, interaction.user.id, HISTORY_LENGTH)
        await interaction.response.send_message(
            embed=presentation.history_embed(jobs), ephemeral=True
        )

    @music.command(name="show", description="Post a past track again, with its parameters")
    @app_commands.describe(job="The job number (see /music history)")
    async def show(self, interaction: discord.Interaction, job: app_commands.Range[int, 1]) -> None:
        await self.bot.access.check(interaction)
        found = await self.store.get(job)
        if found is None or found.guild_id != interaction.guild_id:
            raise JobNotFound(f"There is no job #{job} in this server.")
        if found.status is not JobStatus.DONE:
            raise JobNotFound(f"Job #{job} has no track: it is {found.status.value}.")
        results = await self.service.watcher.stored_results(found)
        await interaction.response.defer(thinking=True)
        posted = await result_message(found, results, interaction.filesize_limit, complete=True)
        await interaction.followup.send(
            content=f"Job #{found.id} by <@{found.user_id}>",
            embed=posted.embed,
            files=posted.files,
            view=posted.view,
        )

    @show.autocomplete("job")
    async def show_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[int]]:
        """The member's recent tracks (Manage Server: the server's) matching what they typed;
        one indexed query of at most :data:`CHOICES_SCANNED` rows."""
        member = None if interaction.permissions.manage_guild else interaction.user.id
        jobs = await self.store.finished_jobs(interaction.guild_id or 0, member, CHOICES_SCANNED)
        return self._choices(interaction, jobs, current)

    @staticmethod
    def _choices(
        interaction: discord.Interaction, jobs: list[Job], current: str
    ) -> list[app_commands.Choice[int]]:
        guild = interaction.guild

        def owner(user_id: int) -> str | None:
            if user_id == interaction.user.id:
                return None
            member = guild.get_member(user_id) if guild is not None else None
            return member.display_name if member is not None else "another member"

        return [
            app_commands.Choice(name=presentation.job_choice(job, owner(job.user_id)), value=job.id)
            for job in presentation.matching_jobs(jobs, current)
        ]

    # Information

    @music.command(name="models", description="The models you can pick, and what each can do")
    async def show_models(self, interaction: discord.Interaction) -> None:
        rules = await self.bot.access.rules(interaction.guild_id or 0)
        specs = [resolve_model(name) for name in rules.models]
        await interaction.response.send_message(
            embed=presentation.models_embed(specs, rules.default_model or ""), ephemeral=True
        )

    @music.command(name="help", description="What each option does, and tips")
    async def show_help(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(embed=presentation.help_embed(), ephemeral=True)

    # Admin

    @admin.command(name="pause", description="Stop starting jobs from this server's queue")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def pause(self, interaction: discord.Interaction) -> None:
        await self._set_paused(interaction, paused=True)
        await interaction.response.send_message(
            "Paused: queued jobs stay queued and members can still queue new ones; "
            "none starts until `/music admin resume`."
        )

    @admin.command(name="resume", description="Start jobs from this server's queue again")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def resume(self, interaction: discord.Interaction) -> None:
        await self._set_paused(interaction, paused=False)
        await interaction.response.send_message("Resumed: queued jobs will start again.")

    async def _set_paused(self, interaction: discord.Interaction, *, paused: bool) -> None:
        guild_id = interaction.guild_id
        settings = await self.store.guild_settings(guild_id)
        await self.store.save_guild_settings(replace(settings, paused=paused))
        log.info(
            "guild %d %s by %d", guild_id, "paused" if paused else "resumed", interaction.user.id
        )

    async def update_settings(
        self, interaction: discord.Interaction, changes: dict[str, object]
    ) -> None:
        """Apply /music admin settings; with no changes, show the current settings."""
        guild_id = interaction.guild_id
        settings = await self.store.guild_settings(guild_id)
        if changes:
            settings = self._changed_settings(settings, changes)
            await self.store.save_guild_settings(settings)
            log.info("guild %d settings changed by %d", guild_id, interaction.user.id)
        await interaction.response.send_message(
            embed=presentation.settings_embed(
                settings, rules_for(settings, self.bot.config), self.bot.config
            ),
            ephemeral=True,
        )

    def _changed_settings(
        self, settings: GuildSettings, changes: dict[str, object]
    ) -> GuildSettings:
        if changes.pop("reset", False):
            settings = GuildSettings(settings.guild_id, paused=settings.paused)
        if "allowed_models" in changes:
            text = str(changes.pop("allowed_models")).strip()
            names = (
                ()
                if text.lower() == "all"
                else tuple(name.strip() for name in text.split(",") if name.strip())
            )
            unknown = [name for name in names if name not in self.models]
            if unknown or (text.lower() != "all" and not names):
                raise InvalidOption(
                    "allowed_models",
                    f"List models from {', '.join(self.models)} separated by commas, or 'all'.",
                )
            settings = replace(settings, allowed_models=names)
        channels = list(settings.allowed_channels)
        if (channel := changes.pop("allow_channel", None)) is not None:
            channels.append(channel.id)
        if (channel := changes.pop("disallow_channel", None)) is not None:
            channels = [existing for existing in channels if existing != channel.id]
        settings = replace(settings, allowed_channels=tuple(dict.fromkeys(channels)), **changes)
        if (
            settings.default_model is not None
            and settings.default_model not in rules_for(settings, self.bot.config).models
        ):
            raise InvalidOption(
                "default_model", "The default model must be one of the allowed models."
            )
        return settings

    @music.command(name="stats", description="How the bot is doing (Manage Server)")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def stats(self, interaction: discord.Interaction) -> None:
        guild_id = interaction.guild_id
        worker = self.bot.worker
        embed = presentation.stats_embed(
            await self.store.stats(guild_id),
            queued_here=len(await self.store.queued(guild_id)),
            queued_everywhere=await self.store.queue_length(),
            # A worker silent for a lease has lost its jobs: it is no longer listed.
            workers=await self.store.workers(time.time() - self.bot.config.queue.lease_seconds),
            memory=worker.generator.memory_in_use() if worker is not None else {},
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)


def generate_command(cog: Music) -> app_commands.Command:
    """/music generate, with the enabled models as choices and the configured longest duration.

    Built per bot because both come from the configuration; Discord enforces the declared
    ranges in the client, and the engine checks them again.
    """
    models, max_duration = cog.models, cog.max_duration
    default_duration = min(DEFAULTS.duration, max_duration)

    @app_commands.command(name="generate", description="Generate music from a prompt")
    @app_commands.describe(**presentation.OPTION_HELP)
    @app_commands.choices(
        model=[app_commands.Choice(name=name, value=name) for name in models],
        decoder=[
            app_commands.Choice(name=presentation.DECODER_NAMES[name], value=name)
            for name in DECODERS
        ],
    )
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
        loop: app_commands.Range[int, 1, MAX_LOOP_BARS] | None = None,
        decoder: str = DEFAULTS.decoder,
    ) -> None:
        request = GenerationRequest(
            prompt=prompt,
            model=model or "",  # empty: the server's default model
            duration=duration,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cfg_coef=cfg_coef,
            use_sampling=not no_sampling,
            two_step_cfg=two_step_cfg,
            extend_stride=extend_stride,
            seed=seed,
            loop=loop or 0,
            decoder=decoder,
        )
        await cog.generate(interaction, request, {"melody": melody, "continuation": continuation})

    return generate


def settings_command(cog: Music) -> app_commands.Command:
    """/music admin settings, with the enabled models as choices for the default."""
    models, max_duration = cog.models, cog.max_duration

    @app_commands.command(name="settings", description="This server's settings (Manage Server)")
    @app_commands.describe(
        default_model="The model used when a member picks none",
        allowed_models="Models members may pick, separated by commas, or 'all'",
        max_duration="Longest track members may ask for, in seconds",
        max_jobs_per_user="Queued or running jobs one member may have",
        allow_channel="Allow music commands in this channel (then only in allowed ones)",
        disallow_channel="Stop allowing music commands in this channel",
        reset="Back to the bot's defaults (pause state kept)",
    )
    @app_commands.choices(
        default_model=[app_commands.Choice(name=name, value=name) for name in models]
    )
    @app_commands.checks.has_permissions(manage_guild=True)
    async def settings(
        interaction: discord.Interaction,
        default_model: str | None = None,
        allowed_models: str | None = None,
        max_duration: app_commands.Range[float, 1.0, max_duration] | None = None,
        max_jobs_per_user: app_commands.Range[int, 1, 100] | None = None,
        allow_channel: discord.TextChannel | None = None,
        disallow_channel: discord.TextChannel | None = None,
        reset: bool = False,
    ) -> None:
        given = {
            "default_model": default_model,
            "allowed_models": allowed_models,
            "max_duration": max_duration,
            "max_jobs_per_user": max_jobs_per_user,
            "allow_channel": allow_channel,
            "disallow_channel": disallow_channel,
            "reset": reset or None,
        }
        await cog.update_settings(
            interaction, {key: value for key, value in given.items() if value is not None}
        )

    return settings


def _apply_rules(request: GenerationRequest, rules: Rules) -> GenerationRequest:
    """The server's default model when the request names none; its limits on models and
    durations."""
    request = replace(request, model=rules.model(request.model))
    rules.check_duration(request.duration)
    return request


def _with_melody_model(request: GenerationRequest, rules: Rules) -> tuple[GenerationRequest, str]:
    """``request`` with a model that follows a melody: with none picked, the server's default
    if it can, else its first allowed model that can, and a note saying so.

    Raises:
        InvalidOption: the model picked cannot follow a melody (the advice names the models
            this server allows that can), or no allowed model can.
    """
    melody_models = [name for name in rules.models if resolve_model(name).melody]
    if not melody_models:
        raise InvalidOption(
            "model",
            "No model allowed in this server can follow a melody: an admin can allow one "
            "with `/music admin settings`.",
        )
    if request.model:
        spec = resolve_model(request.model)
        check_audio_options(spec, melody=True, continuation=False, melody_models=melody_models)
        return request, ""
    default = rules.model("")
    if resolve_model(default).melody:
        return replace(request, model=default), ""
    model = melody_models[0]
    return replace(request, model=model), f"{default} cannot follow a melody, so this uses {model}."


async def setup(bot: "MusicGenBot") -> None:
    await bot.add_cog(Music(bot))
