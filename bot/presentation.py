"""How jobs, results, queues and models look in Discord: message text and embeds."""

from __future__ import annotations

import re
from collections.abc import Sequence

import discord

from generation.engine import GenerationResult
from generation.models import ModelSpec
from generation.queue import Job, JobStatus
from generation.store import GuildSettings, Jam, Segment, Stats

from . import limits
from .access import Rules
from .config import Config

#: Request fields whose Discord option has another name.
OPTION_NAMES = {"use_sampling": "no_sampling"}
COLOUR = discord.Colour.blurple()

TIPS = (
    "Start with a small model to try ideas, then move up.",
    "Temperature 0.7-1.2 gives balanced results: lower is more predictable, higher more "
    "adventurous.",
    "To follow a tune, attach it as `melody` and pick a melody model.",
    "For a `continuation`, describe music in the same style as the intro.",
    "Stereo models give a richer, wider sound.",
)

OPTION_HELP = {
    "prompt": "What the music should be: genre, instruments, mood, tempo.",
    "model": "Which MusicGen model to use (see `/music models`).",
    "duration": "Length in seconds, intro included; above 30 s the model extends in windows.",
    "temperature": "0.0-2.0 (default 1.0): higher is more creative, lower more predictable.",
    "top_k": "Sample among the K most likely tokens (default 250; 0 means all).",
    "top_p": "0.0-1.0 (default 0): nucleus sampling; 0 uses top_k instead.",
    "cfg_coef": "How strongly the music follows the prompt (default 3.0).",
    "no_sampling": "Greedy decoding: always the most likely token.",
    "melody": "An audio clip whose melody the music follows (melody models only).",
    "continuation": "An intro to extend; the result starts with it.",
    "two_step_cfg": "Guidance as two passes instead of one batch.",
    "extend_stride": "Seconds each window moves on when going past 30 s (default 18).",
    "seed": "Repeat a result: the same seed and options give the same music.",
}


def option_name(field: str) -> str:
    """The Discord option for a request field."""
    return OPTION_NAMES.get(field, field)


