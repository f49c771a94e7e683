"""Discord's limits on a message, and fitting any text or embed into them.

Discord refuses (HTTP 400) a message over any of these limits, so everything the bot builds
passes through here: lists end with "... and N more", long text is cut with "…", and an
embed is brought within every per-part limit and the total.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import discord

CONTENT = 2000
TITLE = 256
DESCRIPTION = 4096
FIELDS = 25
FIELD_NAME = 256
FIELD_VALUE = 1024
FOOTER = 2048
AUTHOR = 256
EMBED_TOTAL = 6000

ELLIPSIS = "…"


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with "…" where it was cut."""
    return text if len(text) <= limit else text[: limit - len(ELLIPSIS)] + ELLIPSIS


def more(count: int) -> str:
    return f"... and {count} more"


def fit_lines(
    lines: Sequence[str],
    limit: int,
    *,
    head: str | None = None,
    newest_last: bool = False,
    note: Callable[[int], str] = more,
) -> str:
    """As many of ``lines`` as fit in ``limit`` characters, then ``note(N)`` for the rest
    ("... and N more").

    ``head`` (clipped if need be) always comes first. With ``newest_last``, the last lines are
    kept and the note about the earlier ones goes right after ``head``. A first line longer
    than the room left is clipped rather than left out.
    """
    top = [clip(head, limit)] if head is not None else []
    used = len(top[0]) if top else 0
    order = list(reversed(lines)) if newest_last else list(lines)
    kept: list[str] = []
    for index, line in enumerate(order):
        left = len(order) - index - 1
        room = limit - used - (1 if top or kept else 0) - (len(note(left)) + 1 if left else 0)
        if not kept and len(line) > room > len(ELLIPSIS):
            line = clip(line, room)
        if len(line) > room:
            kept.append(note(len(order) - index))
            break
        kept.append(line)
        used += len(line) + (1 if top or len(kept) > 1 else 0)
    if newest_last:
        kept.reverse()
    return clip("\n".join(top + kept), limit)


def fit_join(items: Sequence[str], limit: int, separator: str = ", ") -> str:
    """``items`` joined by ``separator`` within ``limit``, ending "... and N more" if cut."""
    text = ""
    for index, item in enumerate(items):
        joined = item if not text else f"{text}{separator}{item}"
        left = len(items) - index - 1
        tail = f" {more(left)}" if left else ""
        if len(joined) + len(tail) > limit:
            return clip(f"{text} {more(len(items) - index)}".strip(), limit)
        text = joined
    return text


def fit_content(text: str) -> str:
    """Message content within :data:`CONTENT`: whole lines first, then "... and N more"."""
    if len(text) <= CONTENT:
        return text
    head, *rest = text.split("\n")
    return fit_lines(rest, CONTENT, head=head) if rest else clip(head, CONTENT)


def line_fields(name: str, lines: Sequence[str]) -> list[tuple[str, str]]:
    """``lines`` as (name, value) fields of at most :data:`FIELD_VALUE` characters each,
    split between lines: "Options", "Options (continued)"..."""
    fields: list[tuple[str, str]] = []
    chunk: list[str] = []
    for line in (clip(line, FIELD_VALUE) for line in lines):
        if chunk and len("\n".join([*chunk, line])) > FIELD_VALUE:
            fields.append((name if not fields else f"{name} (continued)", "\n".join(chunk)))
            chunk = []
        chunk.append(line)
    if chunk:
        fields.append((name if not fields else f"{name} (continued)", "\n".join(chunk)))
    return fields


def fit_embed(embed: discord.Embed) -> discord.Embed:
    """``embed`` brought within each of Discord's limits and the 6,000-character total.

    Each part is clipped to its own limit; past 25 fields, the last one says how many more
    there were; over the total, the description's last lines, then the last fields, go.
    """
    if embed.title:
        embed.title = clip(embed.title, TITLE)
    if embed.description:
        embed.description = _fit_text(embed.description, DESCRIPTION)
    if embed.footer.text:
        embed.set_footer(text=clip(embed.footer.text, FOOTER), icon_url=embed.footer.icon_url)
    if embed.author.name:
        embed.set_author(
            name=clip(embed.author.name, AUTHOR),
            url=embed.author.url,
            icon_url=embed.author.icon_url,
        )
    fields = [
        (
            clip(field.name or "", FIELD_NAME),
            _fit_text(field.value or "", FIELD_VALUE),
            field.inline,
        )
        for field in embed.fields
    ]
    if len(fields) > FIELDS:
        fields = [*fields[: FIELDS - 1], (ELLIPSIS, more(len(fields) - FIELDS + 1), False)]
    excess = embed_size(embed, fields) - EMBED_TOTAL
    if excess > 0 and embed.description:
        keep = max(0, len(embed.description) - excess)
        embed.description = _fit_text(embed.description, keep) if keep else None
        excess = embed_size(embed, fields) - EMBED_TOTAL
    dropped = 0
    while excess > 0 and fields:
        fields.pop()
        dropped += 1
        marker = [(ELLIPSIS, more(dropped), False)]
        excess = embed_size(embed, fields + marker) - EMBED_TOTAL
    if dropped:
        fields.append((ELLIPSIS, more(dropped), False))
    embed.clear_fields()
    for name, value, inline in fields:
        embed.add_field(name=name, value=value, inline=inline)
    return embed


def embed_size(embed: discord.Embed, fields: Sequence[tuple[str, str, bool]] | None = None) -> int:
    """The characters Discord counts towards an embed's 6,000 total."""
    if fields is None:
        fields = [(field.name or "", field.value or "", True) for field in embed.fields]
    parts = [embed.title, embed.description, embed.footer.text, embed.author.name]
    return sum(len(part) for part in parts if part) + sum(
        len(name) + len(value) for name, value, _ in fields
    )


def _fit_text(text: str, limit: int) -> str:
    """Whole lines while they fit, then "... and N more"; one long line is clipped."""
    if len(text) <= limit:
        return text
    lines = text.split("\n")
    return fit_lines(lines, limit) if len(lines) > 1 else clip(text, limit)
