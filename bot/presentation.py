"""How jobs, results, queues and models look in Discord: message text and embeds."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import discord
import numpy as np

from generation.audio.loop import MAX_LOOP_BARS, loop_bpm
from generation.audio.output import MP3_BITRATES
from generation.engine.models import ModelSpec
from generation.engine.results import GenerationResult
from generation.jobs.estimates import Estimate
from generation.jobs.job import Job, JobStatus
from generation.jobs.store import GuildSettings, Jam, Segment, Stats, WorkerInfo
from generation.origin import OriginKind
from generation.request import GenerationRequest

from . import limits
from .access import Rules
from .config import Config

#: Request fields whose Discord option has another name.
OPTION_NAMES = {"use_sampling": "no_sampling"}
DECODER_NAMES = {"encodec": "EnCodec", "mbd": "MultiBand Diffusion"}
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
    "loop": f"Cut to a seamless loop of this many bars (1-{MAX_LOOP_BARS}); BPM shown.",
    "decoder": "EnCodec (default, fast) or MultiBand Diffusion (cleaner, several times slower).",
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


#: Discord's limits on autocomplete: choices, and characters in a choice's name.
MAX_CHOICES, CHOICE_NAME_CHARS = 25, 100


def matching_jobs(jobs: Sequence[Job], typed: str) -> list[Job]:
    """The jobs (at most :data:`MAX_CHOICES`) whose number starts with what was typed (a
    leading '#' allowed), or whose prompt holds it."""
    typed = typed.strip().removeprefix("#").strip().lower()
    found = [
        job
        for job in jobs
        if str(job.id).startswith(typed)
        or (not typed.isdigit() and typed in job.request.prompt.lower())
    ]
    return found[:MAX_CHOICES]


def job_choice(job: Job, owner: str | None = None) -> str:
    """An autocomplete choice for a job: '#12 lo-fi beat (done)', with whose if not yours."""
    status = job.status.value if owner is None else f"{job.status.value}, {short(owner, 32)}'s"
    head, tail = f"#{job.id} ", f" ({status})"
    return head + short(job.request.prompt, CHOICE_NAME_CHARS - len(head) - len(tail)) + tail


def queued_text(job: Job, estimate: Estimate | None) -> str:
    """A queued job's status: its place and ETA, or (no estimate) that it waits for an
    admin."""
    text = f"Queued as job #{job.id}: **{short(job.request.prompt, 100)}**"
    if estimate is None:
        return f"{text}. {PAUSED}"
    return f"{text}, position {estimate.position}, ready in {duration_text(estimate.seconds)}."


#: What a job of a paused server waits for.
PAUSED = "This server's queue is paused by an admin: it waits until an admin resumes it."


def running_text(job: Job) -> str:
    """A running job's status: starting, then its progress."""
    request = job.request
    what = f"job #{job.id}: **{short(request.prompt, 100)}** with {request.model}, "
    what += f"{request.duration:g} s"
    if job.progress[1] == 0:
        return f"Starting {what}."
    return f"Generating {what}\n`{progress_bar(job.fraction_done)}` {job.fraction_done:.0%}"


def outcome_text(job: Job, outcome: str, url: str) -> str:
    """A status message's last words: how the job ended and a link to the message that says
    more ("is ready", "failed")."""
    return f"Job #{job.id}, **{short(job.request.prompt, 100)}**, {outcome}: {url}"


