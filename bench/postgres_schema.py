"""A fresh PostgreSQL schema for a benchmark, dropped afterwards (as the tests make theirs:
``tests/postgres.py``, which benchmarks do not import, as it needs pytest)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

#: The server the benchmarks use unless told another (the tests' default).
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def schema_url(server: str, schema: str) -> str:
    """``server`` with every connection's ``search_path`` set to ``schema``."""
    parts = urlsplit(server)
    query = dict(parse_qsl(parts.query))
    options = f"{query.get('options', '')} -csearch_path={schema}".strip()
    return urlunsplit(parts._replace(query=urlencode({**query, "options": options})))


@asynccontextmanager
async def fresh_schema(server: str, prefix: str) -> AsyncIterator[str]:
    """A new, empty schema on ``server``; yields the URL that reaches it."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(
        server, autocommit=True, connect_timeout=5
    ) as admin:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield schema_url(server, schema)
        finally:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
