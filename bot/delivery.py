"""Telling members how their jobs are doing, and delivering the MP3.

Each job's interaction response is its status message: queued, progress, then the result.
An interaction token dies after 15 minutes; a job that ends later is delivered as a channel
message that mentions the requester, so nothing is lost to a long queue.
"""

from __future__ import annotations

import asyncio
import io
import logging
from functools import partial

import discord

from generation.audio_output import encode_mp3_within, normalise_loudness, request_tags
from generation.engine import GenerationResult
from generation.errors import GenerationError, OutputTooLarge
from generation.queue import Job

from . import presentation

log = logging.getLogger(__name__)


class JobReporter:
    """The worker's :class:`generation.worker.JobListener`, speaking Discord."""

    def __init__(self, client: discord.Client) -> None:
        self.client = client
        self._interactions: dict[int, discord.Interaction] = {}

    def track(self, job: Job, interaction: discord.Interaction) -> None:
        """Report on ``job`` through ``interaction``'s response."""
        self._interactions[job.id] = interaction

    async def job_started(self, job: Job) -> None:
        await self._edit_status(job, presentation.running_text(job))

    async def job_progress(self, job: Job) -> None:
        await self._edit_status(job, presentation.running_text(job))

    async def job_finished(self, job: Job, result: GenerationResult) -> None:
        interaction = self._interactions.pop(job.id, None)
        loop = asyncio.get_running_loop()
        audio = await loop.run_in_executor(
            None, normalise_loudness, result.audio, result.sample_rate
        )
        encode = partial(
            encode_mp3_within, audio, result.sample_rate, tags=request_tags(result.request)
        )
        filename = presentation.mp3_filename(result.request)
        if interaction is not None and not interaction.is_expired():
            try:
                data, bitrate = await loop.run_in_executor(
                    None, partial(encode, interaction.filesize_limit)
                )
                await interaction.edit_original_response(
                    content=f"<@{job.user_id}>, your track is ready.",
                    embed=presentation.result_embed(job, result, bitrate),
                    attachments=[discord.File(io.BytesIO(data), filename)],
                )
                return
            except OutputTooLarge as error:
                await self._say(job, interaction, f"Job #{job.id} is done, but {error}")
                return
            except discord.HTTPException as error:
                log.info("job %d: interaction gone (%s); posting in the channel", job.id, error)
        channel = await self._channel(job)
        try:
            data, bitrate = await loop.run_in_executor(
                None, partial(encode, channel.guild.filesize_limit)
            )
        except OutputTooLarge as error:
            await self._say(job, None, f"Job #{job.id} is done, but {error}")
            return
        await channel.send(
            content=f"<@{job.user_id}>, your track is ready.",
            embed=presentation.result_embed(job, result, bitrate),
            file=discord.File(io.BytesIO(data), filename),
            allowed_mentions=discord.AllowedMentions(users=[discord.Object(job.user_id)]),
        )

    async def job_failed(self, job: Job, error: GenerationError) -> None:
        interaction = self._interactions.pop(job.id, None)
        await self._say(job, interaction, f"Job #{job.id} failed: {error}")

    async def job_cancelled(self, job: Job) -> None:
        interaction = self._interactions.pop(job.id, None)
        await self._say(job, interaction, f"Job #{job.id} was cancelled.")

    async def _edit_status(self, job: Job, content: str) -> None:
        interaction = self._interactions.get(job.id)
        if interaction is None or interaction.is_expired():
            return
        try:
            await interaction.edit_original_response(content=content)
        except discord.HTTPException as error:
            log.info("job %d: could not update its status (%s)", job.id, error)

    async def _say(self, job: Job, interaction: discord.Interaction | None, content: str) -> None:
        """Put ``content`` in the job's status message, or post it in the channel."""
        if interaction is not None and not interaction.is_expired():
            try:
                await interaction.edit_original_response(content=content, embed=None)
                return
            except discord.HTTPException as error:
                log.info("job %d: interaction gone (%s); posting in the channel", job.id, error)
        channel = await self._channel(job)
        await channel.send(
            content=f"<@{job.user_id}>, {content[0].lower()}{content[1:]}",
            allowed_mentions=discord.AllowedMentions(users=[discord.Object(job.user_id)]),
        )

    async def _channel(self, job: Job) -> discord.abc.Messageable:
        channel = self.client.get_channel(job.channel_id)
        if channel is None:
            channel = await self.client.fetch_channel(job.channel_id)
        return channel  # type: ignore[return-value]
