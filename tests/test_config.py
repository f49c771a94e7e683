from __future__ import annotations

import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import fields
from pathlib import Path

import discord
import pytest

from bot.cli import main
from bot.config import Config, ConfigError, load_config, parse_config
from generation.engine.debug_models import build_debug_model, debug_config
from generation.engine.export import export_checkpoint
from generation.engine.models import resolve_model
from generation.jobs.ownership import Ownership

from .bot_helpers import make_bot

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_documents_and_sets_every_key():
    text = (ROOT / "config.example.toml").read_text()
    config = load_config(ROOT / "config.example.toml")
    for section in fields(Config):
        assert f"[{section.name}]" in text
        for key in fields(getattr(config, section.name)):
            # TOML has no null: a key whose default is "absent" is shown commented out.
            setting = f"\n{key.name} = " if key.default is not None else f"\n# {key.name} = "
            assert setting in text, f"{section.name}.{key.name} is not documented"
    assert config.generation.default_model == "facebook/musicgen-small"


def test_the_token_comes_from_the_environment_first():
    raw = {"discord": {"token": "from-file"}}
    assert parse_config(raw, source="t", environ={}).discord.token == "from-file"
    env = {"DISCORD_TOKEN": "from-env"}
    assert parse_config(raw, source="t", environ=env).discord.token == "from-env"


@pytest.mark.parametrize(("value", "parsed"), [(None, None), ("auto", "auto"), (1, 1), (40, 40)])
def test_shard_count_is_absent_auto_or_a_number(value, parsed):
    raw = {"discord": {} if value is None else {"shard_count": value}}
    assert parse_config(raw, source="t", environ={}).discord.shard_count == parsed


def test_the_token_never_shows_in_repr():
    config = parse_config({"discord": {"token": "s3cr3t-token"}}, source="t", environ={})
    assert "s3cr3t-token" not in repr(config)
    assert "s3cr3t-token" not in str(config.discord)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"generation": {"models": []}}, "at least one model"),
        ({"generation": {"models": ["debug", "nope"]}}, "Unknown model 'nope'"),
        ({"generation": {"models": "debug"}}, "generation.models must be a list"),
        ({"generation": {"max_duration": "long"}}, "generation.max_duration must be a number"),
        ({"generation": {"max_duration": -1}}, "max_duration must be above 0"),
        ({"generation": {"modle": ["debug"]}}, "unknown key generation.modle"),
        ({"generation": {"precision": "half"}}, "generation.precision must be one of auto, fp32"),
        ({"generation": {"precision": 16}}, "generation.precision must be a string"),
        ({"queue": {"max_jobs_per_user": 0}}, "at least 1"),
        ({"queue": {"max_jobs_per_user": 2.5}}, "must be a whole number"),
        ({"discord": {"guilds": ["123"]}}, "list of server ids"),
        ({"discord": {"shard_count": 0}}, 'discord.shard_count must be "auto" or a whole number'),
        ({"discord": {"shard_count": -2}}, "discord.shard_count must be"),
        ({"discord": {"shard_count": "4"}}, "discord.shard_count must be .*, not '4'"),
        ({"discord": {"shard_count": "Auto"}}, "discord.shard_count must be"),
        ({"discord": {"shard_count": 2.5}}, "discord.shard_count must be"),
        ({"discord": {"shard_count": True}}, "discord.shard_count must be"),
        ({"storage": {"database": ""}}, "storage.database must be a file path"),
        ({"storage": {"database": 3}}, "storage.database must be a string"),
        ({"storage": {"database": "mysql://db/jobs"}}, "sqlite:///relative/path"),
        ({"storage": {"database": "sqlite://jobs.sqlite3"}}, "sqlite:////absolute/path"),
        ({"storage": {"database": "sqlite:///"}}, "storage.database must be"),
        ({"storage": {"database": "postgresql:///jobs"}}, "storage.database .* names no host"),
        ({"storage": {"database": "postgresql://db"}}, "names no database"),
        ({"storage": {"database": "postgres://db:54x/jobs"}}, "bad port '54x'"),
        ({"storage": {"database": "postgres://db:70000/jobs"}}, "bad port '70000'"),
        ({"storage": {"database": "postgresql://db/jobs?colour=red"}}, '"colour"'),
        ({"storage": {"keep_results_days": -1}}, r"storage.keep_results_days .* 0 or more"),
        ({"storage": {"keep_uploads_days": float("nan")}}, "storage.keep_uploads_days"),
        ({"storage": {"keep_jobs_days": float("inf")}}, "0 keeps forever"),
        ({"storage": {"keep_jobs_days": "1y"}}, "storage.keep_jobs_days must be a number"),
        ({"extra": {}}, "unknown key extra"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, source="config.toml", environ={})


