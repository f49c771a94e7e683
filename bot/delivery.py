"""Telling members how their jobs are doing, and delivering the MP3.

Each job's answer to its slash command is its status message: queued (kept current as the
queue moves), starting, progress, then a link to the outcome. A track or a failure is posted
as a new message that mentions the requester, so Discord notifies them (it does not for an
edit); a cancellation, which someone chose, only updates the status message. Both go through
the interaction's webhook (application id, token and message id, kept with the job), so they
work after a restart too. The token dies after 15 minutes: later, outcomes are posted in the
channel, mentioning the requester, or, where the channel refuses the bot, in a direct
message; where both refuse, the worker keeps the outcome for the member's ``/music history``.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import discord

from generation.audio.output import encode_mp3_within, mp3_filename, request_tags
from generation.audio.waveform import render_waveforms
from generation.engine.results import GenerationResult
from generation.errors import GenerationError, OutputTooLarge, Undeliverable
from generation.jobs.estimates import Estimate
from generation.jobs.job import Job
from generation.origin import OriginKind

from . import limits, presentation
from .status import StatusMessages, jump_url, live_reply
from .views import result_view

log = logging.getLogger(__name__)

WAVEFORM_NAME = "waveform.png"


class JobReporter:
    """The watcher's :class:`generation.jobs.watcher.JobListener`, speaking Discord.

    Cogs hear of each job's end through the ``on_job_ended(job)`` event, once its outcome
    is posted (``job.result_url`` links to it).

    Args:
        client: The bot.
        status_interval: Least time between two edits of a job's status message, in seconds.
    """

    def __init__(self, client: discord.Client, status_interval: float = 5.0) -> None:
        self.client = client
        self.status = StatusMessages(client, status_interval)
        #: What each queued job's status message says above its place in the queue
        #: ("Re-roll of job #1 with a new seed."), by job id.
        self._notes: dict[int, str] = {}
        #: The queued jobs this gateway answered, by id: their messages show their place.
        self._waiting: dict[int, Job] = {}

    def acknowledged(self, job: Job, note: str, content: str) -> None:
        """The job's status message says ``content``; keep ``note`` at its top while the
        job waits."""
        if note:
            self._notes[job.id] = note
        self._waiting[job.id] = job
        self.status.shown(job, content)

    def queued_text(self, job: Job, estimate: Estimate | None) -> str:
        """A queued job's status message: its note (after a restart, where it came from),
        then its place in the queue."""
        text = presentation.queued_text(job, estimate)
        note = self._notes.get(job.id) or presentation.origin_text(job)
        return limits.fit_content(f"{note}\n{text}") if note else text

    def job_waiting(self, job: Job) -> None:
        self._waiting[job.id] = job

    def queue_moved(self, estimates: Sequence[Estimate]) -> None:
        for estimate in estimates:
            job = self._waiting.get(estimate.job_id)
            if job is not None:
                self.status.update(job, self.queued_text(job, estimate))

    async def job_started(self, job: Job) -> None:
        self._notes.pop(job.id, None)
        self._waiting.pop(job.id, None)
        await self.status.replace(job, presentation.running_text(job))

    async def job_progress(self, job: Job) -> None:
        self.status.update(job, presentation.running_text(job))

    async def job_finished(self, job: Job, results: list[GenerationResult]) -> str | None:
        content = f"<@{job.user_id}>, your track{'s are' if len(results) > 1 else ' is'} ready."

        async def announce() -> str:
            try:
                return await self._announce(job, content, partial(result_message, job, results))
            except OutputTooLarge as error:
                return await self._announce(
                    job, f"<@{job.user_id}>, job #{job.id} is done, but {error}"
                )

        return await self._outcome(job, announce(), "is ready")

    async def job_failed(self, job: Job, error: GenerationError) -> str | None:
        failed = self._announce(job, f"<@{job.user_id}>, job #{job.id} failed: {error}")
        return await self._outcome(job, failed, "failed")

    async def job_cancelled(self, job: Job) -> str | None:
        url = await self._end(job, f"Job #{job.id} was cancelled.")
        if url is None:  # its status message cannot be edited any more
            url = await self._announce(job, f"<@{job.user_id}>, job #{job.id} was cancelled.")
        self._ended(job, url)
        return url

    async def _outcome(self, job: Job, announced: Awaitable[str], verb: str) -> str:
        """Await the outcome's announcement, then point the status message to it.

        If it cannot be announced, what is known of the status message is dropped (a retry
        starts afresh); when nobody can receive it, the cogs still hear that the job ended.
        """
        try:
            url = await announced
        except Undeliverable:
            self._ended(job, None)
            await self._end(job, f"Job #{job.id} {verb}; find it with `/music history`.")
            raise
        except BaseException:
            self._notes.pop(job.id, None)
            self._waiting.pop(job.id, None)
            self.status.forget(job)
            raise
        self._ended(job, url)
        await self._end(job, presentation.outcome_text(job, verb, url))
        return url

    def _ended(self, job: Job, url: str | None) -> None:
        """Tell the cogs (``on_job_ended``) that ``job`` ended and where that is told."""
        self._waiting.pop(job.id, None)
        job.result_url = url
        self.client.dispatch("job_ended", job)

    async def _announce(self, job: Job, content: str, attach: Attach | None = None) -> str:
        """Post a new message that mentions the requester (and no one else), with what
        ``attach`` makes for the upload limit; returns a link to it.

        While the token is good it is the interaction's follow-up, which needs no permission
        in the channel; then it is a channel message.
        """
        reply = live_reply(job)
        if reply is not None:
            try:
                extra = await _attachments(attach, reply.max_upload_bytes)
                message = await self.status.webhook(reply).send(
                    content=limits.fit_content(content),
                    allowed_mentions=_mention(job),
                    wait=True,
                    **extra,
                )
                return jump_url(job, message.id)
            except discord.HTTPException as error:
                log.info(
                    "job=%d event=follow-up-failed error=%s (posting in the channel)",
                    job.id,
                    error,
                )
        return await self._send(job, content, attach)

    async def _send(self, job: Job, content: str, attach: Attach | None = None) -> str:
        """Post in the job's channel or, if the channel refuses the bot, in a direct message
        to the requester; returns a link to it.

        Raises:
            Undeliverable: the member's direct messages refuse the bot too.
        """
        try:
            extra = await _attachments(attach, self._channel_upload_limit(job))
            message = await self._channel(job).send(
                content=limits.fit_content(content), allowed_mentions=_mention(job), **extra
            )
            return jump_url(job, message.id)
        except (discord.Forbidden, discord.NotFound) as error:
            log.warning(
                "job=%d event=channel-refused error=%s (sending a direct message)", job.id, error
            )
        note = f"\n(From <#{job.channel_id}>, where I may not post this.)"
        try:
            extra = await _attachments(attach, discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES)
            extra.pop("view", None)  # its buttons act in a server, not in a direct message
            direct = await self.client.create_dm(discord.Object(job.user_id))
            message = await direct.send(content=limits.fit_content(content + note), **extra)
        except (discord.Forbidden, discord.NotFound) as error:
            raise Undeliverable(
                f"the bot may not post it in <#{job.channel_id}> nor message you"
            ) from error
        return message.jump_url

    async def _end(self, job: Job, content: str) -> str | None:
        """The status message's last text (its Cancel button goes); a link to it, or None."""
        self._notes.pop(job.id, None)
        try:
            return await self.status.replace(job, content, final=True)
        finally:
            self.status.forget(job)

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


