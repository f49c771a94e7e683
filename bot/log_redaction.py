"""Keeping tokens out of the logs, at every level.

Below INFO, libraries log what they send and receive: aiosqlite every SQL call with its
parameters (interaction tokens among them), discord.py each gateway event (an interaction's
token is in it) and the URL of each interaction and webhook request (the token is part of the
path). :func:`redact_logs` puts a filter on the log handlers that drops SQL parameters and
blanks tokens out of every record before it is written.
"""

from __future__ import annotations

import functools
import logging
import re

REDACTED = "<redacted>"

_TOKEN_PATTERNS = (
    # .../webhooks/<application id>/<token>/... and .../interactions/<id>/<token>/callback
    re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/\s?'\"]+"),
    # "token": "..." in a gateway event or a payload, as JSON or as a Python repr
    re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]+"""),
)


class RedactSecrets(logging.Filter):
    """Drops SQL parameters from aiosqlite's records and blanks tokens out of every record:
    those the patterns find, and the ``secrets`` given (the bot token)."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secret for secret in secrets if secret)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] == "aiosqlite" and isinstance(record.args, tuple):
            record.args = tuple(_without_parameters(arg) for arg in record.args)
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            # Formatters use exc_text when it is set: format the traceback here, redacted.
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        return True

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        for pattern in _TOKEN_PATTERNS:
            text = pattern.sub(rf"\g<1>{REDACTED}", text)
        return text


def redact_logs(*secrets: str) -> None:
    """Filter every handler of the root logger (call it once the handlers are set up); a
    filter put there by an earlier call is replaced."""
    redactor = RedactSecrets(secrets)
    for handler in logging.getLogger().handlers:
        for earlier in [f for f in handler.filters if isinstance(f, RedactSecrets)]:
            handler.removeFilter(earlier)
        handler.addFilter(redactor)


def _without_parameters(argument: object) -> object:
    """aiosqlite logs each call as a ``functools.partial`` of the method and its arguments:
    keep the method and the SQL, drop the parameters."""
    if not isinstance(argument, functools.partial):
        return argument
    name = getattr(argument.func, "__name__", "call")
    sql = next((value for value in argument.args if isinstance(value, str)), None)
    return f"{name}({sql!r}, <parameters not logged>)" if sql else f"{name}(...)"
