"""The forms behind the buttons and context menus: a few text fields, read as a dict.

Discord modals only hold text; the fields are parsed (with an error that names the field)
by :func:`number`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import discord

from generation.errors import InvalidOption
from generation.request import MAX_PROMPT_CHARS

#: How long a shown form waits to be submitted, in seconds.
FORM_TIMEOUT = 15 * 60

Submit = Callable[[discord.Interaction, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    default: str = ""
    long: bool = False


def prompt_field(default: str = "") -> Field:
    return Field("prompt", "Prompt: genre, instruments, mood, tempo", default, long=True)


class Form(discord.ui.Modal):
    """A modal whose text inputs have ``custom_id`` ``musicgen:<field name>``."""

    def __init__(self, title: str, fields: list[Field], submit: Submit) -> None:
        super().__init__(title=title, timeout=FORM_TIMEOUT)
        self._submit = submit
        for field in fields:
            self.add_item(
                discord.ui.TextInput(
                    label=field.label,
                    custom_id=f"musicgen:{field.name}",
                    default=field.default or None,
                    style=discord.TextStyle.paragraph if field.long else discord.TextStyle.short,
                    max_length=MAX_PROMPT_CHARS if field.long else 20,
                )
            )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        values = {
            item.custom_id.removeprefix("musicgen:"): item.value.strip()
            for item in self.children
            if isinstance(item, discord.ui.TextInput)
        }
        await self._submit(interaction, values)


def number(values: dict[str, str], field: str, low: float, high: float) -> float:
    """The field ``field`` as a number between ``low`` and ``high``."""
    text = values.get(field, "").removesuffix("s").strip()
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # also rejects NaN
        raise InvalidOption(field, f"Enter a number between {low:g} and {high:g}.")
    return value
