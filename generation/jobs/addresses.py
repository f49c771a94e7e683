"""Database addresses (``storage.database``) as they may be shown: without their password.

A PostgreSQL address may carry a password (``postgresql://user:secret@host/db`` or
``?password=secret``); every error or log line that names the address goes through
:func:`redacted`, and a message that may quote part of it (libpq's parse errors do) through
:func:`hide_passwords`, so the password never reaches a terminal or a log file.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

#: What a password is replaced with.
HIDDEN = "***"

_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)
_HIDE_VALUE = rf"\g<1>{HIDDEN}"


def redacted(address: str) -> str:
    """``address`` with any password in it replaced by :data:`HIDDEN`; anything else (an
    SQLite path) as it is.

    The user information is taken to end at the last ``@``, so a password holding an
    unescaped ``@``, ``/`` or ``?`` is hidden whole (at worst, more than the password is).
    """
    scheme, separator, rest = address.partition("://")
    if not separator:
        return address
    user_info, at, location = _QUERY_PASSWORD.sub(_HIDE_VALUE, rest).rpartition("@")
    if ":" in user_info:
        user_info = f"{user_info.partition(':')[0]}:{HIDDEN}"
    return f"{scheme}://{user_info}{at}{location}"


def hide_passwords(text: str, address: str) -> str:
    """``text`` (an error about ``address``) with each password ``address`` holds, as
    written or percent-decoded, replaced by :data:`HIDDEN`."""
    _, separator, rest = address.partition("://")
    if not separator:
        return text
    found = [match[2] for match in _QUERY_PASSWORD.finditer(rest)]
    user_info = _QUERY_PASSWORD.sub(_HIDE_VALUE, rest).rpartition("@")[0]
    if ":" in user_info:
        found.append(user_info.partition(":")[2])
    secrets = {form for secret in found for form in (secret, unquote(secret)) if form}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text
