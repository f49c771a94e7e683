"""The job store on a PostgreSQL server (psycopg 3, async): one database shared by a gateway
and any number of generation workers. Results and uploads are ``bytea`` in the database, so
every process reaches them; ``NOTIFY`` tells the others what changed.

The claim and the lease
-----------------------
A job is *claimable* while it is queued, released and its server not paused. Its place in
the queue is its ``fair_tag``, then its id. The tag is a start tag (start-time fair
queuing), fixed when the job is added: the later of the store's virtual time and the end of
its server's previous job, each job costing 1; a claim moves the virtual time up to the tags
it took. So servers take turns, whoever queued more, and a server that was idle goes before
the next job of a busy one.

:meth:`PostgresStore.claim` runs in one transaction: it reads the head of the queue with
``FOR UPDATE SKIP LOCKED`` (a row another worker is claiming is passed over, never waited
for, never taken twice), may prefer the first job for a model the worker has loaded while
the head has waited less than ``max_model_wait``, adds the jobs of the same batch key in
queue order, each the next one whose takes fit the room left (one index seek each,
``SKIP LOCKED`` again), up to ``max_rows`` takes, and leases them: ``running``,
``attempts + 1``, ``worker_id`` and ``lease_expires_at``.

A worker extends its leases with :meth:`PostgresStore.heartbeat`, which also answers which
jobs it must stop (cancel requested, or lease lost). :meth:`PostgresStore.requeue_expired`
(any process; one at a time, by an advisory lock) puts the jobs whose lease ran out back in
the queue with their tag, or fails them after ``max_attempts``. A worker's writes to a job
(:meth:`~PostgresStore.finish`, :meth:`~PostgresStore.requeue`) are fenced on the status,
the attempt and the worker it holds, so a worker that lost its lease cannot overwrite the
job's next run.

Module layout: :mod:`.schema` (tables, migrations), :mod:`.queries` (the queue's SQL),
:mod:`.listener` (LISTEN on a dedicated connection), :mod:`.store` (:class:`PostgresStore`).
"""

from generation.jobs.postgres.store import PostgresStore, public_address

__all__ = ["PostgresStore", "public_address"]
