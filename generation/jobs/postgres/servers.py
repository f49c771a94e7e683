"""Server settings (and the paused servers the claim skips), generation rates and relay
jams on PostgreSQL."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields

from generation.jobs.job import Job
from generation.jobs.postgres.db import Database, fetch_row, fetch_value, notify
from generation.jobs.postgres.rows import (
    job_from_row,
)
from generation.jobs.store import (
    Channel,
    GuildSettings,
    Jam,
    Segment,
    Turn,
)


class ServersAndJams(Database):
    """Servers' and jams' part of :class:`~.store.PostgresStore`."""

    # Server settings

    async def guild_settings(self, guild_id: int) -> GuildSettings:
        async with self._read() as db:
            row = await fetch_row(
                db, "SELECT settings FROM guild_settings WHERE guild_id = %s", (guild_id,)
            )
        if row is None:
            return GuildSettings(guild_id)
        values = json.loads(row["settings"])
        known = {f.name for f in fields(GuildSettings)}
        values = {key: value for key, value in values.items() if key in known}
        for key in ("allowed_models", "allowed_channels"):
            values[key] = tuple(values.get(key, ()))
        return GuildSettings(guild_id=guild_id, **values)

    async def save_guild_settings(self, settings: GuildSettings) -> None:
        """Save a server's settings; pausing or resuming it changes what can be claimed."""
        values = asdict(settings)
        del values["guild_id"]
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO guild_settings VALUES (%s, %s)
                   ON CONFLICT (guild_id) DO UPDATE SET settings = excluded.settings""",
                (settings.guild_id, json.dumps(values)),
            )
            if settings.paused:
                await db.execute(
                    "INSERT INTO paused_guilds VALUES (%s) ON CONFLICT DO NOTHING",
                    (settings.guild_id,),
                )
            else:
                cursor = await db.execute(
                    "DELETE FROM paused_guilds WHERE guild_id = %s", (settings.guild_id,)
                )
                if cursor.rowcount:
                    await notify(db, Channel.QUEUE)

    async def paused_guilds(self) -> list[int]:
        async with self._read() as db:
            rows = await (
                await db.execute("SELECT guild_id FROM paused_guilds ORDER BY guild_id")
            ).fetchall()
        return [row["guild_id"] for row in rows]

    # Generation rates

    async def generation_rates(self, device: str) -> dict[tuple[str, int], float]:
        """Seconds of work per second of audio learnt on ``device``, by (model, batch size)."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    """SELECT model, rows, seconds_per_second FROM generation_rates
                       WHERE device = %s""",
                    (device,),
                )
            ).fetchall()
        return {(row["model"], row["rows"]): row["seconds_per_second"] for row in rows}

    async def save_generation_rate(self, device: str, model: str, rows: int, rate: float) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO generation_rates VALUES (%s, %s, %s, %s, %s)
                   ON CONFLICT (device, model, rows) DO UPDATE SET
                       seconds_per_second = excluded.seconds_per_second,
                       updated_at = excluded.updated_at""",
                (device, model, rows, rate, time.time()),
            )

    # Relay jams

    async def add_jam(self, jam: Jam) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO jams VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    jam.thread_id,
                    jam.guild_id,
                    jam.channel_id,
                    jam.user_id,
                    jam.title,
                    jam.timeline_message_id,
                    time.time(),
                ),
            )

    async def jam(self, thread_id: int) -> Jam | None:
        async with self._read() as db:
            row = await fetch_row(
                db,
                """SELECT thread_id, guild_id, channel_id, user_id, title, timeline_message_id
                   FROM jams WHERE thread_id = %s""",
                (thread_id,),
            )
        return None if row is None else Jam(**row)

    async def jams_started_by(self, guild_id: int, user_id: int) -> list[int]:
        """The threads of the jams a member started in a server."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    "SELECT thread_id FROM jams WHERE guild_id = %s AND user_id = %s",
                    (guild_id, user_id),
                )
            ).fetchall()
        return [row["thread_id"] for row in rows]

    async def jam_of_job(self, job_id: int) -> Jam | None:
        """The jam that ``job_id`` is a turn of, if any."""
        turn = await self.turn_of_job(job_id)
        return None if turn is None else await self.jam(turn[0])

    async def turn_of_job(self, job_id: int) -> tuple[int, int] | None:
        """The jam (its thread) and the turn that ``job_id`` is, if it is a jam's turn."""
        async with self._read() as db:
            row = await fetch_row(
                db,
                "SELECT thread_id, position FROM jam_segments WHERE job_id = %s LIMIT 1",
                (job_id,),
            )
        return None if row is None else (row["thread_id"], row["position"])

    async def replace_segment(self, jam: Jam, position: int, job: Job) -> Segment:
        """Make ``job`` (another take of it) the jam's turn ``position``."""
        async with self._transaction() as db:
            await db.execute(
                """UPDATE jam_segments SET job_id = %s, user_id = %s
                   WHERE thread_id = %s AND position = %s""",
                (job.id, job.user_id, jam.thread_id, position),
            )
        return Segment(position, job.id, job.user_id)

    async def add_segment(self, jam: Jam, job: Job) -> Segment:
        """Make ``job`` the jam's next turn (the jam's row is locked while it is counted, so
        two turns added at once get positions one after the other)."""
        async with self._transaction() as db:
            await db.execute("SELECT 1 FROM jams WHERE thread_id = %s FOR UPDATE", (jam.thread_id,))
            position = await fetch_value(
                db,
                "SELECT COUNT(*) + 1 FROM jam_segments WHERE thread_id = %s",
                (jam.thread_id,),
            )
            await db.execute(
                "INSERT INTO jam_segments VALUES (%s, %s, %s, %s)",
                (jam.thread_id, position, job.id, job.user_id),
            )
        return Segment(position, job.id, job.user_id)

    async def segments(self, thread_id: int) -> list[Segment]:
        """A jam's turns, in order."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    """SELECT position, job_id, user_id FROM jam_segments
                       WHERE thread_id = %s ORDER BY position""",
                    (thread_id,),
                )
            ).fetchall()
        return [Segment(**row) for row in rows]

    async def turns(self, thread_id: int) -> list[Turn]:
        """A jam's turns in order, read in one query, without decoding any audio."""
        async with self._read() as db:
            rows = await (
                await db.execute(
                    """SELECT jobs.*, jam_segments.position, jam_segments.user_id AS player,
                           CASE WHEN job_uploads.job_id IS NULL THEN 0.0
                               ELSE job_uploads.seconds END AS intro_seconds
                       FROM jam_segments JOIN jobs ON jobs.id = jam_segments.job_id
                       LEFT JOIN job_uploads ON job_uploads.job_id = jobs.id
                           AND job_uploads.option = 'continuation'
                       WHERE jam_segments.thread_id = %s ORDER BY jam_segments.position""",
                    (thread_id,),
                )
            ).fetchall()
        return [
            Turn(
                Segment(row["position"], row["id"], row["player"]),
                job_from_row(row),
                row["intro_seconds"],
            )
            for row in rows
        ]
