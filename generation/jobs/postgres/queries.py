"""The PostgreSQL store's queue SQL, by name, so the claim and the lease read as SQL.

``CLAIMABLE`` is the one definition of a job a worker may take: queued, released, and its
server not paused. Every read of the queue orders by ``(fair_tag, id)``, which the partial
indexes of the schema serve as an index range.
"""

from __future__ import annotations

CLAIMABLE = """jobs.status = 'queued' AND jobs.released
    AND NOT EXISTS (SELECT 1 FROM paused_guilds WHERE paused_guilds.guild_id = jobs.guild_id)"""

#: A new job's place in the fair order (start-time fair queuing): its start tag, the later
#: of the virtual time (the tag last claimed) and the end of its server's previous job (each
#: job costs 1). A server that was idle starts at the virtual time, so it goes before the next
#: job of a server that queued many.
NEXT_TAG = """INSERT INTO guild_tags AS tags (guild_id, last_tag)
    VALUES (%(guild_id)s, (SELECT virtual_time FROM fair_clock) + 1)
    ON CONFLICT (guild_id) DO UPDATE
        SET last_tag = GREATEST(tags.last_tag, (SELECT virtual_time FROM fair_clock)) + 1
    RETURNING last_tag - 1 AS tag"""

#: The first claimable job (of ``models`` unless NULL) that no other claim holds.
CLAIM_HEAD = f"""SELECT id, model, submitted_at, batch_key, takes, fair_tag FROM jobs
    WHERE {CLAIMABLE} AND (%(models)s::text[] IS NULL OR model = ANY(%(models)s::text[]))
    ORDER BY fair_tag, id LIMIT 1 FOR UPDATE SKIP LOCKED"""

#: The next job that can join ``first``'s batch after ``(after_tag, after_id)`` in queue
#: order, with takes that fit the ``room`` left: one seek of the batch key's index, so a job
#: that fits is found however many too big ones are ahead of it.
CLAIM_JOINER = f"""SELECT id, takes, fair_tag FROM jobs
    WHERE {CLAIMABLE} AND batch_key = %(batch_key)s AND takes <= %(room)s
    AND id <> %(first)s AND (fair_tag, id) > (%(after_tag)s, %(after_id)s)
    ORDER BY fair_tag, id LIMIT 1 FOR UPDATE SKIP LOCKED"""

#: Each clip a job was given, by option: ``{option: [seconds, hash]}`` (NULL for none).
CLIPS = """(SELECT json_object_agg(option, json_build_array(seconds, hash))
    FROM job_uploads WHERE job_uploads.job_id = jobs.id) AS clips"""

#: Lease the chosen jobs to the worker (their rows are locked by the reads above).
LEASE = f"""UPDATE jobs SET status = 'running', attempts = attempts + 1,
        started_at = %(now)s, worker_id = %(worker_id)s,
        lease_expires_at = %(now)s + %(lease_seconds)s, cancel_requested = false,
        progress_done = NULL, progress_total = NULL
    WHERE id = ANY(%(ids)s)
    RETURNING *, {CLIPS}"""

ADVANCE_CLOCK = "UPDATE fair_clock SET virtual_time = GREATEST(virtual_time, %(tag)s)"

#: Extend the leases the worker still holds; the rows it returns are those still its own.
EXTEND_LEASES = """UPDATE jobs SET lease_expires_at = %(now)s + %(lease_seconds)s
    WHERE id = ANY(%(ids)s) AND status = 'running' AND worker_id = %(worker_id)s
    RETURNING id, cancel_requested"""

#: Running jobs whose lease ran out (before ``now``), with their attempts; rows a worker is
#: writing now are skipped (they are not stale).
EXPIRED = """SELECT id, attempts FROM jobs WHERE status = 'running'
    AND lease_expires_at < %(now)s FOR UPDATE SKIP LOCKED"""

#: A run that ends, or goes back to the queue, leaves no worker, lease, progress or cancel
#: request behind.
ENDED = """worker_id = NULL, lease_expires_at = NULL, cancel_requested = false,
    progress_done = NULL, progress_total = NULL"""

#: Expired jobs go back to the queue, keeping their tag.
REQUEUE_EXPIRED = f"""UPDATE jobs SET {ENDED}, status = 'queued', started_at = NULL
    WHERE id = ANY(%(ids)s)"""

#: Expired jobs that used up their attempts fail for good, each with its own message.
GIVE_UP_EXPIRED = f"""UPDATE jobs SET {ENDED}, status = 'failed', error = given_up.error,
        finished_at = %(finished_at)s
    FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS given_up (id, error)
    WHERE jobs.id = given_up.id"""

#: One sweeper at a time (per database): two would only skip each other's rows.
SWEEP_LOCK = 0x6D75_7369_6353_7765  # "musicSwe"

#: Held shared while a job refers to a stored clip, and exclusively while unused clips are
#: deleted, so a clip is never deleted between a job finding it and referring to it.
UPLOADS_LOCK = 0x6D75_7369_6355_706C  # "musicUpl"

#: 1 + the claimable jobs ahead of a queued job; a job not yet released has its place
#: already (the requester is shown it before the job is released).
POSITION = f"""SELECT 1 + (SELECT count(*) FROM jobs
        WHERE {CLAIMABLE} AND (jobs.fair_tag, jobs.id) < (me.fair_tag, me.id))
    FROM jobs AS me
    WHERE me.id = %(id)s AND me.status = 'queued'
    AND NOT EXISTS (SELECT 1 FROM paused_guilds WHERE paused_guilds.guild_id = me.guild_id)"""

#: The claimable jobs ahead of a job, their takes summed by batch key (one index range).
WORK_AHEAD = f"""SELECT MIN(model) AS model, MIN(duration) AS duration, SUM(takes) AS takes
    FROM jobs WHERE {CLAIMABLE}
    AND (fair_tag, id) < (SELECT fair_tag, id FROM jobs WHERE id = %(id)s)
    GROUP BY batch_key"""

#: Every claimable job as the forecast needs it, in queue order (one index range).
QUEUE_ORDER = f"""SELECT id AS job_id, guild_id, model, duration, takes, batch_key FROM jobs
    WHERE {CLAIMABLE} ORDER BY fair_tag, id"""

#: Queued jobs in every server, released or not (an index-only count of the queued ones).
QUEUE_LENGTH = "SELECT count(*) FROM jobs WHERE status = 'queued'"

LIVE_COUNTS = """SELECT count(*) FILTER (WHERE user_id = %(user_id)s) AS member,
        count(*) AS server FROM jobs
    WHERE guild_id = %(guild_id)s AND status IN ('queued', 'running')"""

#: A finished job whose requester has been told (or who could not be, so it was kept for
#: their history): the retention policy may apply to it.
SETTLED = """status IN ('done', 'failed', 'cancelled')
    AND (delivered OR delivery_failure IS NOT NULL)"""

#: :meth:`PostgresStore.stats`' reads: each goes through an index, never over a history.
STATS_COUNTS = "SELECT status, jobs FROM job_counts WHERE guild_id = %s"
STATS_RECENT = """SELECT started_at - submitted_at AS wait, generation_seconds FROM jobs
    WHERE guild_id = %s AND finished_at IS NOT NULL AND status IN ('done', 'failed', 'cancelled')
    ORDER BY finished_at DESC LIMIT %s"""
