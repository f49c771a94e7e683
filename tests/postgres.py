"""PostgreSQL for tests: a fresh schema per test on the server that
``MUSICGEN_BOT_TEST_POSTGRES`` names, reached through the schema-scoped URL of
:func:`schema_url` (what a gateway and its workers in an end-to-end test share)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest

#: The server the tests use, unless ``MUSICGEN_BOT_TEST_POSTGRES`` names another.
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_server() -> str:
    return os.environ.get("MUSICGEN_BOT_TEST_POSTGRES", DEFAULT_SERVER)


def schema_url(server: str, schema: str) -> str:
    """``server`` with every connection's ``search_path`` set to ``schema`` (libpq's
    ``options=-csearch_path=...``, added to any options already there)."""
    parts = urlsplit(server)
    query = dict(parse_qsl(parts.query))
    options = f"{query.get('options', '')} -csearch_path={schema}".strip()
    return urlunsplit(parts._replace(query=urlencode({**query, "options": options})))


@asynccontextmanager
async def fresh_schema(prefix: str = "test") -> AsyncIterator[str]:
    """A new, empty schema on the test server, dropped afterwards; yields its URL.

    Skips the test where no server answers (fails it under ``CI=true``: CI has one)."""
    server = postgres_server()
    try:
        admin = await psycopg.AsyncConnection.connect(server, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        reason = (
            f"No PostgreSQL server at {server} ({str(error).strip().splitlines()[0]}): "
            "set MUSICGEN_BOT_TEST_POSTGRES or start PostgreSQL at that address "
            "(`pg_ctlcluster --skip-systemctl-redirect 15 main start`)."
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    async with admin:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield schema_url(server, schema)
        finally:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
