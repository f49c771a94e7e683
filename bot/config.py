"""The bot's configuration: one TOML file (see config.example.toml), read once at start-up.

The bot token may come from the ``DISCORD_TOKEN`` environment variable instead of the file;
it never appears in ``repr``, logs or messages.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from generation.engine.models import PRECISIONS, catalogue_name, resolve_model
from generation.errors import InvalidOption
from generation.jobs.addresses import hide_passwords, redacted
from generation.jobs.retention import Retention
from generation.jobs.store import is_postgres
from generation.request import DEFAULT_MAX_DURATION

TOKEN_VARIABLE = "DISCORD_TOKEN"


class ConfigError(Exception):
    """The configuration file is missing, malformed or has a bad value (named in the message)."""


@dataclass(frozen=True)
class DiscordConfig:
    #: The bot token; empty when not configured.
    token: str = field(default="", repr=False)
    #: Servers to sync the commands to at once; empty syncs them globally.
    guilds: tuple[int, ...] = ()
    #: None: one gateway connection (discord.py's Bot). "auto" (the count Discord recommends)
    #: or a number of shards: discord.py's AutoShardedBot. Discord requires sharding from
    #: 2,500 servers; discord.py recommends it from about 1,000.
    shard_count: int | Literal["auto"] | None = None


@dataclass(frozen=True)
class GenerationConfig:
    #: Models members may pick; the first is the default.
    models: tuple[str, ...] = ("facebook/musicgen-small",)
    #: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:1"...
    device: str = "auto"
    #: Longest track a member may ask for, in seconds.
    max_duration: float = DEFAULT_MAX_DURATION
    #: Largest melody or intro upload, in MiB.
    max_upload_mib: float = 25.0
    #: Requests decoding at once, sharing every step whatever their options (more wait for
    #: a place); each holds its own keys and values.
    max_batch: int = 4
    #: Seconds an idle worker waits after a request arrives before it starts it.
    batch_window: float = 0.25
    #: Memory the loaded models may take together, in GB; 0 keeps only the model in use.
    memory_budget_gb: float = 0.0
    #: Number format models decode in: "auto" (float16 autocast on a GPU as audiocraft does,
    #: bfloat16 on a CPU with native bfloat16, else float32), "fp32", "bf16" or "fp16".
    precision: str = "auto"

    @property
    def default_model(self) -> str:
        return self.models[0]


@dataclass(frozen=True)
class StorageConfig:
    #: Where jobs, server settings and history live: an SQLite file's path (resolved
    #: against the configuration's folder), or a PostgreSQL address as given. Out of repr:
    #: an address may hold a password.
    database: str = field(default="data/musicgen-bot.sqlite3", repr=False)
    #: Days after a job finished that its track (the result files) is kept; 0 = forever.
    keep_results_days: float = Retention.results_days
    #: Days after a job finished that the audio it was given (melody, intro) is kept, unless
    #: a newer job uses the same audio; 0 = forever.
    keep_uploads_days: float = Retention.uploads_days
    #: Days after a job finished that it stays in the database (history, stats); 0 = forever.
    keep_jobs_days: float = Retention.jobs_days

    @property
    def retention(self) -> Retention:
        return Retention(self.keep_results_days, self.keep_uploads_days, self.keep_jobs_days)


@dataclass(frozen=True)
class QueueConfig:
    #: Live (queued or running) jobs one member may have in a server.
    max_jobs_per_user: int = 3
    #: Live jobs one server may have.
    max_jobs_per_guild: int = 20
    #: Jobs one member may submit in a server per hour; 0 for no limit.
    max_jobs_per_user_per_hour: int = 0
    #: Least time between two progress edits of a job's message, in seconds.
    progress_interval: float = 5.0
    #: Longest a job may generate before it is stopped and fails, in seconds.
    job_timeout: float = 900.0
    #: Times a job may be started (a crash makes it run again) before it fails for good.
    max_attempts: int = 3
    #: On shutdown, how long the running job may take to finish before it is stopped and
    #: queued to run again after the restart, in seconds.
    shutdown_grace: float = 30.0
    #: Longest a job may be passed over by jobs for a model already in memory, in seconds.
    max_model_wait: float = 120.0
    #: How long a worker holds a job without a heartbeat, in seconds: a worker silent that
    #: long (killed, its machine lost) loses its jobs to the queue, each such loss counting
    #: an attempt. Workers beat every quarter of it.
    lease_seconds: float = 60.0


@dataclass(frozen=True)
class JamsConfig:
    #: Relay jams one member may have open (their thread neither archived nor deleted) in a
    #: server; each is a public thread.
    max_open_per_user: int = 3


@dataclass(frozen=True)
class Config:
    discord: DiscordConfig = DiscordConfig()
    generation: GenerationConfig = GenerationConfig()
    storage: StorageConfig = StorageConfig()
    queue: QueueConfig = QueueConfig()
    jams: JamsConfig = JamsConfig()


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check the TOML file at ``path``; relative paths in it are relative to it.

    Raises:
        ConfigError: naming the file, and the key at fault.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(
            f"No configuration file at {path}: copy config.example.toml and edit it."
        ) from error
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"Cannot read {path}: {error}") from error
    return parse_config(raw, source=str(path), environ=os.environ, base_dir=path.absolute().parent)


def parse_config(
    raw: dict[str, Any],
    *,
    source: str,
    environ: Mapping[str, str],
    base_dir: Path = Path(),
) -> Config:
    """Build a :class:`Config` from parsed TOML; ``environ`` may supply the token.

    Relative paths (the database, checkpoint folders among the models) are taken relative to
    ``base_dir``, the configuration file's folder, not to the working directory.
    """
    _check_keys(raw, Config, source, "")
    config = Config(
        **{name: _section(cls, raw.get(name, {}), source, name) for name, cls in _SECTIONS.items()}
    )
    token = (environ.get(TOKEN_VARIABLE) or config.discord.token).strip()
    models = tuple(_model_path(name, base_dir) for name in config.generation.models)
    database = _database(config.storage.database, base_dir, source)
    config = replace(
        config,
        discord=replace(config.discord, token=token),
        generation=replace(config.generation, models=models),
        storage=replace(config.storage, database=database),
    )
    _check_values(config, source)
    return config


_SECTIONS: dict[str, type] = {f.name: type(f.default) for f in fields(Config)}


def _section(cls: type, values: Any, source: str, name: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{name}] must be a table.")
    _check_keys(values, cls, source, f"{name}.")
    defaults = cls()
    return cls(
        **{
            key: _convert(value, getattr(defaults, key), source, f"{name}.{key}")
            for key, value in values.items()
        }
    )


def _convert(value: Any, default: Any, source: str, key: str) -> Any:
    """``value`` as the type of ``default``, or a ConfigError naming ``key``."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {expected}, not {value!r}.")

    if key == "discord.shard_count":  # the one key with two kinds of value
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise fail('"auto" or a whole number of shards, 1 or more')
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise fail("a list")
        item_type = int if key == "discord.guilds" else str
        if not all(isinstance(item, item_type) and not isinstance(item, bool) for item in value):
            raise fail(f"a list of {'server ids' if item_type is int else 'strings'}")
        return tuple(value)
    if isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise fail("a number")
        return float(value)
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail("a whole number")
        return value
    if not isinstance(value, str):
        raise fail("a string")
    return value


