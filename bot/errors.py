"""One place that turns errors into the short, ephemeral replies members see."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import discord
from discord import app_commands

from generation.errors import GenerationError, InvalidOption, InvalidOptions

from .limits import fit_content
from .presentation import option_name

log = logging.getLogger(__name__)

UNEXPECTED = "Something went wrong on our side. Please try again in a moment."


def user_message(error: Exception) -> str:
    """What to tell the member; never a traceback, never internal details."""
    if isinstance(error, InvalidOption):
        return f"**{option_name(error.option)}**: {error.message}"
    if isinstance(error, InvalidOptions):
        return "\n".join(user_message(each) for each in error.errors)
    if isinstance(error, GenerationError):
        return str(error)
    if isinstance(error, app_commands.MissingPermissions):
        return "Only members with **Manage Server** can do that."
    if isinstance(error, app_commands.CheckFailure):
        return "You can't use that command here."
    return UNEXPECTED


async def reply_privately(interaction: discord.Interaction, content: str) -> None:
    """Answer only the member who asked.

    A public "thinking..." response cannot turn private: it is closed, the answer goes in a
    private follow-up, and the public message is deleted.
    """
    content = fit_content(content)
    if not interaction.response.is_done():
        await interaction.response.send_message(content, ephemeral=True)
        return
    await interaction.edit_original_response(content="That request was not queued.")
    await interaction.followup.send(content, ephemeral=True)
    with contextlib.suppress(discord.HTTPException):
        await interaction.delete_original_response()


async def on_app_command_error(
    interaction: discord.Interaction, error: app_commands.AppCommandError
) -> None:
    """The tree's error handler: expected errors get their message, the rest are logged."""
    cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
    if not isinstance(cause, GenerationError | app_commands.CheckFailure):
        command = interaction.command.qualified_name if interaction.command else "?"
        log.error("command %s failed", command, exc_info=cause)
    try:
        await reply_privately(interaction, user_message(cause))
    except discord.HTTPException:
        log.warning("could not tell the member about an error")


@contextlib.asynccontextmanager
async def answering(interaction: discord.Interaction) -> AsyncIterator[None]:
    """Turn an error in a button or form into a private answer (the tree's error handler
    only sees slash commands and context menus)."""
    try:
        yield
    except GenerationError as error:
        await reply_privately(interaction, user_message(error))
    except Exception:
        log.exception("a button or form failed")
        with contextlib.suppress(discord.HTTPException):
            await reply_privately(interaction, UNEXPECTED)
