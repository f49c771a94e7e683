"""The forms behind the buttons and context menus: a few text fields, read as a dict.

Discord modals only hold text; :func:`read_form` parses the fields and reports every one at
fault. What a member typed into a refused form is kept (:class:`Drafts`), so the form shows
it again when they reopen it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import discord

from generation.errors import InvalidOption, InvalidOptions
from generation.request import MAX_PROMPT_CHARS

#: How long a shown form waits to be submitted, in seconds.
FORM_TIMEOUT = 15 * 60

#: Handles a submitted form; returns whether it was accepted.
Submit = Callable[[discord.Interaction, dict[str, str]], Awaitable[bool]]


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    default: str = ""
    long: bool = False


def prompt_field(default: str = "") -> Field:
    return Field("prompt", "Prompt: genre, instruments, mood, tempo", default, long=True)


class Drafts:
    """What members typed into forms that were refused, by member and form, so reopening a
    form keeps it. Bounded: beyond ``limit`` drafts, the oldest is forgotten."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._drafts: OrderedDict[tuple[int, Hashable], dict[str, str]] = OrderedDict()

    def get(self, user_id: int, form: Hashable) -> dict[str, str]:
        return self._drafts.get((user_id, form), {})

    def keep(self, user_id: int, form: Hashable, values: dict[str, str]) -> None:
        self._drafts[user_id, form] = values
        self._drafts.move_to_end((user_id, form))
        while len(self._drafts) > self.limit:
            self._drafts.popitem(last=False)

    def forget(self, user_id: int, form: Hashable) -> None:
        self._drafts.pop((user_id, form), None)


class Form(discord.ui.Modal):
    """A modal whose text inputs have ``custom_id`` ``musicgen:<field name>``.

    With ``drafts``, the member's draft of form ``key`` (what they typed when it was last
    refused) replaces the fields' defaults, and is kept or forgotten as ``submit`` refuses
    or accepts the form.
    """

    def __init__(
        self,
        title: str,
        fields: list[Field],
        submit: Submit,
        *,
        member: int,
        drafts: Drafts | None = None,
        key: Hashable = None,
    ) -> None:
        super().__init__(title=title, timeout=FORM_TIMEOUT)
        self._submit = submit
        self._drafts, self._member, self._key = drafts, member, key or title
        typed = drafts.get(member, self._key) if drafts is not None else {}
        for field in fields:
            default = typed.get(field.name, field.default)
            self.add_item(
                discord.ui.TextInput(
                    label=field.label,
                    custom_id=f"musicgen:{field.name}",
                    default=default or None,
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
        accepted = await self._submit(interaction, values)
        if self._drafts is not None:
            if accepted:
                self._drafts.forget(self._member, self._key)
            else:
                self._drafts.keep(self._member, self._key, values)


def read_form(values: dict[str, str], numbers: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The fields named in ``numbers`` as numbers within their (low, high) range.

    Raises:
        InvalidOptions: naming every field at fault (an empty prompt too), not the first.
    """
    errors, parsed = [], {}
    if "prompt" in values and not values["prompt"]:
        errors.append(InvalidOption("prompt", "Describe the music you want."))
    for field, (low, high) in numbers.items():
        try:
            parsed[field] = number(values, field, low, high)
        except InvalidOption as error:
            errors.append(error)
    if errors:
        raise InvalidOptions(errors)
    return parsed


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
