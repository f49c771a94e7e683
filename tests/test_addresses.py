"""Database addresses are shown without their password."""

from __future__ import annotations

import pytest

from generation.jobs.addresses import hide_passwords, redacted


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        (
            "postgresql://bot:s3cret@db.example:5432/jobs",
            "postgresql://bot:***@db.example:5432/jobs",
        ),
        (
            "postgres://bot:s3cret@db/jobs?sslmode=require",
            "postgres://bot:***@db/jobs?sslmode=require",
        ),
        ("postgresql://bot@db/jobs", "postgresql://bot@db/jobs"),
        ("postgresql://db/jobs", "postgresql://db/jobs"),
        ("postgresql://bot:@db/jobs", "postgresql://bot:***@db/jobs"),
        # Unescaped @, / or ? in the password: all of it is hidden.
        ("postgresql://bot:p@ss/w?rd@db/jobs", "postgresql://bot:***@db/jobs"),
        (
            "postgresql://db/jobs?user=bot&password=s3cret&sslmode=require",
            "postgresql://db/jobs?user=bot&password=***&sslmode=require",
        ),
        ("postgresql://db/jobs?PASSWORD=s3cret", "postgresql://db/jobs?PASSWORD=***"),
        ("postgresql://db/jobs?password=s@cret", "postgresql://db/jobs?password=***"),
        ("/srv/bot/data/jobs.sqlite3", "/srv/bot/data/jobs.sqlite3"),
        ("data/jobs.sqlite3", "data/jobs.sqlite3"),
    ],
)
def test_redacted_hides_the_password_and_keeps_the_rest(address, shown):
    assert redacted(address) == shown


def test_hide_passwords_hides_them_as_written_and_decoded():
    address = "postgresql://bot:p%40ss@db/jobs?password=x%ZZ"
    text = 'invalid percent-encoded token: "x%ZZ"; password "p@ss" or "p%40ss"'
    assert hide_passwords(text, address) == (
        'invalid percent-encoded token: "***"; password "***" or "***"'
    )
    assert hide_passwords("no host", "data/jobs.sqlite3") == "no host"
