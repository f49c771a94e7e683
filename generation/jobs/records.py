"""Jobs as both stores keep them: a row's columns to a :class:`Job`, a request to the JSON
the row holds, and clips to and from the store's 24-bit grid (CPU work: callers run it on a
thread)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from generation.audio.stored import StoredClip, to_grid
from generation.jobs.job import ClipRecord, Job, JobStatus, ReplyAddress
from generation.origin import Origin
from generation.request import AudioClip, GenerationRequest

#: The request's audio inputs: kept as uploads, not in the request's JSON.
AUDIO_OPTIONS = ("melody", "continuation", "stems_of")


def request_json(request: GenerationRequest) -> str:
    """Every field of ``request`` but its clips, as the jobs table keeps it."""
    values = {
        f.name: getattr(request, f.name)
        for f in fields(GenerationRequest)
        if f.name not in AUDIO_OPTIONS
    }
    return json.dumps(values)


def job_from_row(row: Mapping[str, Any]) -> Job:
    """A job from its row (any mapping of the jobs table's columns), without its clips."""
    reply = None
    if row["reply_message_id"] is not None:  # kept after the token is forgotten, to link to
        reply = ReplyAddress(
            row["reply_application_id"],
            row["reply_token"],
            row["reply_expires_at"],
            row["reply_message_id"],
            row["reply_max_upload_bytes"],
        )
    return Job(
        id=row["id"],
        request=GenerationRequest(**json.loads(row["request"])),
        takes=row["takes"],
        origin=Origin.from_json(row["origin"]),
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        user_id=row["user_id"],
        status=JobStatus(row["status"]),
        reply=reply,
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        progress=(row["progress_done"] or 0, row["progress_total"] or 0),
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        generation_seconds=row["generation_seconds"],
        error=row["error"],
        delivered=bool(row["delivered"]),
        result_url=row["result_url"],
        result_expired_at=row["result_expired_at"],
        uploads_expired_at=row["uploads_expired_at"],
        delivery_attempts=row["delivery_attempts"],
        delivery_failure=row["delivery_failure"],
    )


def clip_records(clips: Mapping[str, Sequence[Any]]) -> dict[str, ClipRecord]:
    """A job's clips from ``{option: [seconds, hash]}``, as both stores aggregate them."""
    return {option: ClipRecord(seconds, digest) for option, (seconds, digest) in clips.items()}


def decoded(flac: bytes, exponent: int) -> AudioClip:
    return StoredClip.from_flac(flac, exponent).clip


def on_grid(clip: AudioClip) -> tuple[StoredClip, str]:
    """``clip`` as the store keeps it, and its content hash."""
    stored = to_grid(clip)
    return stored, stored.content_hash
