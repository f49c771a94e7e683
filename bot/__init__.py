"""The Discord layer of musicgen-bot: slash commands on top of the generation engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bot import create_bot

__all__ = ["create_bot"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the bot pulls in discord.py, the engine and torch, which
    # `musicgen-bot --help` and `bot.config` do not need.
    if name == "create_bot":
        from .bot import create_bot

        return create_bot
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
