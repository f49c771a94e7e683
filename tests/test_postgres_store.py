"""The PostgreSQL store's own: its address, its schema's version, reopening, open_store."""

from __future__ import annotations

import asyncio

import pytest

from generation.jobs.job import Job
from generation.jobs.postgres import PostgresStore, public_address
from generation.jobs.postgres.db import APPLICATION_NAME
from generation.jobs.postgres.listener import APPLICATION_NAME as LISTENER_NAME
from generation.jobs.postgres.schema import MIGRATIONS
from generation.jobs.store import Channel, StoreError, open_store
from generation.request import GenerationRequest

from .postgres import fresh_schema
from .stores import forget_url, remember_url, sql

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", seed=3)


@pytest.fixture
async def url():
    async with fresh_schema() as url:
        yield url


def test_the_address_in_messages_has_no_password():
    url = "postgresql://bot:hunter2@db.example:6543/music?sslmode=require"
    assert public_address(url) == "postgresql://bot@db.example:6543/music"


async def test_an_unreachable_server_is_named_without_its_password():
    with pytest.raises(StoreError) as caught:
        await PostgresStore.open("postgresql://bot:hunter2@127.0.0.1:1/music")
    message = str(caught.value)
    assert "postgresql://bot@127.0.0.1:1/music" in message and "hunter2" not in message
    assert "start the server, or correct storage.database" in message


async def test_the_schema_is_versioned_and_data_survives_reopening(url):
    store = await open_store(url)  # picked from the address
    assert isinstance(store, PostgresStore)
    remember_url(store, url)
    try:
        assert await sql(store, "SELECT version FROM musicgen_schema") == [(len(MIGRATIONS),)]
        job = await store.add(Job(0, REQUEST, 1, 2, 3))
    finally:
        forget_url(store)
        await store.close()
    store = await PostgresStore.open(url)
    try:
        assert [j.id for j in await store.history(1, 3)] == [job.id]
    finally:
        await store.close()


async def test_a_newer_schema_is_refused(url):
    store = await PostgresStore.open(url)
    remember_url(store, url)
    try:
        await sql(store, "UPDATE musicgen_schema SET version = ?", (len(MIGRATIONS) + 1,))
    finally:
        forget_url(store)
        await store.close()
    with pytest.raises(StoreError, match=r"newer than this bot knows.*upgrade the bot"):
        await PostgresStore.open(url)


async def test_two_processes_opening_at_once_migrate_once(url):
    first, second = await asyncio.gather(PostgresStore.open(url), PostgresStore.open(url))
    remember_url(first, url)
    try:
        assert await sql(first, "SELECT version FROM musicgen_schema") == [(len(MIGRATIONS),)]
    finally:
        forget_url(first)
        await first.close()
        await second.close()


async def test_listeners_are_told_to_read_again_after_the_connection_drops(url):
    store = await PostgresStore.open(url)
    remember_url(store, url)
    received: asyncio.Queue[str] = asyncio.Queue()
    store.subscribe(Channel.CANCEL, received.put_nowait)
    try:
        assert await asyncio.wait_for(received.get(), 10) == ""  # listening
        ((killed,),) = await sql(
            store,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = ?",
            (LISTENER_NAME,),
        )
        assert killed == 1
        assert await asyncio.wait_for(received.get(), 10) == ""  # listening again: read again
        job = await store.add(Job(0, REQUEST, 1, 2, 3))
        await store.release(job, None)
        await store.claim(
            "w", models=None, loaded=(), max_rows=1, max_model_wait=0.0, lease_seconds=60.0
        )
        await store.request_cancel(job.id)
        assert await asyncio.wait_for(received.get(), 10) == str(job.id)
    finally:
        forget_url(store)
        await store.close()


async def test_the_store_carries_on_after_the_server_dropped_its_connections(url):
    store = await PostgresStore.open(url)
    remember_url(store, url)
    try:
        job = await store.add(Job(0, REQUEST, 1, 2, 3))
        ((killed,),) = await sql(
            store,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = ?",
            (APPLICATION_NAME,),
        )
        assert killed >= 1  # as a server restart would
        assert (await store.get(job.id)).id == job.id
    finally:
        forget_url(store)
        await store.close()
