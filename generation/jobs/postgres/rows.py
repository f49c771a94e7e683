"""Jobs to and from rows, and audio to and from the FLAC the store keeps (conversions run
on a thread by the callers: they are CPU work)."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace

import numpy as np
import psycopg
import soundfile

from generation.audio.stored import StoredClip
from generation.jobs import records
from generation.jobs.job import Job
from generation.jobs.records import clip_records, decoded
from generation.request import GenerationRequest


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


def flac_of(audio: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio.T, sample_rate, format="FLAC", subtype="PCM_24")
    return buffer.getvalue()


def read_flac(flac: bytes) -> tuple[np.ndarray, int]:
    audio, sample_rate = soundfile.read(io.BytesIO(flac), dtype="float32", always_2d=True)
    return np.ascontiguousarray(audio.T), sample_rate


def job_without_audio(row: dict) -> Job:
    """A job read with :data:`queries.CLIPS`, its clips left in the store."""
    job = job_from_row(row)
    job.uploads_in_store = bool(job.clips)
    return job


def job_from_row(row: dict) -> Job:
    """A job from its row; the clips it was given, if the row carries
    :data:`queries.CLIPS` (``{option: [seconds, hash]}``, decoded by psycopg)."""
    job = records.job_from_row(row)
    job.clips = clip_records(row.get("clips") or {})
    return job
