"""Where a job came from: a re-roll, an edit, a continuation of another job, an upload.

Kept with the job in the store, so its result can say so ("Re-roll of #1") and its tags can
name the source of a continuation or a melody long after the request that made it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum


class OriginKind(StrEnum):
    REROLL = "reroll"
    EDIT = "edit"
    VARIATIONS = "variations"
    #: A continuation of a job's take.
    CONTINUATION = "continuation"
    #: A continuation of an uploaded clip ("Continue this track" on a message).
    UPLOAD_CONTINUATION = "upload-continuation"
    #: A melody from an uploaded clip ("Use as melody" on a message).
    UPLOAD_MELODY = "upload-melody"
    #: A turn of a relay jam, carrying the previous turn (``job_id``) on, if any.
    JAM_TURN = "jam-turn"
    #: The stems of a job's take.
    STEMS = "stems"


@dataclass(frozen=True)
class Origin:
    """How a job was made from something else.

    Attributes:
        kind: What was done.
        job_id: The job it was made from, if any.
        take: Which take of ``job_id`` (0 for the first).
        filename: The uploaded file's name, for the upload kinds.
        jam: The relay jam (its thread) that ``job_id`` was a turn of, if any.
        turn: That turn's number in the jam (for a jam turn: its own number).
    """

    kind: OriginKind
    job_id: int | None = None
    take: int = 0
    filename: str | None = None
    jam: int | None = None
    turn: int | None = None

    def to_json(self) -> str:
        values = {key: value for key, value in asdict(self).items() if value is not None}
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str | None) -> Origin | None:
        if not text:
            return None
        values = json.loads(text)
        return cls(**{**values, "kind": OriginKind(values["kind"])})

    def tags(self) -> dict[str, str]:
        """ID3 tags (``TXXX``) naming the source, so the result can be made again from it."""
        tags = {"origin": self.kind.value}
        if self.job_id is not None:
            tags["source_job"] = str(self.job_id)
            tags["source_take"] = str(self.take + 1)
        if self.filename is not None:
            tags["source_file"] = self.filename
        return tags