#: What ``storage.database`` may be, for its error messages.
DATABASE_FORMS = (
    "a file path, sqlite:///relative/path, sqlite:////absolute/path or "
    "postgresql://user@host:5432/database"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _database(value: str, base_dir: Path, source: str) -> str:
    """``storage.database`` as the store opens it: a PostgreSQL address as given (once
    checked), else the SQLite file's path, a relative one (plain, or SQLAlchemy's
    ``sqlite:///relative``) taken relative to ``base_dir``."""
    if is_postgres(value):
        _check_postgres(value, source)
        return value
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return str(base_dir / value.removeprefix("sqlite:///"))
    if not value or _SCHEME.match(value):
        raise ConfigError(
            f"{source}: storage.database must be {DATABASE_FORMS}, not {redacted(value)!r}."
        )
    return str(base_dir / Path(value).expanduser())


def _check_postgres(address: str, source: str) -> None:
    """Refuse a PostgreSQL address libpq cannot parse, or one without a host, a database or
    with a bad port; the messages never show its password."""
    from psycopg import ProgrammingError  # only PostgreSQL users pay for importing psycopg
    from psycopg.conninfo import conninfo_to_dict

    def fail(problem: str) -> ConfigError:
        return ConfigError(
            f"{source}: storage.database {redacted(address)!r} {problem}: write it as "
            "postgresql://user@host:5432/database (percent-encode special characters; "
            "the password may come from PGPASSWORD instead)."
        )

    try:
        params = conninfo_to_dict(address)
    except ProgrammingError as error:
        detail = hide_passwords(str(error).strip(), address)
        raise fail(f"is not a valid address ({detail})") from None  # its text holds secrets
    if not (params.get("host") or params.get("hostaddr")):
        raise fail("names no host")
    if not params.get("dbname"):
        raise fail("names no database")
    for port in str(params.get("port", "")).split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise fail(f"has a bad port {port!r}")


def _model_path(name: str, base_dir: Path) -> str:
    """``name`` itself, unless it is a checkpoint folder relative to ``base_dir``."""
    if catalogue_name(name) is not None or os.path.isabs(name):
        return name
    folder = base_dir / name
    return str(folder) if folder.is_dir() else name


def _check_keys(values: dict[str, Any], cls: type, source: str, prefix: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {prefix}{key} (known: {', '.join(sorted(known))})."
            )


def _check_values(config: Config, source: str) -> None:
    generation, queue = config.generation, config.queue
    for key in ("keep_results_days", "keep_uploads_days", "keep_jobs_days"):
        days = getattr(config.storage, key)
        if not (math.isfinite(days) and days >= 0):
            raise ConfigError(
                f"{source}: storage.{key} must be a number of days, 0 or more (0 keeps "
                f"forever), not {days!r}."
            )
    if not generation.models:
        raise ConfigError(f"{source}: generation.models must name at least one model.")
    for name in generation.models:
        try:
            resolve_model(name)
        except InvalidOption as error:
            raise ConfigError(f"{source}: generation.models: {error}") from error
    if len(set(generation.models)) != len(generation.models):
        raise ConfigError(f"{source}: generation.models lists a model twice.")
    if len(generation.models) > 25:
        raise ConfigError(f"{source}: generation.models: Discord allows at most 25 choices.")
    if generation.max_duration <= 0:
        raise ConfigError(f"{source}: generation.max_duration must be above 0.")
    if generation.max_upload_mib <= 0:
        raise ConfigError(f"{source}: generation.max_upload_mib must be above 0.")
    if generation.max_batch < 1:
        raise ConfigError(f"{source}: generation.max_batch must be at least 1.")
    if not 0 <= generation.batch_window <= 10:
        raise ConfigError(f"{source}: generation.batch_window must be 0 to 10 seconds.")
    if generation.memory_budget_gb < 0:
        raise ConfigError(f"{source}: generation.memory_budget_gb must be 0 or more.")
    if generation.precision not in PRECISIONS:
        raise ConfigError(
            f"{source}: generation.precision must be one of {', '.join(PRECISIONS)}, "
            f"not {generation.precision!r}."
        )
    if queue.lease_seconds < 2:
        raise ConfigError(f"{source}: queue.lease_seconds must be 2 or more.")
    if queue.max_model_wait < 0:
        raise ConfigError(f"{source}: queue.max_model_wait must be 0 or more.")
    if min(queue.max_jobs_per_user, queue.max_jobs_per_guild, queue.max_attempts) < 1:
        raise ConfigError(f"{source}: queue limits and max_attempts must be at least 1.")
    if queue.max_jobs_per_user_per_hour < 0:
        raise ConfigError(f"{source}: queue.max_jobs_per_user_per_hour must be 0 or more.")
    if queue.job_timeout <= 0 or queue.shutdown_grace < 0:
        raise ConfigError(f"{source}: queue.job_timeout must be above 0, shutdown_grace 0 or more.")
    if config.jams.max_open_per_user < 1:
        raise ConfigError(f"{source}: jams.max_open_per_user must be at least 1.")
    if queue.progress_interval < 1:
        raise ConfigError(f"{source}: queue.progress_interval must be at least 1 second.")
