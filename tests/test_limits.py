"""Every message and embed fits Discord's limits, whatever members type and however large
the queue, the jam or the settings."""

from __future__ import annotations

import discord
import pytest

from bot import limits, presentation
from bot.access import rules_for
from bot.config import Config, GenerationConfig
from generation.engine.models import resolve_model
from generation.jobs.estimates import Estimate
from generation.jobs.job import Job, JobStatus
from generation.jobs.sqlite import GuildSettings, Jam, Segment
from generation.request import GenerationRequest

from .bot_helpers import fields, make_bot

HOSTILE = "🎸" + "x" * 998 + "\n"  # a prompt of the longest length, with a line break


def check_embed(embed: discord.Embed) -> None:
    """Fail naming the first of Discord's limits ``embed`` breaks."""
    parts = {
        "title": (embed.title, limits.TITLE),
        "description": (embed.description, limits.DESCRIPTION),
        "footer": (embed.footer.text, limits.FOOTER),
        "author": (embed.author.name, limits.AUTHOR),
    }
    for index, field in enumerate(embed.fields):
        parts[f"field {index} name"] = (field.name, limits.FIELD_NAME)
        parts[f"field {index} value"] = (field.value, limits.FIELD_VALUE)
        assert field.name and field.value, f"field {index} is empty"
    for part, (text, limit) in parts.items():
        assert not text or len(text) <= limit, f"{part}: {len(text)} > {limit}"
    assert len(embed.fields) <= limits.FIELDS
    assert limits.embed_size(embed) <= limits.EMBED_TOTAL


def job(number: int, prompt: str = HOSTILE, user: int = 10**18, **fields) -> Job:
    request = GenerationRequest(prompt=prompt, model="debug", duration=60.0, seed=2**32 - 1)
    return Job(number, request, 1, 2, user + number, **fields)


# The helpers, with hostile input


def test_fit_lines_keeps_whole_lines_and_says_how_many_more():
    lines = [f"line {n} " + "y" * 90 for n in range(100)]
    text = limits.fit_lines(lines, 2000)
    assert len(text) <= 2000
    kept = text.splitlines()
    assert kept[:-1] == lines[: len(kept) - 1]
    assert kept[-1] == f"... and {100 - len(kept) + 1} more"


def test_fit_lines_can_keep_the_newest_after_a_head():
    lines = [f"{n}. " + "z" * 140 for n in range(1, 201)]
    text = limits.fit_lines(lines, 2000, head="Timeline:", newest_last=True, note=str)
    kept = text.splitlines()
    assert len(text) <= 2000 and kept[0] == "Timeline:"
    assert kept[-1] == lines[-1]
    assert int(kept[1]) == 200 - (len(kept) - 2)  # the note counts the earlier lines


def test_fit_lines_clips_a_first_line_too_long_for_the_limit():
    text = limits.fit_lines(["a" * 5000, "b" * 50], 100)
    assert len(text) <= 100 and text.startswith("a" * 80) and text.endswith("…\n... and 1 more")


def test_fit_join_ends_with_how_many_more():
    channels = [f"<#{10**18 + n}>" for n in range(500)]
    text = limits.fit_join(channels, 1024)
    assert len(text) <= 1024
    shown = text.split(" ... and ")[0].split(", ")
    assert shown == channels[: len(shown)]
    assert text.endswith(f"... and {500 - len(shown)} more")
    assert limits.fit_join(channels[:3], 1024) == ", ".join(channels[:3])


def test_fit_content_of_a_2000_character_prompt_and_more():
    text = limits.fit_content("Queued: " + "p" * 2000 + "\nnext line")
    assert len(text) <= 2000


def test_line_fields_split_between_lines():
    lines = [f"**option{n}**: " + "w" * 150 for n in range(40)]
    fields = limits.line_fields("Options", lines)
    assert [name for name, _ in fields[:2]] == ["Options", "Options (continued)"]
    assert all(len(value) <= limits.FIELD_VALUE for _, value in fields)
    assert "\n".join(value for _, value in fields).splitlines() == lines


def test_fit_embed_brings_every_part_and_the_total_within_limits():
    embed = discord.Embed(title=HOSTILE * 3, description="\n".join([HOSTILE] * 10))
    embed.set_footer(text="f" * 5000)
    embed.set_author(name="a" * 300)
    for n in range(40):
        embed.add_field(name=f"{n} " + "n" * 300, value="v" * 2000)
    fitted = limits.fit_embed(embed)
    check_embed(fitted)
    assert fitted.fields[-1].value.startswith("... and ")


# Every builder, with hostile input