def result_embed(
    job: Job, results: list[GenerationResult], bitrate: int, *, complete: bool = False
) -> discord.Embed:
    """A result: prompt, requester, where it came from, model, duration and seed, then the
    options that differ from the defaults (``complete``: every option, the generation time
    and the MP3's bitrate). The MP3's tags always hold every option."""
    result = results[0]
    request = result.request
    embed = discord.Embed(title=short(request.prompt, 250), colour=COLOUR)
    lines = [origin_text(job), f"Requested by <@{job.user_id}>"]
    embed.description = "\n".join(line for line in lines if line)
    seeds = ", ".join(str(take.request.seed) for take in results)
    values = {
        "Model": request.model,
        "Duration": f"{result.seconds:.1f} s",
        "Seeds" if len(results) > 1 else "Seed": seeds,
    }
    if request.stem:  # a stems job: one seed, the track's; its takes are the stems
        values.pop("Seeds", None)
        values["Seed"] = str(request.seed)
        levels = [_rms(result.audio) for result in results]
        values["Stems"] = ", ".join(
            f"{take + 1}. {result.request.stem}"
            + (" (silent)" if level < max(levels) * 10 ** (SILENT_STEM_DB / 20) else "")
            for take, (result, level) in enumerate(zip(results, levels, strict=True))
        )
    if request.loop:
        values["Loop"] = f"{request.loop} bars at {loop_bpm(request.loop, result.seconds):.1f} BPM"
    for field, (name, text) in _OPTION_FIELDS.items():
        if complete or getattr(request, field) != getattr(_DEFAULTS, field):
            values[name] = text(getattr(request, field))
    clips = job.clips
    if "melody" in clips:
        values["Melody"] = f"{clips['melody'].seconds:.1f} s clip"
    if "continuation" in clips:
        values["Continuation of"] = f"{clips['continuation'].seconds:.1f} s intro"
    if complete:
        values["Generated in"] = f"{result.generation_seconds:.1f} s"
    if complete or bitrate < MP3_BITRATES[0]:
        values["MP3"] = f"{bitrate} kbit/s"
    for name, value in values.items():
        embed.add_field(name=name, value=value)
    embed.set_footer(text=f"Job #{job.id}")
    return limits.fit_embed(embed)


#: A stem this much quieter than the loudest (RMS, in dB) holds nothing: MusicGen rarely
#: sings, so its vocal stem is mostly leakage.
SILENT_STEM_DB = -40.0


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0


_DEFAULTS = GenerationRequest(prompt="", model="")
#: The sampling options a result shows when they differ from the defaults: name and text.
_OPTION_FIELDS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "temperature": ("Temperature", lambda value: f"{value:g}"),
    "top_k": ("Top-k", str),
    "top_p": ("Top-p", lambda value: f"{value:g}"),
    "cfg_coef": ("CFG coef", lambda value: f"{value:g}"),
    "use_sampling": ("Sampling", lambda value: "on" if value else "off (greedy)"),
    "two_step_cfg": ("Two-step CFG", lambda value: "on" if value else "off"),
    "extend_stride": ("Extend stride", lambda value: f"{value:g} s"),
    "decoder": ("Decoder", lambda value: DECODER_NAMES.get(value, value)),
}


def origin_text(job: Job) -> str | None:
    """Where a job came from: "Re-roll of #1", "Continues take 2 of #4", "Turn 3 of the jam"."""
    origin = job.origin
    if origin is None:
        return None
    source = f"#{origin.job_id}"
    if origin.take:
        source = f"take {origin.take + 1} of {source}"
    text = {
        OriginKind.REROLL: f"Re-roll of {source}",
        OriginKind.EDIT: f"Edit of {source}",
        OriginKind.VARIATIONS: f"Variations of {source}",
        OriginKind.CONTINUATION: f"Continues {source}",
        OriginKind.UPLOAD_CONTINUATION: "Continues an upload",
        OriginKind.UPLOAD_MELODY: "Melody from an upload",
        OriginKind.JAM_TURN: f"Turn {origin.turn} of the jam",
        OriginKind.STEMS: f"Stems of {source}",
    }[origin.kind]
    if origin.filename:
        text += f" ({short(origin.filename, 60)})"
    if origin.kind is OriginKind.JAM_TURN:
        return text + (f", continues #{origin.job_id}" if origin.job_id is not None else "")
    if origin.turn is None:
        return text
    if job.adoptable_turn is not None:
        return (
            f"{text} (turn {origin.turn} of the jam): another take of that turn, not in the "
            f"jam unless adopted with **Adopt as turn {origin.turn}**."
        )
    return f"{text} (turn {origin.turn} of the jam): not a turn of the jam."


def plural(count: int, noun: str) -> str:
    """'1 turn', '3 turns'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def message_url(guild_id: int, channel_id: int, message_id: int) -> str:
    return f"https://discord.com/channels/{guild_id}/{channel_id}/{message_id}"


def job_link(job: Job) -> str:
    """'job #5', linked to the job's result (else its status message) when there is one."""
    url = job.result_url
    if url is None and job.reply is not None:
        url = message_url(job.guild_id, job.channel_id, job.reply.message_id)
    return f"[job #{job.id}]({url})" if url else f"job #{job.id}"


