"""The Discord layer of musicgen-bot: slash commands on top of the generation engine."""

from .bot import create_bot

__all__ = ["create_bot"]
