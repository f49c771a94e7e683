"""Playing with results: the buttons under each one, and the context menus on any audio.

Re-roll, Continue, Edit, Variations and Stems start from a job in the store; "Continue this
track" and "Use as melody" start from any message with an audio attachment (on a message with
several, such as a result's stems, the form asks which). Each makes a new job for the member
who asked, through the same checks and limits as /music generate.

Stems are a job like any other: the worker splits the take with demucs (the gateway holds no
model), in the queue's turn, and the result message holds one file per stem.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from functools import partial
from pathlib import PurePath
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from generation.audio.continuation import MAX_INTRO_SECONDS, continue_request, intro_clip
from generation.audio.input import check_size
from generation.audio.stems import STEMS
from generation.errors import AudioInputError, GenerationError, InvalidOption, JobNotFound
from generation.jobs.job import MAX_TAKES, Job, JobStatus
from generation.jobs.store import Expired
from generation.origin import Origin, OriginKind
from generation.request import TEMPERATURE_RANGE, AudioClip, GenerationRequest

from ..errors import answering
from ..modals import Drafts, Field, Form, Submit, prompt_field, read_form
from ..presentation import short
from ..views import BUTTONS

if TYPE_CHECKING:
    from ..bot import MusicGenBot
    from .music import Music

log = logging.getLogger(__name__)

#: Seconds of new music a continuation adds unless the member says otherwise.
DEFAULT_ADDED_SECONDS = 10.0
#: Takes the Variations button asks for.
VARIATIONS = MAX_TAKES
AUDIO_SUFFIXES = {".wav", ".mp3", ".ogg", ".oga", ".opus", ".flac", ".m4a", ".aac", ".webm"}


class Remix(commands.Cog):
    """Re-roll, Continue, Edit and Variations; "Continue this track" and "Use as melody"."""

    def __init__(self, bot: MusicGenBot) -> None:
        self.bot = bot
        self.store = bot.service.store
        self.drafts = Drafts()
        guild_only = app_commands.AppCommandContext(guild=True)
        self.menus = (
            app_commands.ContextMenu(
                name="Continue this track",
                callback=self.continue_track,
                allowed_contexts=guild_only,
            ),
            app_commands.ContextMenu(
                name="Use as melody", callback=self.use_as_melody, allowed_contexts=guild_only
            ),
        )

    @property
    def music(self) -> Music:
        return self.bot.get_cog("Music")  # type: ignore[return-value]

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(*BUTTONS)
        for menu in self.menus:
            self.bot.tree.add_command(menu)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*BUTTONS)
        for menu in self.menus:
            self.bot.tree.remove_command(menu.name, type=menu.type)

    # Buttons

    async def reroll(self, interaction: discord.Interaction, job_id: int) -> None:
        """The same request (as many takes) with a new seed."""
        async with answering(interaction):
            source = await self._finished_job(interaction, job_id)
            await self.music.queue_request(
                interaction,
                replace(source.request, seed=None),
                note=f"Re-roll of job #{source.id} with a new seed.",
                takes=source.takes,
                origin=await self._origin(OriginKind.REROLL, source),
            )

    async def variations(self, interaction: discord.Interaction, job_id: int) -> None:
        """:data:`VARIATIONS` takes of the job's request, new seeds, generated together."""
        async with answering(interaction):
            source = await self._finished_job(interaction, job_id)
            await self.music.queue_request(
                interaction,
                replace(source.request, seed=None),
                note=f"{VARIATIONS} variations of job #{source.id}, generated together.",
                takes=VARIATIONS,
                origin=await self._origin(OriginKind.VARIATIONS, source),
            )

    async def ask_continue(self, interaction: discord.Interaction, job_id: int, take: int) -> None:
        async with answering(interaction):
            source = await self._finished_job(interaction, job_id, with_uploads=False)
            if not 0 <= take < source.takes:
                raise JobNotFound(f"Job #{job_id} has no take {take + 1}.")
            rules = await self.bot.access.check(interaction)
            intro = min(MAX_INTRO_SECONDS, source.request.duration)
            fields = [prompt_field(source.request.prompt), _length_field(intro, rules.max_duration)]
            submit = partial(self._continue_job, job_id=source.id, take=take)
            form = self._form(
                interaction,
                f"Continue job #{source.id}",
                fields,
                submit,
                ("continue", job_id, take),
            )
            await interaction.response.send_modal(form)

    async def _continue_job(
        self, interaction: discord.Interaction, values: dict[str, str], *, job_id: int, take: int
    ) -> bool:
        """A continuation whose intro is the end of the take's stored result."""
        async with answering(interaction):
            source = await self._finished_job(interaction, job_id, with_uploads=False)
            longest = (await self.bot.access.rules(source.guild_id)).max_duration
            added = read_form(values, {"length": (1.0, longest)})["length"]
            check_fits(added, min(MAX_INTRO_SECONDS, source.request.duration), longest)

            async def with_intro(request: GenerationRequest) -> GenerationRequest:
                stored = await self.store.load_result(source, take)
                return carry_on(request, intro_clip(*stored), added, longest)

            request = replace(
                source.request,
                prompt=values["prompt"],
                duration=added,
                seed=None,
                melody=None,
                continuation=None,
                stems_of=None,  # a stem carries on as music
            )
            job = await self.music.queue_request(
                interaction,
                request,
                prepare=with_intro,
                note=f"Continuing job #{source.id}.",
                origin=await self._origin(OriginKind.CONTINUATION, source, take),
            )
            return job is not None
        return False

    async def ask_edit(self, interaction: discord.Interaction, job_id: int) -> None:
        async with answering(interaction):
            source = await self._finished_job(interaction, job_id)
            rules = await self.bot.access.check(interaction)
            request = source.request
            fields = [
                prompt_field(request.prompt),
                _duration_field(f"{request.duration:g}", rules.max_duration),
                Field("temperature", "Temperature (0-2)", f"{request.temperature:g}"),
            ]
            submit = partial(self._edit_job, job_id=source.id)
            form = self._form(
                interaction, f"Edit job #{source.id}", fields, submit, ("edit", job_id)
            )
            await interaction.response.send_modal(form)

    async def _edit_job(
        self, interaction: discord.Interaction, values: dict[str, str], *, job_id: int
    ) -> bool:
        """The job's request with the new prompt, duration and temperature; the seed stays,
        so the change is what makes the difference (Re-roll for a new seed)."""
        async with answering(interaction):
            longest = (await self.bot.access.rules(interaction.guild_id or 0)).max_duration
            numbers = read_form(
                values, {"duration": (1.0, longest), "temperature": TEMPERATURE_RANGE}
            )
            source = await self._finished_job(interaction, job_id)
            request = replace(source.request, prompt=values["prompt"], **numbers)
            job = await self.music.queue_request(
                interaction,
                request,
                note=f"Edit of job #{source.id}, same seed.",
                takes=source.takes,
                origin=await self._origin(OriginKind.EDIT, source),
            )
            return job is not None
        return False

    async def stems(self, interaction: discord.Interaction, job_id: int, take: int) -> None:
        """A job that splits the take into :data:`STEMS`, one take each."""
        async with answering(interaction):
            source = await self._finished_job(interaction, job_id, with_uploads=False)
            if not 0 <= take < source.takes:
                raise JobNotFound(f"Job #{job_id} has no take {take + 1}.")
            if source.origin is not None and source.origin.kind is OriginKind.STEMS:
                raise GenerationError(f"Job #{job_id} is stems already.")

            async def with_track(request: GenerationRequest) -> GenerationRequest:
                audio, sample_rate = await self.store.load_result(source, take)
                return replace(request, stems_of=AudioClip(audio, sample_rate))

            request = replace(source.take_requests()[take], melody=None, continuation=None, stem="")
            await self.music.queue_request(
                interaction,
                request,
                prepare=with_track,
                note=f"Splitting job #{source.id} into {', '.join(STEMS)}.",
                takes=len(STEMS),
                origin=await self._origin(OriginKind.STEMS, source, take),
            )

    # Context menus

    async def continue_track(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        rules = await self.bot.access.check(interaction)
        attachments = _audio_attachments(message)
        if len(attachments) == 1:  # too large is said before the form, where it can be
            self._picked(attachments, {}, "continuation")
        fields = [prompt_field(), _length_field(MAX_INTRO_SECONDS, rules.max_duration)]
        fields += _file_fields(attachments)
        submit = partial(self._continue_upload, attachments=attachments)
        form = self._form(
            interaction, "Continue this track", fields, submit, ("continue", message.id)
        )
        await interaction.response.send_modal(form)

    async def _continue_upload(
        self,
        interaction: discord.Interaction,
        values: dict[str, str],
        *,
        attachments: list[discord.Attachment],
    ) -> bool:
        async with answering(interaction):
            longest = (await self.bot.access.rules(interaction.guild_id or 0)).max_duration
            numbers = {"length": (1.0, longest), **_file_range(attachments)}
            read = read_form(values, numbers)
            added = read["length"]
            attachment = self._picked(attachments, read, "continuation")

            async def with_intro(request: GenerationRequest) -> GenerationRequest:
                clip = await self._read(interaction, attachment, "continuation")
                intro = intro_clip(clip.samples, clip.sample_rate)
                return carry_on(request, intro, added, longest)

            request = GenerationRequest(prompt=values["prompt"], model="", duration=added)
            job = await self.music.queue_request(
                interaction,
                request,
                prepare=with_intro,
                note=f"Continuing {short(attachment.filename, 100)}.",
                origin=Origin(OriginKind.UPLOAD_CONTINUATION, filename=attachment.filename),
            )
            return job is not None
        return False

    async def use_as_melody(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        rules = await self.bot.access.check(interaction)
        attachments = _audio_attachments(message)
        if len(attachments) == 1:
            self._picked(attachments, {}, "melody")
        default = f"{min(DEFAULT_ADDED_SECONDS, rules.max_duration):g}"
        fields = [prompt_field(), _duration_field(default, rules.max_duration)]
        fields += _file_fields(attachments)
        submit = partial(self._melody_upload, attachments=attachments)
        form = self._form(interaction, "Use as melody", fields, submit, ("melody", message.id))
        await interaction.response.send_modal(form)

    async def _melody_upload(
        self,
        interaction: discord.Interaction,
        values: dict[str, str],
        *,
        attachments: list[discord.Attachment],
    ) -> bool:
        async with answering(interaction):
            longest = (await self.bot.access.rules(interaction.guild_id or 0)).max_duration
            read = read_form(values, {"duration": (1.0, longest), **_file_range(attachments)})
            duration = read["duration"]
            attachment = self._picked(attachments, read, "melody")

            async def with_melody(request: GenerationRequest) -> GenerationRequest:
                return replace(request, melody=await self._read(interaction, attachment, "melody"))

            # No model: the server's default, or its first allowed melody model (said so).
            request = GenerationRequest(prompt=values["prompt"], model="", duration=duration)
            job = await self.music.queue_request(
                interaction,
                request,
                prepare=with_melody,
                note=f"Following the melody of {short(attachment.filename, 100)}.",
                origin=Origin(OriginKind.UPLOAD_MELODY, filename=attachment.filename),
                melody=True,
            )
            return job is not None
        return False

    # Helpers

    def _form(
        self,
        interaction: discord.Interaction,
        title: str,
        fields: list[Field],
        submit: Submit,
        key: tuple[object, ...],
    ) -> Form:
        """A form that shows what the member typed when it was last refused, if it was."""
        return Form(title, fields, submit, member=interaction.user.id, drafts=self.drafts, key=key)

    async def _origin(self, kind: OriginKind, source: Job, take: int = 0) -> Origin:
        """``kind`` of ``source``; with the jam turn that ``source`` is, or is another take
        of, so a re-roll or an edit of a turn can take its place (see ``Jams.adopt``)."""
        # A turn now, else a turn since replaced by another take, or another take of one.
        turn = await self.store.turn_of_job(source.id) or source.jam_turn
        jam, number = turn if turn is not None else (None, None)
        return Origin(kind, source.id, take, jam=jam, turn=number)

    async def _finished_job(
        self, interaction: discord.Interaction, job_id: int, *, with_uploads: bool = True
    ) -> Job:
        """A finished job of this server; ``with_uploads``: its melody or intro is still kept
        (its request is made again)."""
        job = await self.store.get(job_id)
        if job is None or job.guild_id != interaction.guild_id:
            raise JobNotFound(f"There is no job #{job_id} in this server.")
        if job.status is not JobStatus.DONE:
            raise JobNotFound(f"Job #{job_id} has no track: it is {job.status.value}.")
        if with_uploads and job.uploads_expired_at is not None:
            raise Expired.uploads(job)
        return job

    def _picked(
        self, attachments: list[discord.Attachment], read: dict[str, float], label: str
    ) -> discord.Attachment:
        """The audio file the form picked (the only one, or the ``file`` typed), if it is
        not too large to read."""
        number = read.get("file", 1.0)
        if number != int(number):
            raise InvalidOption("file", f"Enter a whole number from 1 to {len(attachments)}.")
        attachment = attachments[int(number) - 1]
        try:
            check_size(attachment.size, self.music.upload_limits, label)
        except AudioInputError as error:
            raise InvalidOption(label, str(error)) from error
        return attachment

    async def _read(
        self, interaction: discord.Interaction, attachment: discord.Attachment, label: str
    ) -> AudioClip:
        """Defer (downloading may outlast Discord's 3 s deadline), then read and decode."""
        await interaction.response.defer(thinking=True)
        clips = await self.music.read_uploads({label: attachment})
        return clips[label]


def _audio_attachments(message: discord.Message) -> list[discord.Attachment]:
    """The message's audio attachments, in order.

    Raises:
        GenerationError: it has none.
    """
    found = [
        attachment
        for attachment in message.attachments
        if (attachment.content_type or "").startswith("audio/")
        or PurePath(attachment.filename).suffix in AUDIO_SUFFIXES
    ]
    if not found:
        raise GenerationError("That message has no audio attachment to use.")
    return found


def _file_fields(attachments: list[discord.Attachment]) -> list[Field]:
    """A field asking which file to use, where the message has several (stems...)."""
    if len(attachments) == 1:
        return []
    return [Field("file", f"Which audio file (1-{len(attachments)}, in order)", "1")]


def _file_range(attachments: list[discord.Attachment]) -> dict[str, tuple[float, float]]:
    return {"file": (1.0, float(len(attachments)))} if len(attachments) > 1 else {}


def _duration_field(default: str, longest: float) -> Field:
    """The form's duration, with the server's longest track."""
    return Field("duration", f"Duration in seconds (1-{longest:g})", default)


def _length_field(intro_seconds: float, longest: float) -> Field:
    """The form's length, with the most that fits after an intro of ``intro_seconds``."""
    most = max(1.0, longest - intro_seconds)
    default = min(DEFAULT_ADDED_SECONDS, most)
    return Field("length", f"Seconds of new music to add (1-{most:g})", f"{default:g}")


def check_fits(added: float, intro_seconds: float, longest: float) -> None:
    """Refuse ``added`` seconds after an intro of ``intro_seconds`` when the track would be
    longer than ``longest``, naming what the member typed.

    Raises:
        InvalidOption: for the ``length`` option.
    """
    if intro_seconds + added <= longest:
        return
    if not intro_seconds:
        raise InvalidOption("length", f"{added:g} s is longer than the {longest:g} s allowed here.")
    most = math.floor((longest - intro_seconds) * 10) / 10
    fix = f"add at most {most:g} s" if most >= 1 else "there is no room to add more"
    raise InvalidOption(
        "length",
        f"{added:g} s after the {intro_seconds:.1f} s intro makes "
        f"{intro_seconds + added:.1f} s, and tracks here are at most {longest:g} s: {fix}.",
    )


def carry_on(
    request: GenerationRequest, intro: AudioClip, added: float, longest: float
) -> GenerationRequest:
    """``request`` continuing ``intro`` by ``added`` seconds, if that fits in ``longest``."""
    check_fits(added, intro.seconds, longest)
    return continue_request(request, intro, added)


async def setup(bot: MusicGenBot) -> None:
    await bot.add_cog(Remix(bot))