def test_a_queue_of_a_thousand_long_jobs_fits():
    running = [job(n, status=JobStatus.RUNNING) for n in range(4)]
    queued = [(job(n), Estimate(n, n - 4, 60.0 * n)) for n in range(5, 1005)]
    embed = presentation.queue_embed(running, queued, paused=True)
    check_embed(embed)
    lines = embed.description.splitlines()
    assert lines[0].startswith("1. #5 ")
    assert lines[-1] == f"... and {1000 - len(lines) + 1} more"


def test_a_jam_timeline_of_500_turns_fits_and_shows_the_latest():
    jam = Jam(1, 1, 1, 1, "t" * 100)
    turns = [(Segment(n, n, n), job(n)) for n in range(1, 501)]
    text = presentation.jam_timeline(jam, turns)
    assert len(text) <= limits.CONTENT
    lines = text.splitlines()
    assert lines[0].startswith(f"**{'t' * 100}**")
    assert lines[1] == f"... {500 - len(lines) + 2} earlier turns"
    assert lines[-1].startswith("500. ")


def test_an_exported_jam_of_300_players_fits():
    jobs = [job(n) for n in range(300)]
    text = presentation.jam_exported_text(Jam(1, 1, 1, 1, "t" * 100), jobs, 999.0, 320)
    assert len(text) <= limits.CONTENT and "... and " in text


def test_settings_with_500_channels_and_every_model_fit():
    config = Config(generation=GenerationConfig(models=("debug", "debug-melody", "debug-stereo")))
    settings = GuildSettings(
        1,
        allowed_channels=tuple(range(10**18, 10**18 + 500)),
        allowed_models=tuple(f"{n}" + "x" * 250 for n in range(25)),
    )
    embed = presentation.settings_embed(settings, rules_for(settings, config), config)
    check_embed(embed)
    values = {field.name: field.value for field in embed.fields}
    assert values["Channels"].endswith(" more")
    assert values["No longer enabled (ignored)"].endswith(" more")


def test_history_of_long_prompts_fits():
    jobs = [job(n, result_url="https://discord.com/" + "u" * 80) for n in range(10)]
    check_embed(presentation.history_embed(jobs))


def test_help_fits_with_more_options(monkeypatch):
    extra = {f"option_{n}": "What it does, at some length. " * 3 for n in range(20)}
    monkeypatch.setattr(presentation, "OPTION_HELP", {**presentation.OPTION_HELP, **extra})
    embed = presentation.help_embed()
    check_embed(embed)
    text = "\n".join(field.value for field in embed.fields if field.name.startswith("Options"))
    assert all(f"**{name}**:" in text for name in presentation.OPTION_HELP)


def test_models_fit():
    specs = [resolve_model(name) for name in ("debug", "debug-melody", "debug-stereo")] * 9
    check_embed(presentation.models_embed(specs, "debug"))


# The bot end to end: SimCord refuses, as Discord does, a message over any limit


@pytest.mark.simcord(settle_timeout=60)
async def test_the_queue_of_35_waiting_jobs_is_shown(simcord_env, database, alice, admin, channel):
    many = {"max_jobs_per_user": 40, "max_jobs_per_guild": 40}
    await simcord_env.restart_bot(make_bot(database, queue=many))
    await admin.slash(channel, "music admin pause")
    for n in range(35):
        queued = await alice.slash(
            channel, "music generate", prompt=f"{n} {HOSTILE}"[:1000], duration=1.0
        )
        assert "Queued as job" in queued.response.content
    shown = await alice.slash(channel, "music queue")
    lines = shown.response.embeds[0].description.splitlines()
    assert lines[0].startswith("1. #") and lines[1].startswith("2. #")
    assert lines[-1] == f"... and {35 - len(lines) + 1} more"


@pytest.mark.simcord(settle_timeout=60)
async def test_settings_with_50_allowed_channels_are_shown(guild, admin, channel):
    for n in range(50):
        room = guild.create_text_channel(f"room-{n}")
        shown = await admin.slash(channel, "music admin settings", allow_channel=room)
        assert shown.response.embeds, shown.response.content
    channels = fields(shown.response)["Channels"]
    assert channels.startswith("<#") and channels.endswith(" more")


@pytest.mark.simcord(settle_timeout=60)
async def test_a_long_jam_timeline_keeps_updating(alice, admin, channel):
    # The released model cannot be loaded here: each turn fails at once, and still counts.
    await admin.slash(channel, "music admin settings", default_model="facebook/musicgen-small")
    await alice.slash(channel, "music jam start", title="Marathon")
    (thread,) = channel.threads
    for n in range(1, 17):
        await alice.slash(thread, "music jam add", prompt=f"part {n} {HOSTILE}"[:1000], length=1.0)
    lines = thread.history()[0].content.splitlines()
    assert lines[0].startswith("**Marathon**")
    assert lines[1] == f"... {16 - len(lines) + 2} earlier turns"
    assert lines[-1].startswith(f"16. <@{alice.id}>: *part 16 ") and lines[-1].endswith("(failed)")