def short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration_text(seconds: float) -> str:
    """'about 40 s', 'about 3 min'."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    return f"about {round(seconds / 60)} min"


def progress_bar(fraction: float, width: int = 20) -> str:
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled)


def job_summary(job: Job) -> str:
    request = job.request
    details = f"{request.model}, {request.duration:g} s"
    return f"#{job.id} <@{job.user_id}>: {short(request.prompt)} ({details})"


def queued_text(job: Job, position: int, eta: float, paused: bool) -> str:
    text = (
        f"Queued as job #{job.id}: **{short(job.request.prompt, 100)}**, position {position}, "
        f"ready in {duration_text(eta)}."
    )
    if paused:
        text += " This server's queue is paused by an admin: it starts when they resume it."
    return text


def running_text(job: Job) -> str:
    request = job.request
    return (
        f"Generating job #{job.id}: **{short(request.prompt, 100)}** with {request.model}, "
        f"{request.duration:g} s\n`{progress_bar(job.fraction_done)}` "
        f"{job.fraction_done:.0%}"
    )


def result_embed(job: Job, results: list[GenerationResult], bitrate: int) -> discord.Embed:
    """Every parameter of the result (the seed of each take), so anyone can reproduce it."""
    result = results[0]
    request = result.request
    embed = discord.Embed(title=short(request.prompt, 250), colour=COLOUR)
    seeds = ", ".join(str(take.request.seed) for take in results)
    values = {
        "Model": request.model,
        "Duration": f"{result.seconds:.1f} s",
        "Seeds" if len(results) > 1 else "Seed": seeds,
        "Temperature": f"{request.temperature:g}",
        "Top-k": str(request.top_k),
        "Top-p": f"{request.top_p:g}",
        "CFG coef": f"{request.cfg_coef:g}",
        "Sampling": "on" if request.use_sampling else "off (greedy)",
        "Two-step CFG": "on" if request.two_step_cfg else "off",
        "Extend stride": f"{request.extend_stride:g} s",
    }
    if request.melody is not None:
        values["Melody"] = f"{request.melody.seconds:.1f} s clip"
    if request.continuation is not None:
        values["Continuation of"] = f"{request.continuation.seconds:.1f} s intro"
    values["Generated in"] = f"{result.generation_seconds:.1f} s"
    values["MP3"] = f"{bitrate} kbit/s"
    for name, value in values.items():
        embed.add_field(name=name, value=value)
    embed.set_footer(text=f"Job #{job.id}")
    return limits.fit_embed(embed)


def jam_timeline(jam: Jam, turns: list[tuple[Segment, Job]]) -> str:
    """The thread's first message: who added which turn, in order (the latest turns when
    they do not all fit)."""
    head = f"**{jam.title}**, a relay jam started by <@{jam.user_id}>. Timeline:"
    lines = []
    for segment, job in turns:
        status = "" if job.status is JobStatus.DONE else f" ({job.status.value})"
        lines.append(
            f"{segment.position}. <@{job.user_id}>: *{short(job.request.prompt, 100)}* "
            f"(job #{job.id}){status}"
        )
    if not turns:
        lines.append("No turns yet: `/music jam add prompt:<your part>` takes the first.")
    return limits.fit_lines(lines, limits.CONTENT, head=head, newest_last=True, note=_earlier_turns)


def _earlier_turns(count: int) -> str:
    return f"... {count} earlier turn{'' if count == 1 else 's'}"


def jam_exported_text(jam: Jam, jobs: list[Job], seconds: float, bitrate: int) -> str:
    """What goes with an exported jam: its turns, players, length and bitrate."""
    players = limits.fit_join(list(dict.fromkeys(f"<@{job.user_id}>" for job in jobs)), 1000)
    return limits.fit_content(
        f"**{jam.title}**: {len(jobs)} turns by {players}, {seconds:.1f} s ({bitrate} kbit/s)."
    )


def jam_tags(jam: Jam, jobs: list[Job]) -> dict[str, str]:
    """ID3 tags of a stitched jam: each turn's job, to find its parameters."""
    return {
        "title": jam.title,
        "artist": "musicgen-bot",
        "comment": "Relay jam of jobs " + ", ".join(f"#{job.id}" for job in jobs),
        "musicgen_jobs": ",".join(str(job.id) for job in jobs),
    }


def jam_filename(jam: Jam) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", jam.title.lower()).strip("-")[:40] or "jam"
    return f"{slug}.mp3"


def queue_embed(
    running: list[Job], queued: list[tuple[Job, int, float]], paused: bool
) -> discord.Embed:
    """A server's queue: the running jobs, then each queued job with position and ETA."""
    embed = discord.Embed(title="Music queue", colour=COLOUR)
    for job in running:
        embed.add_field(
            name="Now generating",
            value=f"{job_summary(job)}, {job.fraction_done:.0%} done",
            inline=False,
        )
    lines = [
        f"{position}. {job_summary(job)}, ready in {duration_text(eta)}"
        for job, position, eta in queued
    ]
    embed.description = (
        limits.fit_lines(lines, limits.DESCRIPTION) if lines else "No jobs waiting in this server."
    )
    if paused:
        embed.set_footer(text="Paused by an admin: queued jobs wait until /music admin resume.")
    return limits.fit_embed(embed)


def models_embed(specs: list[ModelSpec], default: str) -> discord.Embed:
    embed = discord.Embed(title="Models", colour=COLOUR)
    for spec in specs:
        name = spec.name + (" (default)" if spec.name == default else "")
        embed.add_field(name=name, value=spec.description, inline=False)
    return limits.fit_embed(embed)


def history_embed(jobs: list[Job]) -> discord.Embed:
    """A member's recent jobs, newest first, each with its parameters and result."""
    embed = discord.Embed(title="Your recent tracks", colour=COLOUR)
    if not jobs:
        embed.description = "Nothing yet: try `/music generate`."
        return embed
    for job in jobs:
        request = job.request
        details = (
            f"{request.model}, {request.duration:g} s, seed {request.seed}, "
            f"temperature {request.temperature:g}, top-k {request.top_k}, "
            f"top-p {request.top_p:g}, CFG {request.cfg_coef:g}"
        )
        status = job.status.value
        if job.status is JobStatus.DONE and job.result_url:
            status = f"[result]({job.result_url})"
        elif job.delivery_failure:
            status = undelivered_text(job)
        embed.add_field(
            name=f"#{job.id}: {short(request.prompt, 200)}",
            value=f"{details}\n{status}",
            inline=False,
        )
    return limits.fit_embed(embed)


