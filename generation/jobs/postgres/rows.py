"""Jobs to and from rows, and audio to and from the FLAC the store keeps (conversions run
on a thread by the callers: they are CPU work)."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import fields, replace

import numpy as np
import psycopg
import soundfile

from generation.audio.stored import StoredClip, to_grid
from generation.jobs.job import ClipRecord, Job, JobStatus, ReplyAddress
from generation.origin import Origin
from generation.request import AudioClip, GenerationRequest

AUDIO_OPTIONS = ("melody", "continuation")


async def with_uploads(
    db: psycopg.AsyncConnection[dict], job_id: int, request: GenerationRequest
) -> GenerationRequest:
    rows = await (
        await db.execute(
            """SELECT job_uploads.option, uploads.exponent, uploads.flac
               FROM job_uploads JOIN uploads ON uploads.hash = job_uploads.hash
               WHERE job_uploads.job_id = %s""",
            (job_id,),
        )
    ).fetchall()
    clips = {}
    for row in rows:
        clips[row["option"]] = await asyncio.to_thread(decoded, row["flac"], row["exponent"])
    return replace(request, **clips) if clips else request


async def keep_flac(db: psycopg.AsyncConnection[dict], stored: StoredClip, digest: str) -> None:
    """Store ``stored``'s FLAC (encoded on a thread) unless it is already there. The caller
    holds :data:`queries.UPLOADS_LOCK` shared until its job refers to the clip, so a prune
    cannot delete it meanwhile."""
    known = await (await db.execute("SELECT 1 FROM uploads WHERE hash = %s", (digest,))).fetchone()
    if known is None:
        flac = await asyncio.to_thread(stored.flac)
        await db.execute(
            "INSERT INTO uploads VALUES (%s, %s, %s) ON CONFLICT (hash) DO NOTHING",
            (digest, stored.exponent, flac),
        )


def decoded(flac: bytes, exponent: int) -> AudioClip:
    return StoredClip.from_flac(flac, exponent).clip


def on_grid(clip: AudioClip) -> tuple[StoredClip, str]:
    """``clip`` as the store keeps it, and its content hash (CPU work: run it in a thread)."""
    stored = to_grid(clip)
    return stored, stored.content_hash


def flac_of(audio: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio.T, sample_rate, format="FLAC", subtype="PCM_24")
    return buffer.getvalue()


def read_flac(flac: bytes) -> tuple[np.ndarray, int]:
    audio, sample_rate = soundfile.read(io.BytesIO(flac), dtype="float32", always_2d=True)
    return np.ascontiguousarray(audio.T), sample_rate


def request_json(request: GenerationRequest) -> str:
    values = {
        f.name: getattr(request, f.name)
        for f in fields(GenerationRequest)
        if f.name not in AUDIO_OPTIONS
    }
    return json.dumps(values)


def job_without_audio(row: dict) -> Job:
    """A job read with :data:`queries.CLIPS`, its clips left in the store."""
    job = job_from_row(row)
    job.uploads_in_store = bool(job.clips)
    return job


def job_from_row(row: dict) -> Job:
    """A job from its row; the clips it was given, if the row carries
    :data:`queries.CLIPS` (``{option: [seconds, hash]}``, decoded by psycopg)."""
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
        delivered=row["delivered"],
        result_url=row["result_url"],
        result_expired_at=row["result_expired_at"],
        uploads_expired_at=row["uploads_expired_at"],
        delivery_attempts=row["delivery_attempts"],
        delivery_failure=row["delivery_failure"],
        clips={
            option: ClipRecord(seconds, digest)
            for option, (seconds, digest) in (row.get("clips") or {}).items()
        },
    )
