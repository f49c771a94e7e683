"""Telling members how their jobs are doing, and delivering the MP3.

Each job's answer to its slash command is its status message: queued, progress, then the
result. It is reached through the interaction's webhook (application id, token and message
id, kept with the job), so it works after a restart too. The token dies after 15 minutes; a
job that ends later is delivered as a channel message that mentions the requester, or, where
the channel refuses the bot, as a direct message; where both refuse, the worker keeps the
outcome for the member's ``/music history``.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import discord

from generation.audio_output import encode_mp3_within, mp3_filename, request_tags
from generation.engine import GenerationResult
from generation.errors import GenerationError, OutputTooLarge, Undeliverable
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

            async def attachments(max_bytes: int) -> dict:
                posted = await result_message(job, results, max_bytes)
                return {"embed": posted.embed, "files": posted.files, "view": posted.view}

            return await self._send(job, content, attachments)
        except OutputTooLarge as error:
            return await self._say(job, f"Job #{job.id} is done, but {error}")

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
        return await self._send(job, f"<@{job.user_id}>, {content[0].lower()}{content[1:]}")

    async def _send(
        self,
        job: Job,
        content: str,
        attachments: Callable[[int], Awaitable[dict]] | None = None,
    ) -> str:
        """Post ``content`` (and the ``attachments`` made for an upload limit) in the job's
        channel, or, if the channel refuses the bot, in a direct message to the requester.

        Raises:
            Undeliverable: the member's direct messages refuse the bot too.
        """
        try:
            extra = await attachments(self._channel_upload_limit(job)) if attachments else {}
            message = await self._channel(job).send(
                content=content, allowed_mentions=_mention(job), **extra
            )
            return _jump_url(job, message.id)
        except (discord.Forbidden, discord.NotFound) as error:
            log.warning(
                "job=%d event=channel-refused error=%s (sending a direct message)", job.id, error
            )
        note = f"\n(From <#{job.channel_id}>, where I may not post this.)"
        try:
            extra = (
                await attachments(discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES)
                if attachments
                else {}
            )
            extra.pop("view", None)  # its buttons act in a server, not in a direct message
            direct = await self.client.create_dm(discord.Object(job.user_id))
            message = await direct.send(content=content + note, **extra)
        except (discord.Forbidden, discord.NotFound) as error:
            raise Undeliverable(
                f"the bot may not post it in <#{job.channel_id}> nor message you"
            ) from error
        return message.jump_url

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
    job: Job, results: list[GenerationResult], max_bytes: int
) -> ResultMessage:
    """Render the waveforms and encode the MP3s so that they fit ``max_bytes`` together."""
    waveform = await asyncio.to_thread(render_waveforms, [result.audio for result in results])
    files, bitrate = await encode_for_upload(results, max_bytes - len(waveform))
    files.append(discord.File(io.BytesIO(waveform), WAVEFORM_NAME))
    embed = presentation.result_embed(job, results, bitrate)
    embed.set_image(url=f"attachment://{WAVEFORM_NAME}")
    return ResultMessage(embed, files, result_view(job.id, job.takes))


async def encode_for_upload(
    results: list[GenerationResult], max_bytes: int
) -> tuple[list[discord.File], int]:
    """An MP3 file per result, together within ``max_bytes``, and the (lowest) bitrate used."""
    loop = asyncio.get_running_loop()
    files, bitrates = [], []
    for result in results:
        encode = partial(
            encode_mp3_within,
            result.audio,
            result.sample_rate,
            max_bytes // len(results),
            tags=request_tags(result.request),
        )
        data, bitrate = await loop.run_in_executor(None, encode)
        files.append(discord.File(io.BytesIO(data), mp3_filename(result.request)))
        bitrates.append(bitrate)
    return files, min(bitrates)


def _jump_url(job: Job, message_id: int) -> str:
    """A link to a message (webhook messages do not know their server, so build it here)."""
    return f"https://discord.com/channels/{job.guild_id}/{job.channel_id}/{message_id}"


def _mention(job: Job) -> discord.AllowedMentions:
    return discord.AllowedMentions(users=[discord.Object(job.user_id)])
