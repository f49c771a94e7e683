"""/music jam: relay jams, where members take turns carrying one track on in a thread.

Each turn is a continuation job whose intro is the end of the latest finished turn; the
thread's first message is the jam's timeline. Export stitches the turns' new parts.
"""

from __future__ import annotations

import asyncio
import io
import logging
import weakref
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import discord
import numpy as np
from discord import app_commands
from discord.ext import commands

from generation.audio.continuation import MAX_INTRO_SECONDS, intro_clip, new_part, stitch
from generation.audio.output import encode_mp3_within, mp3_filename, request_tags
from generation.engine.models import resolve_model
from generation.errors import GenerationError, JobNotFound
from generation.jobs.job import Job, JobStatus
from generation.jobs.store import Expired, Jam, Turn
from generation.origin import Origin, OriginKind
from generation.request import WINDOW_SECONDS, GenerationRequest

from .. import limits, presentation
from ..access import Rules, may_manage
from ..errors import answering
from .remix import DEFAULT_ADDED_SECONDS, carry_on, check_fits

if TYPE_CHECKING:
    from ..bot import MusicGenBot
    from .music import Music

log = logging.getLogger(__name__)

#: Discord's limit on files in one message.
FILES_PER_MESSAGE = 10
#: The most a turn adds: with its intro, it fits in one window of the model (no extending).
MAX_TURN_SECONDS = WINDOW_SECONDS - MAX_INTRO_SECONDS
LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


class JamCommands(app_commands.Group):
    """The /music jam subcommands; the work is done by the :class:`Jams` cog."""

    def __init__(self, cog: Jams) -> None:
        super().__init__(name="jam", description="Relay jams: take turns carrying one track on")
        self.cog = cog

    @app_commands.command(name="start", description="Open a thread for a relay jam")
    @app_commands.describe(title="The jam's name (the thread's name)")
    async def start(
        self, interaction: discord.Interaction, title: app_commands.Range[str, 1, 100] | None = None
    ) -> None:
        await self.cog.start(interaction, title)

    @app_commands.command(name="add", description="Take a turn: carry the jam's track on")
    @app_commands.describe(
        prompt="What your part should sound like", length="Seconds of new music you add"
    )
    async def add(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1000],
        length: app_commands.Range[float, 1.0, MAX_TURN_SECONDS] = DEFAULT_ADDED_SECONDS,
    ) -> None:
        await self.cog.add(interaction, prompt, length)

    @app_commands.command(name="export", description="Post the jam's whole track")
    @app_commands.describe(segments="Also post each turn's part as its own file")
    async def export(self, interaction: discord.Interaction, segments: bool = False) -> None:
        await self.cog.export(interaction, segments)


