"""Each job's status message (its answer to the slash command), kept current within Discord's
rate limits.

Queue positions, ETAs and progress change often; a job's message is edited at most once per
``interval``, with the latest text, and only when the text changes. The message is reached
through the interaction's webhook, which works until the token expires (15 minutes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import discord

from generation.jobs.job import Job, ReplyAddress

log = logging.getLogger(__name__)

#: Seconds before a token's expiry after which it is no longer relied on.
EXPIRY_MARGIN = 30.0


@dataclass
class _Status:
    """What a job's status message says, and what it should say."""

    sent: str | None = None
    wanted: str | None = None
    edited_at: float = float("-inf")
    timer: asyncio.TimerHandle | None = None
    #: One edit of the message at a time, in the order they were asked for.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class StatusMessages:
    """The status messages of the live jobs.

    Args:
        client: The bot.
        interval: Least time between two edits of one job's message, in seconds.
    """

    def __init__(self, client: discord.Client, interval: float) -> None:
        self.client = client
        self.interval = interval
        self._statuses: dict[int, _Status] = {}
        self._edits: set[asyncio.Task[None]] = set()

    def shown(self, job: Job, content: str) -> None:
        """Record that the message says ``content`` (the interaction's response), so that
        the next change is the next edit, and not before ``interval``."""
        status = self._statuses.setdefault(job.id, _Status())
        status.sent, status.edited_at = content, _now()

    def update(self, job: Job, content: str) -> None:
        """Show ``content`` soon: now if the message was not edited within ``interval``,
        else when it may be (a later update replaces it). Returns at once."""
        if live_reply(job) is None:
            return
        status = self._statuses.setdefault(job.id, _Status())
        if content == (status.wanted if status.wanted is not None else status.sent):
            return
        status.wanted = content
        wait = status.edited_at + self.interval - _now()
        if status.timer is not None:
            if wait > 0:
                return  # the edit already planned will send the latest text
            status.timer.cancel()  # overdue: the loop was busy
            status.timer = None
        if wait <= 0:
            self._edit_soon(job)
        else:
            status.timer = asyncio.get_running_loop().call_later(wait, self._edit_soon, job)

    async def replace(self, job: Job, content: str, *, final: bool = False) -> str | None:
        """Show ``content`` now, after any edit under way, dropping the planned ones (e.g.
        "starting"; ``final``: how the job ended, without the Cancel button). Returns a link
        to the message, or None when it can no longer be edited."""
        reply = live_reply(job)
        status = self._statuses.setdefault(job.id, _Status())
        if status.timer is not None:
            status.timer.cancel()
            status.timer = None
        status.wanted = None
        if reply is None:
            return None
        extra = {"view": None, "embed": None} if final else {}
        async with status.lock:
            try:
                message = await self.webhook(reply).edit_message(
                    reply.message_id, content=content, **extra
                )
            except discord.HTTPException as error:
                log.info("job=%d event=status-not-updated error=%s", job.id, error)
                return None
            status.sent, status.edited_at = content, _now()
        return jump_url(job, message.id)

    def forget(self, job: Job) -> None:
        """Drop what is known of an ended job's message (and any planned edit)."""
        status = self._statuses.pop(job.id, None)
        if status is not None and status.timer is not None:
            status.timer.cancel()

    def _edit_soon(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self._send_wanted(job))
        self._edits.add(task)
        task.add_done_callback(self._edits.discard)

    async def _send_wanted(self, job: Job) -> None:
        status = self._statuses.get(job.id)
        if status is None:
            return
        status.timer = None
        async with status.lock:
            content, status.wanted = status.wanted, None
            reply = live_reply(job)
            if content is None or content == status.sent or reply is None:
                return
            status.edited_at = _now()
            try:
                await self.webhook(reply).edit_message(reply.message_id, content=content)
            except discord.HTTPException as error:
                log.info("job=%d event=status-not-updated error=%s", job.id, error)
                return
            status.sent = content

    def webhook(self, reply: ReplyAddress) -> discord.Webhook:
        return discord.Webhook.partial(reply.application_id, reply.token, client=self.client)


def _now() -> float:
    """Seconds on a steady clock: how long ago a message was edited."""
    return time.perf_counter()


def live_reply(job: Job) -> ReplyAddress | None:
    """The job's interaction webhook, while its token is good."""
    reply = job.reply
    now = discord.utils.utcnow().timestamp()
    if reply is None or reply.token is None or now >= reply.expires_at - EXPIRY_MARGIN:
        return None
    return reply


def jump_url(job: Job, message_id: int) -> str:
    """A link to a message (webhook messages do not know their server, so build it here)."""
    return f"https://discord.com/channels/{job.guild_id}/{job.channel_id}/{message_id}"
