"""The buttons under every result (Re-roll, Continue, Edit, Variations, Stems, and Adopt) and
under a live job's status message (Cancel).

Each button's ``custom_id`` carries the job id, and everything else is read from the store,
so buttons keep working after a restart (the bot registers them with
``add_dynamic_items``). Anyone in the server may press a result's buttons: each press makes
the presser's own job, counted against their limits. Cancel is for the requester and for
members with Manage Server.

A button reaches the cog that handles it by name (``get_cog``), and knows it only by the
protocol below, so this module imports no cog (the cogs import it: no import cycle).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Protocol

import discord


class RemixActions(Protocol):
    """The buttons' part of the ``Remix`` cog."""

    async def reroll(self, interaction: discord.Interaction, job_id: int) -> None: ...
    async def ask_edit(self, interaction: discord.Interaction, job_id: int) -> None: ...
    async def variations(self, interaction: discord.Interaction, job_id: int) -> None: ...
    async def ask_continue(
        self, interaction: discord.Interaction, job_id: int, take: int
    ) -> None: ...
    async def stems(self, interaction: discord.Interaction, job_id: int, take: int) -> None: ...


class JamActions(Protocol):
    """The buttons' part of the ``Jams`` cog."""

    async def adopt(self, interaction: discord.Interaction, job_id: int, turn: int) -> None: ...


class CancelActions(Protocol):
    """The buttons' part of the ``Music`` cog."""

    async def cancel_from_button(self, interaction: discord.Interaction, job_id: int) -> None: ...


def cog(interaction: discord.Interaction, name: str) -> Any:
    """The loaded cog ``name`` of the bot the interaction came to."""
    found = interaction.client.get_cog(name)  # type: ignore[attr-defined]
    assert found is not None, f"the {name} cog is not loaded"
    return found


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"musicgen:(?P<action>[a-z]+):(?P<job>[0-9]+)",
):
    """A button about one job; subclasses name the action and what it does."""

    action: ClassVar[str]
    label: ClassVar[str]
    emoji: ClassVar[str]
    style: ClassVar[discord.ButtonStyle] = discord.ButtonStyle.secondary

    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=self.label,
                emoji=self.emoji,
                style=self.style,
                custom_id=f"musicgen:{self.action}:{job_id}",
            )
        )
        self.job_id = job_id

    def __init_subclass__(cls, *, action: str, **kwargs: Any) -> None:
        super().__init_subclass__(template=rf"musicgen:{action}:(?P<job>[0-9]+)", **kwargs)
        cls.action = action

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> JobButton:
        return cls(int(match["job"]))

    def remix(self, interaction: discord.Interaction) -> RemixActions:
        return cog(interaction, "Remix")


class ReRollButton(JobButton, action="reroll"):
    label, emoji = "Re-roll", "🎲"

    async def callback(self, interaction: discord.Interaction) -> None:
        await self.remix(interaction).reroll(interaction, self.job_id)


class EditButton(JobButton, action="edit"):
    label, emoji = "Edit", "✏️"

    async def callback(self, interaction: discord.Interaction) -> None:
        await self.remix(interaction).ask_edit(interaction, self.job_id)


class VariationsButton(JobButton, action="variations"):
    label, emoji = "Variations", "🎛️"

    async def callback(self, interaction: discord.Interaction) -> None:
        await self.remix(interaction).variations(interaction, self.job_id)


class ContinueButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"musicgen:continue:(?P<job>[0-9]+)(?::(?P<take>[0-9]+))?",
):
    """Continue one take of a job (a job of one take has one Continue button)."""

    def __init__(self, job_id: int, take: int | None = None) -> None:
        suffix = "" if take is None else f":{take}"
        super().__init__(
            discord.ui.Button(
                label="Continue" if take is None else f"Continue {take + 1}",
                emoji="⏩",
                style=discord.ButtonStyle.secondary,
                custom_id=f"musicgen:continue:{job_id}{suffix}",
                row=None if take is None else 1,
            )
        )
        self.job_id, self.take = job_id, take

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> ContinueButton:
        take = match["take"]
        return cls(int(match["job"]), None if take is None else int(take))

    async def callback(self, interaction: discord.Interaction) -> None:
        remix: RemixActions = cog(interaction, "Remix")
        await remix.ask_continue(interaction, self.job_id, self.take or 0)


class StemsButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"musicgen:stems:(?P<job>[0-9]+)(?::(?P<take>[0-9]+))?",
):
    """Split one take of a job into stems (a job of one take has one Stems button)."""

    def __init__(self, job_id: int, take: int | None = None) -> None:
        suffix = "" if take is None else f":{take}"
        super().__init__(
            discord.ui.Button(
                label="Stems" if take is None else f"Stems {take + 1}",
                emoji="🎚️",
                style=discord.ButtonStyle.secondary,
                custom_id=f"musicgen:stems:{job_id}{suffix}",
                row=None if take is None else 2,
            )
        )
        self.job_id, self.take = job_id, take

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> StemsButton:
        take = match["take"]
        return cls(int(match["job"]), None if take is None else int(take))

    async def callback(self, interaction: discord.Interaction) -> None:
        remix: RemixActions = cog(interaction, "Remix")
        await remix.stems(interaction, self.job_id, self.take or 0)


class AdoptButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"musicgen:adopt:(?P<job>[0-9]+):(?P<turn>[0-9]+)",
):
    """Make a re-roll (or an edit) of a relay jam's turn that turn, in the jam's timeline."""

    def __init__(self, job_id: int, turn: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"Adopt as turn {turn}",
                emoji="📌",
                style=discord.ButtonStyle.secondary,
                custom_id=f"musicgen:adopt:{job_id}:{turn}",
            )
        )
        self.job_id, self.turn = job_id, turn

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> AdoptButton:
        return cls(int(match["job"]), int(match["turn"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        jams: JamActions = cog(interaction, "Jams")
        await jams.adopt(interaction, self.job_id, self.turn)


BUTTONS = (
    ReRollButton,
    EditButton,
    VariationsButton,
    ContinueButton,
    StemsButton,
    AdoptButton,
)


class CancelButton(JobButton, action="cancel"):
    """Under a queued or running job's status message."""

    label, emoji, style = "Cancel", "✖️", discord.ButtonStyle.danger

    async def callback(self, interaction: discord.Interaction) -> None:
        music: CancelActions = cog(interaction, "Music")
        await music.cancel_from_button(interaction, self.job_id)


def status_view(job_id: int) -> discord.ui.View:
    """The buttons under a live job's status message."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    return view


def result_view(
    job_id: int, takes: int = 1, adopt_turn: int | None = None, *, stems: bool = False
) -> discord.ui.View:
    """The buttons for a result of job ``job_id``: one Continue and one Stems per take, and
    Adopt when the job is another take of a jam's turn ``adopt_turn``. A ``stems`` job's
    takes are its stems: each can be continued; there is nothing to re-roll or split."""
    view = discord.ui.View(timeout=None)
    if stems:
        for take in range(takes):
            view.add_item(ContinueButton(job_id, take))
        return view
    view.add_item(ReRollButton(job_id))
    if takes == 1:
        view.add_item(ContinueButton(job_id))
    view.add_item(EditButton(job_id))
    view.add_item(VariationsButton(job_id))
    if takes == 1:
        view.add_item(StemsButton(job_id))
    if takes > 1:
        for take in range(takes):
            view.add_item(ContinueButton(job_id, take))
        for take in range(takes):
            view.add_item(StemsButton(job_id, take))
    if adopt_turn is not None:
        view.add_item(AdoptButton(job_id, adopt_turn))
    return view