class Jams(commands.Cog):
    """Relay jams in threads."""

    def __init__(self, bot: MusicGenBot) -> None:
        self.bot = bot
        self.store = bot.service.store
        self.commands = JamCommands(self)
        self._turns: dict[int, asyncio.Lock] = {}  # one turn taken at a time per jam
        #: One start at a time per (server, member), so the bound on open jams holds; a
        #: lock goes once no start holds or awaits it.
        self._starts: weakref.WeakValueDictionary[tuple[int, int], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    @property
    def music(self) -> Music:
        return self.bot.get_cog("Music")  # type: ignore[return-value]

    async def cog_load(self) -> None:
        self.music.music.add_command(self.commands)

    async def cog_unload(self) -> None:
        self.music.music.remove_command(self.commands.name)

    async def start(self, interaction: discord.Interaction, title: str | None) -> None:
        channel = interaction.channel
        if not isinstance(channel, discord.TextChannel):
            raise GenerationError("Start a jam in a text channel, not in a thread.")
        await self.bot.access.check(interaction, threads=True)
        member = (channel.guild.id, interaction.user.id)
        async with self._starts.setdefault(member, asyncio.Lock()):
            await self._check_open_jams(channel.guild, interaction.user.id)
            title = title or f"Jam by {interaction.user.display_name}"
            thread = await channel.create_thread(
                name=title, type=discord.ChannelType.public_thread, auto_archive_duration=1440
            )
            jam = Jam(thread.id, channel.guild.id, channel.id, interaction.user.id, title)
            timeline = await thread.send(presentation.jam_timeline(jam, []))
            jam = replace(jam, timeline_message_id=timeline.id)
            await self.store.add_jam(jam)
        log.info("jam=%d event=started guild=%d", thread.id, jam.guild_id)
        await interaction.response.send_message(
            f"Jam **{title}** started in {thread.mention}: take turns there with "
            "`/music jam add`, each carrying the track on; `/music jam export` posts it whole."
        )

    async def _check_open_jams(self, guild: discord.Guild, user_id: int) -> None:
        """Refuse a member who already has the most open jams (threads neither archived nor
        deleted) the configuration allows."""
        most = self.bot.config.jams.max_open_per_user
        threads = [
            guild.get_thread(thread)
            for thread in await self.store.jams_started_by(guild.id, user_id)
        ]
        open_jams = [thread for thread in threads if thread is not None and not thread.archived]
        if len(open_jams) >= most:
            mentions = limits.fit_join([thread.mention for thread in open_jams], 1000)
            raise GenerationError(
                f"You have {len(open_jams)} open jams here ({mentions}), the most one member "
                "may have: play in one of them, or archive one first."
            )

    async def add(self, interaction: discord.Interaction, prompt: str, length: float) -> None:
        jam = await self._jam(interaction)
        async with self._turns.setdefault(jam.thread_id, asyncio.Lock()):
            turns = await self.store.turns(jam.thread_id)
            latest = self._latest_finished(turns)
            rules = await self.bot.access.rules(jam.guild_id)
            number = len(turns) + 1
            note = f"Turn {number} of the jam" + (
                f", carrying on job #{latest.id}." if latest else "."
            )
            if latest is None:
                check_fits(length, 0.0, rules.max_duration)
                model = ""  # the server's default; later turns keep it
                prepare = None
            else:
                model, switched = jam_model(latest.request.model, rules)
                if switched:
                    note += (
                        f" The jam's model {latest.request.model} is not allowed here any "
                        f"more, so this turn uses {model}."
                    )
                prepare = partial(self._carry_on, latest, length, rules.max_duration)
            request = GenerationRequest(prompt=prompt, model=model, duration=length)
            origin = Origin(
                OriginKind.JAM_TURN,
                latest.id if latest is not None else None,
                jam=jam.thread_id,
                turn=number,
            )
            job = await self.music.queue_request(
                interaction, request, prepare=prepare, note=note, origin=origin
            )
            if job is None:
                return
            await self.store.add_segment(jam, job)
        await self._update_timeline(jam)

    async def _carry_on(
        self, latest: Job, length: float, longest: float, request: GenerationRequest
    ) -> GenerationRequest:
        """``request`` as a continuation of the end of ``latest``'s track."""
        stored = await self.store.load_result(latest)
        return carry_on(request, intro_clip(*stored), length, longest)

    async def export(self, interaction: discord.Interaction, with_segments: bool) -> None:
        jam = await self._jam(interaction)
        await self.bot.access.check(interaction)
        done = [
            turn
            for turn in await self.store.turns(jam.thread_id)
            if turn.job.status is JobStatus.DONE
        ]
        if not done:
            raise GenerationError("Nothing to export yet: take a turn with `/music jam add`.")
        await interaction.response.defer(thinking=True)
        turns = [turn.job for turn in done]
        parts: list[tuple[Job, np.ndarray, float]] = []
        sample_rate = 0
        for turn in done:
            job = turn.job
            audio, sample_rate = await self.store.load_result(job)
            if turn.intro_seconds is None:  # its clip expired before lengths were kept
                raise Expired.uploads(job)
            parts.append((job, audio, turn.intro_seconds))
        track = await asyncio.to_thread(
            stitch, [(audio, intro) for _, audio, intro in parts], sample_rate
        )
        limit = interaction.filesize_limit
        data, bitrate = await asyncio.to_thread(
            encode_mp3_within, track, sample_rate, limit, tags=presentation.jam_tags(jam, turns)
        )
        await interaction.followup.send(
            presentation.jam_exported_text(jam, turns, track.shape[-1] / sample_rate, bitrate),
            file=discord.File(io.BytesIO(data), presentation.jam_filename(jam)),
        )
        if with_segments:
            await self._post_segments(interaction, jam, parts, sample_rate, limit)
        await self._update_timeline(jam)

    async def _post_segments(
        self,
        interaction: discord.Interaction,
        jam: Jam,
        parts: list[tuple[Job, np.ndarray, float]],
        sample_rate: int,
        limit: int,
    ) -> None:
        """Each turn's new part, with its own request in its tags, up to ten per message."""
        for first in range(0, len(parts), FILES_PER_MESSAGE):
            batch = parts[first : first + FILES_PER_MESSAGE]
            files = []
            for number, (part, audio, intro) in enumerate(batch, start=first + 1):
                # Its tags hash its intro: only a turn's own file needs the intro decoded.
                job = await self.store.get(part.id) or part
                data, _ = await asyncio.to_thread(
                    _encode_part,
                    job,
                    new_part(audio, sample_rate, intro),
                    sample_rate,
                    limit // len(batch),
                )
                name = f"{number:02d}-{mp3_filename(job.request)}"
                files.append(discord.File(io.BytesIO(data), name))
            await interaction.followup.send(
                f"Turns {first + 1}-{first + len(batch)} of **{jam.title}**, one file each.",
                files=files,
            )

    async def adopt(self, interaction: discord.Interaction, job_id: int, turn: int) -> None:
        """Make ``job_id``, a re-roll or an edit of a jam's turn ``turn``, that turn.

        Only the latest turn can change: later turns carry on the music of the one before.
        The member who took the turn, the one who started the jam, or one with Manage
        Server may choose.
        """
        async with answering(interaction):
            await self.bot.access.check(interaction)
            job = await self.store.get(job_id)
            if job is None or job.guild_id != interaction.guild_id:
                raise JobNotFound(f"There is no job #{job_id} in this server.")
            if job.adoptable_turn != turn or job.origin is None:
                raise GenerationError(f"Job #{job_id} is not another take of a jam's turn.")
            if job.status is not JobStatus.DONE:
                raise GenerationError(f"Job #{job_id} has no track: it is {job.status.value}.")
            jam = await self.store.jam(job.origin.jam or 0)
            if jam is None:
                raise GenerationError("That jam no longer exists.")
            async with self._turns.setdefault(jam.thread_id, asyncio.Lock()):
                segments = await self.store.segments(jam.thread_id)
                if len(segments) != turn:
                    raise GenerationError(
                        f"The jam has {presentation.plural(len(segments), 'turn')} now: only "
                        f"the latest turn can change, and turn {turn} has been carried on."
                    )
                current = segments[-1]
                if current.job_id == job.id:
                    raise GenerationError(f"Job #{job.id} already is turn {turn}.")
                if not (
                    may_manage(interaction, current.user_id) or interaction.user.id == jam.user_id
                ):
                    raise GenerationError(
                        f"Turn {turn} is <@{current.user_id}>'s: they, <@{jam.user_id}> (who "
                        "started the jam) or a member with Manage Server can choose its take."
                    )
                await self.store.replace_segment(jam, turn, job)
            log.info("jam=%d event=adopted turn=%d job=%d", jam.thread_id, turn, job.id)
            await interaction.response.send_message(
                f"Turn {turn} of **{jam.title}** is now job #{job.id} (it was job "
                f"#{current.job_id}); the next turn carries it on.",
                allowed_mentions=discord.AllowedMentions.none(),
            )
            await self._update_timeline(jam)

    @commands.Cog.listener()
    async def on_job_ended(self, job: Job) -> None:
        """Keep the timeline of the jam a job belongs to (if any) up to date, linking to the
        job's outcome (not yet in the store: the event comes as it is posted)."""
        jam = await self.store.jam_of_job(job.id)
        if jam is not None:
            await self._update_timeline(jam, ended=job)

    async def _jam(self, interaction: discord.Interaction) -> Jam:
        jam = await self.store.jam(interaction.channel_id or 0)
        if jam is None:
            raise GenerationError(
                "This is not a jam's thread: start one with `/music jam start`, then use "
                "the jam commands in its thread."
            )
        return jam

    @staticmethod
    def _latest_finished(turns: list[Turn]) -> Job | None:
        """The turn to carry on: the latest that finished (failed turns are skipped).

        Raises:
            GenerationError: the latest turn is still being made; members take turns.
        """
        for turn in reversed(turns):
            job = turn.job
            if job.status in LIVE:
                raise GenerationError(
                    f"Turn {turn.segment.position} by <@{job.user_id}> is still being made: wait "
                    "for it, then carry it on."
                )
            if job.status is JobStatus.DONE:
                return job
        return None

    async def _update_timeline(self, jam: Jam, ended: Job | None = None) -> None:
        if jam.timeline_message_id is None:
            return
        turns = [
            (turn.segment, ended if ended is not None and turn.job.id == ended.id else turn.job)
            for turn in await self.store.turns(jam.thread_id)
        ]
        content = presentation.jam_timeline(jam, turns)
        message = self.bot.get_partial_messageable(
            jam.thread_id, guild_id=jam.guild_id
        ).get_partial_message(jam.timeline_message_id)
        try:
            await message.edit(content=content)
        except discord.HTTPException as error:
            log.info("jam=%d event=timeline-not-updated error=%s", jam.thread_id, error)


def jam_model(model: str, rules: Rules) -> tuple[str, bool]:
    """The model to carry a jam on with: its own while the server allows it, else an allowed
    one with as many channels (every model makes 32 kHz audio, so the turns still stitch);
    and whether it changed.

    Raises:
        InvalidOption: no model is allowed in the server any more.
    """
    if model in rules.models:
        return model, False
    stereo = _stereo(model)
    alike = [name for name in rules.models if stereo is not None and _stereo(name) == stereo]
    return (alike[0] if alike else rules.model("")), True


def _stereo(model: str) -> bool | None:
    """Whether ``model`` makes stereo; None for a model no longer known (a removed folder)."""
    try:
        return resolve_model(model).stereo
    except GenerationError:
        return None


def _encode_part(job: Job, part: np.ndarray, sample_rate: int, max_bytes: int) -> tuple[bytes, int]:
    """A turn's part as MP3, with its own request in its tags (blocking: they hash audio)."""
    hashes = {option: clip.sha256 for option, clip in job.clips.items()}
    tags = request_tags(job.request, job.origin, hashes)
    return encode_mp3_within(part, sample_rate, max_bytes, tags=tags)


async def setup(bot: MusicGenBot) -> None:
    await bot.add_cog(Jams(bot))
