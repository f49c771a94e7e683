from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import Config, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_documents_and_sets_every_key():
    text = (ROOT / "config.example.toml").read_text()
    config = load_config(ROOT / "config.example.toml")
    for section in fields(Config):
        assert f"[{section.name}]" in text
        for key in fields(getattr(config, section.name)):
            assert f"\n{key.name} = " in text, f"{section.name}.{key.name} is not documented"
    assert config.generation.default_model == "facebook/musicgen-small"


def test_the_token_comes_from_the_environment_first():
    raw = {"discord": {"token": "from-file"}}
    assert parse_config(raw, source="t", environ={}).discord.token == "from-file"
    env = {"DISCORD_TOKEN": "from-env"}
    assert parse_config(raw, source="t", environ=env).discord.token == "from-env"


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
        ({"queue": {"max_jobs_per_user": 0}}, "at least 1"),
        ({"queue": {"max_jobs_per_user": 2.5}}, "must be a whole number"),
        ({"discord": {"guilds": ["123"]}}, "list of server ids"),
        ({"storage": {"database": ""}}, "a file path"),
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


def test_run_without_a_token_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    path = tmp_path / "config.toml"
    path.write_text('[generation]\nmodels = ["debug"]\n')
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "DISCORD_TOKEN" in err
    assert "discord.com/developers/applications" in err
    assert str(path) in err


def test_run_with_a_missing_config_exits_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--config", str(tmp_path / "missing.toml")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