def undelivered_text(job: Job) -> str:
    """How a job ended, for a member who could not be told (it is kept for their history)."""
    if job.status is JobStatus.DONE:
        outcome = f"done: get it with `/music show job:{job.id}`"
    elif job.error:
        outcome = f"failed: {short(job.error, 300)}"
    else:
        outcome = job.status.value
    return f"{outcome} (not delivered: {short(job.delivery_failure or '', 200)})"


def settings_embed(settings: GuildSettings, rules: Rules, config: Config) -> discord.Embed:
    """A server's settings as they apply (``rules``), with the bot's defaults where the server
    has none."""
    embed = discord.Embed(title="Server settings", colour=COLOUR)
    default = rules.default_model or "none"
    channels = [f"<#{channel}>" for channel in rules.channels]
    values = {
        "Default model": default + ("" if settings.default_model else " (bot default)"),
        "Allowed models": limits.fit_join(rules.models, limits.FIELD_VALUE - 8)
        + ("" if settings.allowed_models else " (all)"),
        "Longest track": f"{rules.max_duration:g} s",
        "Jobs per member": str(rules.max_jobs_per_user or config.queue.max_jobs_per_user),
        "Channels": limits.fit_join(channels, limits.FIELD_VALUE) or "all",
        "Queue": "paused" if rules.paused else "running",
    }
    if rules.stale_models:
        values["No longer enabled (ignored)"] = limits.fit_join(
            rules.stale_models, limits.FIELD_VALUE
        )
    for name, value in values.items():
        embed.add_field(name=name, value=value or "none")
    return limits.fit_embed(embed)


def stats_embed(
    stats: Stats,
    *,
    queued_here: int,
    queued_everywhere: int,
    loaded_models: Sequence[str],
    memory: dict[str, int],
) -> discord.Embed:
    embed = discord.Embed(title="How the bot is doing", colour=COLOUR)
    values = {
        "Served": str(stats.served),
        "Failed": str(stats.failed),
        "Cancelled": str(stats.cancelled),
        "Median wait": _seconds(stats.median_wait_seconds),
        "Median generation": _seconds(stats.median_generation_seconds),
        "Queued": f"{queued_here} here, {queued_everywhere} in all",
        "Loaded models": ", ".join(loaded_models) or "none",
    }
    values.update({f"Memory ({kind})": f"{size / 2**20:,.0f} MiB" for kind, size in memory.items()})
    for name, value in values.items():
        embed.add_field(name=name, value=value)
    return limits.fit_embed(embed)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def help_embed() -> discord.Embed:
    embed = discord.Embed(
        title="Making music",
        colour=COLOUR,
        description="`/music generate prompt:<what you want>` and the options below.",
    )
    options = [f"**{name}**: {text}" for name, text in OPTION_HELP.items()]
    for name, value in limits.line_fields("Options", options):
        embed.add_field(name=name, value=value, inline=False)
    embed.add_field(name="Tips", value="\n".join(f"• {tip}" for tip in TIPS), inline=False)
    embed.add_field(
        name="Playing together",
        value="Under every result: **Re-roll** (a new seed), **Continue** (carry it on), "
        "**Edit** (prompt, duration, temperature) and **Variations**. On any message with "
        "audio, the message menu's **Continue this track** and **Use as melody**. Anyone in "
        "the server may use them on anyone's track: each makes your own job, counted against "
        "your limits.\n`/music jam start` opens a thread for a relay jam; there, "
        "`/music jam add` carries the track on with your prompt, and `/music jam export` "
        "posts it whole (`segments` for each turn too).",
        inline=False,
    )
    embed.add_field(
        name="Other commands",
        value="`/music queue`, `/music cancel`, `/music history`, `/music show`, "
        "`/music models`; admins: `/music stats`, `/music admin pause`, "
        "`/music admin resume` and `/music admin settings`.",
        inline=False,
    )
    return limits.fit_embed(embed)