def jam_timeline(jam: Jam, turns: list[tuple[Segment, Job]]) -> str:
    """The thread's first message: who added which turn, in order, each linked to its
    message (the latest turns when they do not all fit)."""
    head = f"**{jam.title}**, a relay jam started by <@{jam.user_id}>. Timeline:"
    lines = []
    for segment, job in turns:
        status = "" if job.status is JobStatus.DONE else f" ({job.status.value})"
        lines.append(
            f"{segment.position}. <@{job.user_id}>: *{short(job.request.prompt, 100)}* "
            f"({job_link(job)}){status}"
        )
    if not turns:
        lines.append("No turns yet: `/music jam add prompt:<your part>` takes the first.")
    return limits.fit_lines(lines, limits.CONTENT, head=head, newest_last=True, note=_earlier_turns)


def _earlier_turns(count: int) -> str:
    return f"... {plural(count, 'earlier turn')}"


def jam_exported_text(jam: Jam, jobs: list[Job], seconds: float, bitrate: int) -> str:
    """What goes with an exported jam: its turns, players, length and bitrate."""
    players = limits.fit_join(list(dict.fromkeys(f"<@{job.user_id}>" for job in jobs)), 1000)
    return limits.fit_content(
        f"**{jam.title}**: {plural(len(jobs), 'turn')} by {players}, {seconds:.1f} s "
        f"({bitrate} kbit/s)."
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
    running: list[Job], queued: list[tuple[Job, Estimate | None]], paused: bool
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
        f"{index}. {job_summary(job)}, waits for an admin"
        if estimate is None
        else f"{estimate.position}. {job_summary(job)}, ready in {duration_text(estimate.seconds)}"
        for index, (job, estimate) in enumerate(queued, start=1)
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
    workers: Sequence[WorkerInfo],
    memory: dict[str, int],
) -> discord.Embed:
    """``/music stats``: the server's finished jobs, the queue, and every live worker with its
    models and what it runs (``memory``: the engine's, when it runs in this process)."""
    embed = discord.Embed(title="How the bot is doing", colour=COLOUR)
    values = {
        "Served": str(stats.served),
        "Failed": str(stats.failed),
        "Cancelled": str(stats.cancelled),
        "Median wait": _seconds(stats.median_wait_seconds),
        "Median generation": _seconds(stats.median_generation_seconds),
        "Queued": f"{queued_here} here, {queued_everywhere} in all",
    }
    if not workers:
        values["Workers"] = "none connected: queued jobs wait for one"
    for worker in workers[:MAX_WORKERS_SHOWN]:
        doing = ", ".join(f"#{job}" for job in worker.jobs) or "idle"
        values[short(f"Worker {worker.host} ({worker.device})", 256)] = short(
            f"Loaded: {', '.join(worker.loaded) or 'none'}; running: {doing}", 1024
        )
    values.update({f"Memory ({kind})": f"{size / 2**20:,.0f} MiB" for kind, size in memory.items()})
    for name, value in values.items():
        embed.add_field(name=name, value=value)
    embed.set_footer(
        text=f"Counts: the finished jobs kept here. Medians: the last {stats.median_of:,}."
    )
    return limits.fit_embed(embed)


#: Workers listed one by one in ``/music stats`` (an embed holds 25 fields).
MAX_WORKERS_SHOWN = 10


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
        "**Edit** (prompt, duration, temperature), **Variations** and **Stems** (drums, bass, "
        "other, vocals as separate files). On any message with "
        "audio, the message menu's **Continue this track** and **Use as melody**. Anyone in "
        "the server may use them on anyone's track: each makes your own job, counted against "
        "your limits.\n`/music jam start` opens a thread for a relay jam; there, "
        "`/music jam add` carries the track on with your prompt, and `/music jam export` "
        "posts it whole (`segments` for each turn too). Re-roll or Edit on a turn makes "
        "another take of it, which its **Adopt as turn N** button puts in the jam.",
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
