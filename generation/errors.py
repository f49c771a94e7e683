"""The errors the generation package raises.

Every error a user can cause carries a message written for that user: the bot and the
command line show ``str(error)`` as it is, and never a traceback.
"""

from __future__ import annotations


class GenerationError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidOption(GenerationError, ValueError):
    """A request option is out of range or does not fit the rest of the request.

    ``option`` is the request field at fault (``top_k``, ``melody``...), so each front end
    can name it the way its users spell it (``--top-k`` on the command line).
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


class InvalidOptions(GenerationError, ValueError):
    """Several options are wrong at once (a form's fields): each is reported."""

    def __init__(self, errors: list[InvalidOption]) -> None:
        super().__init__(" ".join(str(error) for error in errors))
        self.errors = errors


class UnknownModel(InvalidOption):
    """The model name is neither in the catalogue nor a local checkpoint folder."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__("model", f"Unknown model {name!r}. Choose one of: {', '.join(known)}.")
        self.name = name


class AudioInputError(GenerationError, ValueError):
    """An uploaded clip is too large, too long, corrupt or not audio at all."""


class ModelLoadError(GenerationError):
    """A model's weights could not be found, downloaded or read."""

    @classmethod
    def unsafe(cls, name: str) -> ModelLoadError:
        """The checkpoint holds more than weights and would need arbitrary unpickling."""
        return cls(f"{name} is not a checkpoint that can be loaded safely (weights only).")


class DamagedResult(GenerationError):
    """A stored result's file is there but cannot be read back (garbage, or cut short)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            f"The stored track of job #{job_id} is damaged and cannot be read: generate it "
            "again (the same prompt and seed make the same track)."
        )
        self.job_id = job_id


class DamagedUpload(GenerationError):
    """A queued job's stored clip (its melody or intro) is there but cannot be decoded."""

    def __init__(self, job_id: int, option: str) -> None:
        label = {"continuation": "intro", "stems_of": "track to split"}.get(option, option)
        super().__init__(
            f"The {label} job #{job_id} was given is damaged in the bot's database and cannot "
            "be read: upload it again with `/music generate`."
        )
        self.job_id = job_id


class ResultMissing(GenerationError):
    """A finished job's result file is gone (deleted by hand, or a lost disk), although the
    retention policy did not expire it."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            f"The track of job #{job_id} is no longer kept: generate it again (the same "
            "prompt and seed make the same track)."
        )
        self.job_id = job_id


class GenerationCancelled(GenerationError):
    """The generation was cancelled while it ran."""


class OutputTooLarge(GenerationError):
    """No MP3 bitrate makes the result fit the size limit."""


class QueueFull(GenerationError):
    """A queue limit was reached; the request was not queued."""


class JobNotFound(GenerationError):
    """No live job has that id (it finished, or never existed)."""


class Undeliverable(GenerationError):
    """Nobody can be told how a job ended (the channel and the member's direct messages refuse
    the bot); the message says why. The outcome is kept for the member's history."""