#: Makes a result's message for an upload limit in bytes.
Attach = Callable[[int], Awaitable[ResultMessage]]


async def _attachments(attach: Attach | None, max_bytes: int) -> dict[str, Any]:
    if attach is None:
        return {}
    posted = await attach(max_bytes)
    return {"embed": posted.embed, "files": posted.files, "view": posted.view}


async def result_message(
    job: Job, results: list[GenerationResult], max_bytes: int, *, complete: bool = False
) -> ResultMessage:
    """Render the waveforms and encode the MP3s so that they fit ``max_bytes`` together;
    ``complete`` shows every option in the embed (see :func:`presentation.result_embed`)."""
    waveform = await asyncio.to_thread(
        render_waveforms,
        [result.audio for result in results],
        results[0].sample_rate,
        intro_seconds=intro.seconds if (intro := job.clips.get("continuation")) else 0.0,
    )
    files, bitrate = await encode_for_upload(job, results, max_bytes - len(waveform))
    files.append(discord.File(io.BytesIO(waveform), WAVEFORM_NAME))
    embed = presentation.result_embed(job, results, bitrate, complete=complete)
    embed.set_image(url=f"attachment://{WAVEFORM_NAME}")
    stems = job.origin is not None and job.origin.kind is OriginKind.STEMS
    view = result_view(job.id, job.takes, job.adoptable_turn, stems=stems)
    return ResultMessage(embed, files, view)


async def encode_for_upload(
    job: Job, results: list[GenerationResult], max_bytes: int
) -> tuple[list[discord.File], int]:
    """An MP3 file per result, together within ``max_bytes``, and the (lowest) bitrate used."""
    loop = asyncio.get_running_loop()
    files, bitrates = [], []
    for result in results:
        encode = partial(_encode_mp3, job, result, max_bytes // len(results))
        data, bitrate = await loop.run_in_executor(None, encode)
        files.append(discord.File(io.BytesIO(data), mp3_filename(result.request)))
        bitrates.append(bitrate)
    return files, min(bitrates)


def _encode_mp3(job: Job, result: GenerationResult, max_bytes: int) -> tuple[bytes, int]:
    """Blocking: run it off the event loop."""
    tags = request_tags(result.request, job.origin, _clip_hashes(job), seconds=result.seconds)
    return encode_mp3_within(result.audio, result.sample_rate, max_bytes, tags=tags)


def _clip_hashes(job: Job) -> dict[str, str]:
    return {option: clip.sha256 for option, clip in job.clips.items()}


def _mention(job: Job) -> discord.AllowedMentions:
    return discord.AllowedMentions(users=[discord.Object(job.user_id)])
