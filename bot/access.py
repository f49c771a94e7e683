"""One check for every entry point (slash command, button, form, menu): the server's settings
as they apply now, and the member's and the bot's right to post where the music would go.

A server's stored settings are its admins' choices within the operator's configuration: a
model the operator has since removed is neither allowed nor the default any more, and the
server's longest track is never above the configured one.
"""

from __future__ import annotations

from dataclasses import dataclass

import discord

from generation.errors import GenerationError, InvalidOption
from generation.jobs.store import GuildSettings, JobStore

from . import limits
from .config import Config

#: What the bot needs, besides sending messages, where it posts a result: the MP3 and the
#: embed with the waveform (a job that outlives its interaction is posted as the bot).
RESULT_PERMISSIONS = ("attach_files", "embed_links")
PERMISSION_NAMES = {
    "send_messages": "Send Messages",
    "send_messages_in_threads": "Send Messages in Threads",
    "attach_files": "Attach Files",
    "embed_links": "Embed Links",
    "create_public_threads": "Create Public Threads",
    "manage_guild": "Manage Server",
}


class AccessDenied(GenerationError):
    """The server's settings or Discord's permissions do not allow this here; the message
    says what is missing and what to do."""


@dataclass(frozen=True)
class Rules:
    """A server's settings as they apply now.

    Args:
        models: The models members may pick here, in the configuration's order (empty when
            none of the server's allowed models is enabled any more).
        default_model: The model used when a member picks none (None when ``models`` is empty).
        max_duration: The longest track, in seconds.
        max_jobs_per_user: Live jobs per member here; None for the bot's limit.
        channels: The channels music is made in; empty for all.
        paused: Whether an admin paused the server's queue.
        stale_models: Models the server's settings name that are no longer enabled.
    """

    models: tuple[str, ...]
    default_model: str | None
    max_duration: float
    max_jobs_per_user: int | None
    channels: tuple[int, ...]
    paused: bool
    stale_models: tuple[str, ...] = ()

    def model(self, name: str) -> str:
        """``name`` (the default when empty) if members may use it here.

        Raises:
            InvalidOption: naming the models members may pick, or what an admin must do.
        """
        if not self.models:
            raise InvalidOption(
                "model",
                "None of the models this server allows is enabled any more: an admin can "
                "pick others with `/music admin settings allowed_models:all`.",
            )
        name = name or self.default_model or self.models[0]
        if name not in self.models:
            raise InvalidOption(
                "model", f"This server allows these models: {', '.join(self.models)}."
            )
        return name

    def check_duration(self, seconds: float) -> None:
        if seconds > self.max_duration:
            raise InvalidOption(
                "duration", f"This server allows tracks of up to {self.max_duration:g} s."
            )


def rules_for(settings: GuildSettings, config: Config) -> Rules:
    """``settings`` within what ``config`` enables."""
    enabled = config.generation.models
    chosen = settings.allowed_models
    models = tuple(name for name in enabled if not chosen or name in chosen)
    default = settings.default_model if settings.default_model in models else None
    longest = config.generation.max_duration
    return Rules(
        models=models,
        default_model=default or (models[0] if models else None),
        max_duration=min(settings.max_duration or longest, longest),
        max_jobs_per_user=settings.max_jobs_per_user,
        channels=settings.allowed_channels,
        paused=settings.paused,
        stale_models=tuple(
            dict.fromkeys(
                name
                for name in (*chosen, settings.default_model)
                if name is not None and name not in enabled
            )
        ),
    )


class Access:
    """Reads a server's rules and checks an interaction against them.

    Every slash command, button, form and menu that posts in a channel or opens a thread
    calls :meth:`check` before it does anything; the others read :meth:`rules`.
    """

    def __init__(self, store: JobStore, config: Config) -> None:
        self.store = store
        self.config = config

    async def rules(self, guild_id: int) -> Rules:
        return rules_for(await self.store.guild_settings(guild_id), self.config)

    async def check(
        self, interaction: discord.Interaction, *, posts: bool = True, threads: bool = False
    ) -> Rules:
        """The server's rules, once the interaction may go ahead.

        Args:
            posts: It posts in the channel for the member (a job, a track): the channel must
                be one music is made in, the member must be allowed to send messages there,
                and the bot to post a result.
            threads: It opens a public thread: both the member and the bot need Create Public
                Threads.

        Raises:
            AccessDenied: saying what is missing and what to do.
        """
        if interaction.guild_id is None:
            raise AccessDenied("Music is made in servers, not in direct messages.")
        rules = await self.rules(interaction.guild_id)
        channel = interaction.channel
        in_thread = isinstance(channel, discord.Thread)
        if posts:
            home = channel.parent_id if in_thread else interaction.channel_id
            if rules.channels and home not in rules.channels:
                channels = limits.fit_join([f"<#{c}>" for c in rules.channels], 1500)
                raise AccessDenied(f"In this server, music is made in {channels}.")
            send = "send_messages_in_threads" if in_thread else "send_messages"
            _require(interaction.permissions, [send], member=True)
            _require(interaction.app_permissions, [send, *RESULT_PERMISSIONS], member=False)
        if threads:
            _require(interaction.permissions, ["create_public_threads"], member=True)
            _require(
                interaction.app_permissions,
                ["create_public_threads", "send_messages_in_threads"],
                member=False,
            )
        return rules


def may_manage(interaction: discord.Interaction, owner_id: int) -> bool:
    """Whether the member may act on what ``owner_id`` made (a job): theirs, or they have
    Manage Server."""
    return interaction.user.id == owner_id or interaction.permissions.manage_guild


def _require(permissions: discord.Permissions, names: list[str], *, member: bool) -> None:
    missing = [PERMISSION_NAMES[name] for name in names if not getattr(permissions, name)]
    if not missing:
        return
    listed = " and ".join(f"**{name}**" for name in missing)
    if member:
        raise AccessDenied(
            f"You need {listed} in this channel for that: the bot only posts here for members "
            "who may post here themselves."
        )
    raise AccessDenied(
        f"I need {listed} in this channel for that: ask an admin to grant it, or use another "
        "channel."
    )