def test_a_malformed_file_is_named(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[generation\nmodels = 1")
    with pytest.raises(ConfigError, match=r"config\.toml"):
        load_config(path)


@pytest.mark.parametrize("name", ["config.example.toml", "config.toml"])
def test_run_without_a_token_says_how_to_get_one(tmp_path, capsys, monkeypatch, name):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    path = tmp_path / name
    path.write_text('[generation]\nmodels = ["debug"]\n')
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"DISCORD_TOKEN=... musicgen-bot run --config {path}" in err
    assert "discord.com/developers/applications" in err
    if name == "config.example.toml":  # tracked by git: the token goes in a private copy
        assert "in config.example.toml" not in err
        assert "cp config.example.toml config.toml" in err
        assert "git ignores config.toml" in err
    else:
        assert f'set token = "..." under [discord] in {path}' in err


@pytest.mark.parametrize("command", ["run", "prune"])
def test_a_missing_config_exits_with_one_line(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exited:
        main([command, "--config", str(tmp_path / "missing.toml")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("command", ["run", "prune"])
def test_each_command_says_paths_in_the_config_are_relative_to_it(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "relative paths in it are relative to this file" in help_text


def test_relative_paths_are_relative_to_the_configuration_file(tmp_path, monkeypatch):
    folder = tmp_path / "bot"
    (folder / "checkpoints").mkdir(parents=True)
    checkpoint = export_checkpoint(
        build_debug_model("debug-stereo"), debug_config("debug-stereo"), folder / "checkpoints"
    )
    (folder / "config.toml").write_text(
        '[generation]\nmodels = ["debug", "checkpoints/debug-stereo"]\n'
        '[storage]\ndatabase = "data/jobs.sqlite3"\n'
    )
    monkeypatch.chdir(tmp_path)  # not the configuration's folder
    config = load_config("bot/config.toml")
    assert config.storage.database == str(folder / "data" / "jobs.sqlite3")
    assert config.generation.models == ("debug", str(checkpoint))
    assert resolve_model(config.generation.models[1]).stereo
    (folder / "config.toml").write_text(f'[storage]\ndatabase = "{tmp_path}/jobs.sqlite3"\n')
    assert load_config("bot/config.toml").storage.database == str(tmp_path / "jobs.sqlite3")


@pytest.mark.parametrize(
    ("database", "opened"),
    [
        (None, "{folder}/data/musicgen-bot.sqlite3"),  # the default, too
        ("jobs.sqlite3", "{folder}/jobs.sqlite3"),
        ("sqlite:///data/jobs.sqlite3", "{folder}/data/jobs.sqlite3"),
        ("sqlite:////srv/jobs.sqlite3", "/srv/jobs.sqlite3"),
        ("/srv/jobs.sqlite3", "/srv/jobs.sqlite3"),
        ("postgresql://bot:s3cret@db:5432/jobs", "postgresql://bot:s3cret@db:5432/jobs"),
        (
            "postgres://bot@db1,db2/jobs?sslmode=require",
            "postgres://bot@db1,db2/jobs?sslmode=require",
        ),
        ("postgresql:///jobs?host=/run/postgresql", "postgresql:///jobs?host=/run/postgresql"),
    ],
)
def test_the_database_is_a_file_relative_to_the_configuration_or_a_postgresql_address(
    tmp_path, database, opened
):
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\ndatabase = "{database}"\n' if database else "")
    assert load_config(path).storage.database == opened.format(folder=tmp_path)


@pytest.mark.parametrize(
    "address",
    [
        "postgresql://bot:s3cret@db:5432",  # no database
        "postgresql://bot:s3cret@/jobs",  # no host
        "postgresql://bot:s3cret@db:x/jobs",
        "postgresql://bot:s3cret@db/jobs?colour=red",
        "postgresql://bot:s3cret%zz@db/jobs",  # libpq quotes the bad token
        "postgresql://db/jobs?password=s3cret%zz",
        "mysql://bot:s3cret@db/jobs",
    ],
)
def test_a_refused_database_address_never_shows_its_password(address):
    raw = {"storage": {"database": address}}
    with pytest.raises(ConfigError, match=r"storage\.database") as refused:
        parse_config(raw, source="config.toml", environ={})
    # Nor does the traceback: libpq's error, which quotes the address, is not chained.
    assert "s3cret" not in "".join(traceback.format_exception(refused.value))


def test_the_database_address_never_shows_in_repr():
    raw = {"storage": {"database": "postgresql://bot:s3cret@db/jobs"}}
    config = parse_config(raw, source="t", environ={})
    assert "s3cret" not in repr(config)


async def test_a_global_sync_says_commands_can_take_an_hour(simcord_env, database, caplog):
    caplog.set_level(logging.INFO, logger="bot")
    await simcord_env.restart_bot(make_bot(database))  # no discord.guilds: a global sync
    (line,) = [r.getMessage() for r in caplog.records if "synced" in r.getMessage()]
    assert "globally" in line
    assert "up to an hour" in line
    assert "discord.guilds" in line


class _RefusingDiscord(http.server.BaseHTTPRequestHandler):
    """Discord's API as it answers a wrong bot token."""

    def do_GET(self) -> None:
        body = b'{"message": "401: Unauthorized", "code": 0}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


# `musicgen-bot run` with discord.py's API base URL pointed at a local server.
RUN_AGAINST = """
import sys
import discord.http
discord.http.Route.BASE = sys.argv.pop(1)
from bot.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _bot_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "bot"
    folder.mkdir()
    config = folder / "config.toml"
    config.write_text(
        '[generation]\nmodels = ["debug"]\ndevice = "cpu"\n'
        '[storage]\ndatabase = "data/jobs.sqlite3"\n'
    )
    return config


def test_a_wrong_token_ends_the_run_with_one_line_and_each_log_line_once(tmp_path):
    config = _bot_folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingDiscord)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "MTIz.not-a-real.token"
    base_url = f"http://127.0.0.1:{server.server_port}/api/v10"
    try:
        result = subprocess.run(
            [sys.executable, "-c", RUN_AGAINST, base_url, "run", "--config", str(config)],
            cwd=elsewhere,
            env={**os.environ, "DISCORD_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        server.shutdown()
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stderr.splitlines()[-1].startswith(
        "musicgen-bot: error: Discord refused the bot token: reset it"
    )
    assert "Traceback" not in output
    assert output.count("logging in using static token") == 1  # one handler
    assert "voice" not in output.lower()
    assert token not in output
    # The database was opened beside the configuration, not in the working directory.
    assert (config.parent / "data" / "jobs.sqlite3").is_file()
    assert list(elsewhere.iterdir()) == []


@pytest.fixture
def process_state():
    """Put back what ``musicgen-bot run`` sets for its process: logging and signal handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sigterm = signal.getsignal(signal.SIGTERM)
    voice = discord.VoiceClient.warn_nacl, discord.VoiceClient.warn_dave
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    signal.signal(signal.SIGTERM, sigterm)
    discord.VoiceClient.warn_nacl, discord.VoiceClient.warn_dave = voice


def test_no_network_ends_the_run_with_one_line(tmp_path, capsys, monkeypatch, process_state):
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
    monkeypatch.setenv("DISCORD_TOKEN", "not-a-real-token")
    assert main(["run", "--config", str(_bot_folder(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(
        f"musicgen-bot: error: cannot reach Discord (Cannot connect to host 127.0.0.1:{port}"
    )
    assert "Traceback" not in err


def test_a_database_another_bot_owns_ends_the_run_with_one_line_and_prune_still_works(
    tmp_path, capsys, monkeypatch, process_state
):
    config = _bot_folder(tmp_path)
    database = config.parent / "data" / "jobs.sqlite3"
    database.parent.mkdir()
    running = Ownership.take(database)  # what the running bot's store holds
    try:
        monkeypatch.setenv("DISCORD_TOKEN", "not-a-real-token")
        assert main(["run", "--config", str(config)]) == 1
        assert capsys.readouterr().err == (
            f"musicgen-bot: error: The database {database} is in use by another musicgen-bot "
            "process: stop it first (one bot owns a database; two would run and deliver the "
            "same jobs twice).\n"
        )
        assert main(["prune", "--config", str(config)]) == 0
        assert capsys.readouterr().out.startswith("Deleted 0 jobs")
    finally:
        running.release()
