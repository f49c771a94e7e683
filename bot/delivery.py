"""Telling members how their jobs are doing, and delivering the MP3.

Each job's answer to its slash command is its status message: queued, progress, then the
result. It is reached through the interaction's webhook (application id, token and message
id, kept with the job), so it works after a restart too. The token dies after 15 minutes; a
job that ends later is delivered as a channel message that mentions the requester.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from functools import partial

import discord

from generation.audio_output import encode_mp3_within, mp3_filename, request_tags
from generation.engine import GenerationResult
from generation.errors import GenerationError, OutputTooLarge
from generation.origin import Origin
from generation.queue import Job, ReplyAddress
from generation.waveform import render_waveforms

from . import presentation
from .views import result_view

log = logging.getLogger(__name__)

#: Seconds before a token's expiry after which it is no longer relied on.
EXPIRY_MARGIN = 30.0
WAVEFORM_NAME = "waveform.png"


class JobReporter:
    """The worker's :class:`generation.worker.JobListener`, speaking Discord.

    Cogs hear of each job's end through the ``on_job_ended(job)`` event.
    """

    def __init__(self, client: discord.Client) -> None:
        self.client = client

    async def job_started(self, job: Job) -> None:
        await self._edit_status(job, presentation.running_text(job))

    async def job_progress(self, job: Job) -> None:
        await self._edit_status(job, presentation.running_text(job))

    async def job_finished(self, job: Job, results: list[GenerationResult]) -> str | None:
        self.client.dispatch("job_ended", job)
        content = f"<@{job.user_id}>, your track{'s are' if len(results) > 1 else ' is'} ready."
        reply = self._live_reply(job)
        try:
            if reply is not None:
                try:
                    posted = await result_message(job, results, reply.max_upload_bytes)
                    message = await self._webhook(reply).edit_message(
                        reply.message_id,
                        content=content,
                        embed=posted.embed,
                        attachments=posted.files,
                        view=posted.view,
                    )
                    return _jump_url(job, message.id)
                except discord.HTTPException as error:
                    log.info(
                        "job=%d event=reply-expired error=%s (posting in the channel)",
                        job.id,
                        error,
                    )
            posted = await result_message(job, results, self._channel_upload_limit(job))
        except OutputTooLarge as error:
            return await self._say(job, f"Job #{job.id} is done, but {error}")
        message = await self._channel(job).send(
            content=content,
            embed=posted.embed,
            files=posted.files,
            view=posted.view,
            allowed_mentions=_mention(job),
        )
        return _jump_url(job, message.id)

    async def job_failed(self, job: Job, error: GenerationError) -> str | None:
        self.client.dispatch("job_ended", job)
        return await self._say(job, f"Job #{job.id} failed: {error}")

    async def job_cancelled(self, job: Job) -> str | None:
        self.client.dispatch("job_ended", job)
        return await self._say(job, f"Job #{job.id} was cancelled.")

    async def _edit_status(self, job: Job, content: str) -> None:
        reply = self._live_reply(job)
        if reply is None:
            return
        try:
            await self._webhook(reply).edit_message(reply.message_id, content=content)
        except discord.HTTPException as error:
            log.info("job=%d event=status-not-updated error=%s", job.id, error)

    async def _say(self, job: Job, content: str) -> str | None:
        """Put ``content`` in the job's status message, or post it in the channel."""
        reply = self._live_reply(job)
        if reply is not None:
            try:
                message = await self._webhook(reply).edit_message(
                    reply.message_id, content=content, embed=None
                )
                return _jump_url(job, message.id)
            except discord.HTTPException as error:
                log.info(
                    "job=%d event=reply-expired error=%s (posting in the channel)", job.id, error
                )
        message = await self._channel(job).send(
            content=f"<@{job.user_id}>, {content[0].lower()}{content[1:]}",
            allowed_mentions=_mention(job),
        )
        return _jump_url(job, message.id)

    def _live_reply(self, job: Job) -> ReplyAddress | None:
        """The job's interaction webhook, while its token is good."""
        reply = job.reply
        now = discord.utils.utcnow().timestamp()
        if reply is None or now >= reply.expires_at - EXPIRY_MARGIN:
            return None
        return reply

    def _webhook(self, reply: ReplyAddress) -> discord.Webhook:
        return discord.Webhook.partial(reply.application_id, reply.token, client=self.client)

    def _channel(self, job: Job) -> discord.PartialMessageable:
        return self.client.get_partial_messageable(job.channel_id, guild_id=job.guild_id)

    def _channel_upload_limit(self, job: Job) -> int:
        guild = self.client.get_guild(job.guild_id)
        return guild.filesize_limit if guild else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES


@dataclass(frozen=True)
class ResultMessage:
    """A result as posted: the MP3 of each take, the waveforms, the embed, the buttons."""

    embed: discord.Embed
    files: list[discord.File]
    view: discord.ui.View


async def result_message(
    job: Job, results: list[GenerationResult], max_bytes: int, *, complete: bool = False
) -> ResultMessage:
    """Render the waveforms and encode the MP3s so that they fit ``max_bytes`` together;
    ``complete`` shows every option in the embed (see :func:`presentation.result_embed`)."""
    intro = job.request.continuation
    waveform = await asyncio.to_thread(
        render_waveforms,
        [result.audio for result in results],
        results[0].sample_rate,
        intro_seconds=intro.seconds if intro is not None else 0.0,
    )
    files, bitrate = await encode_for_upload(job, results, max_bytes - len(waveform))
    files.append(discord.File(io.BytesIO(waveform), WAVEFORM_NAME))
    embed = presentation.result_embed(job, results, bitrate, complete=complete)
    embed.set_image(url=f"attachment://{WAVEFORM_NAME}")
    view = result_view(job.id, job.takes, job.adoptable_turn)
    return ResultMessage(embed, files, view)


async def encode_for_upload(
    job: Job, results: list[GenerationResult], max_bytes: int
) -> tuple[list[discord.File], int]:
    """An MP3 file per result, together within ``max_bytes``, and the (lowest) bitrate used."""
    loop = asyncio.get_running_loop()
    files, bitrates = [], []
    for result in results:
        encode = partial(_encode_mp3, result, max_bytes // len(results), job.origin)
        data, bitrate = await loop.run_in_executor(None, encode)
        files.append(discord.File(io.BytesIO(data), mp3_filename(result.request)))
        bitrates.append(bitrate)
    return files, min(bitrates)


def _encode_mp3(
    result: GenerationResult, max_bytes: int, origin: Origin | None
) -> tuple[bytes, int]:
    """Blocking (the tags hash the audio inputs): run it off the event loop."""
    tags = request_tags(result.request, origin)
    return encode_mp3_within(result.audio, result.sample_rate, max_bytes, tags=tags)


def _jump_url(job: Job, message_id: int) -> str:
    """A link to a message (webhook messages do not know their server, so build it here)."""
    return f"https://discord.com/channels/{job.guild_id}/{job.channel_id}/{message_id}"


def _mention(job: Job) -> discord.AllowedMentions:
    return discord.AllowedMentions(users=[discord.Object(job.user_id)])
