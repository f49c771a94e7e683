"""``musicgen-bot generate``: the MusicGen command line's examples, with the debug models."""

from __future__ import annotations

import shlex

import pytest
from mutagen.id3 import ID3
from mutagen.mp3 import MP3

from generation.cli import main

from .helpers import encode_tone

# The examples of "AudioCraft MusicGen Options", with their model replaced by a debug model
# (those that name none get --model debug) and a default duration where they have none.
SEED_EXAMPLES = {
    "basic": '--prompt "energetic rock music" --service audiocraft',
    "temperature": '--prompt "jazz" --temperature 1.5',
    "top-k": '--prompt "classical" --top-k 250',
    "top-p": '--prompt "ambient" --top-p 0.9',
    "cfg-coef": '--prompt "electronic" --cfg-coef 3.0',
    "no-sampling": '--prompt "rock" --no-sampling',
    "melody": '--prompt "jazz arrangement" --melody melody.wav --model debug-melody',
    "continuation": '--prompt "energetic solo" --continuation intro.wav --duration 15',
    "two-step-cfg": '--prompt "orchestral" --two-step-cfg',
    "extend-stride": '--prompt "ambient" --extend-stride 18',
    "quick-draft": '--prompt "lo-fi hip hop beat" --model debug --duration 10',
    "high-quality": '--prompt "cinematic orchestral piece" --model debug --duration 30 '
    "--temperature 0.8",
    "melody-based": '--prompt "full band arrangement" --melody melody.wav --model debug-melody',
    "continuation-20s": '--prompt "dramatic finale" --continuation intro.wav --duration 20 '
    "--extend-stride 15",
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    encode_tone(tmp_path / "melody.wav", seconds=4.0, frequency=523.0)
    encode_tone(tmp_path / "intro.wav", seconds=3.0, frequency=330.0, channels=1)
    return tmp_path


@pytest.mark.parametrize("example", sorted(SEED_EXAMPLES))
def test_each_seed_document_example_runs_with_a_debug_model(workdir, example):
    args = shlex.split(SEED_EXAMPLES[example])
    if "--model" not in args:
        args += ["--model", "debug"]
    duration = float(args[args.index("--duration") + 1]) if "--duration" in args else 10.0
    assert main(["generate", *args, "--output", "out.mp3", "--seed", "1"]) == 0
    info = MP3(workdir / "out.mp3").info
    assert info.length == pytest.approx(duration, abs=0.1)


def test_the_readme_command_writes_a_ten_second_mp3(workdir, capsys):
    code = main(
        shlex.split(
            'generate --model debug --prompt "lo-fi hip hop beat" --duration 10 --output beat.mp3'
        )
    )
    assert code == 0
    mp3 = MP3(workdir / "beat.mp3")
    assert mp3.info.length == pytest.approx(10.0, abs=0.1)
    assert mp3.info.channels == 1
    seed = {frame.desc: frame.text[0] for frame in ID3(workdir / "beat.mp3").getall("TXXX")}[
        "musicgen_seed"
    ]
    assert f"seed {seed}" in capsys.readouterr().out


def test_without_output_the_file_is_named_after_prompt_and_seed(workdir):
    assert (
        main(
            [
                "generate",
                "--model",
                "debug-stereo",
                "--prompt",
                "Lo-Fi beat!",
                "--duration",
                "2",
                "--seed",
                "9",
            ]
        )
        == 0
    )
    assert MP3(workdir / "lo-fi-beat-9.mp3").info.channels == 2


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        ("--temperature 2.5", "--temperature"),
        ("--top-k 5000", "--top-k"),
        ("--top-p 1.5", "--top-p"),
        ("--cfg-coef -1", "--cfg-coef"),
        ("--duration 0", "--duration"),
        ("--duration 500", "--duration"),
        ("--extend-stride 30", "--extend-stride"),
        ("--model musicgen-xl", "--model"),
        ("--melody melody.wav", "--melody"),
        ("--melody melody.wav --continuation intro.wav --model debug-melody", "--melody"),
        ("--continuation intro.wav --duration 2", "--continuation"),
        ("--melody missing.wav --model debug-melody", "--melody"),
        ("--continuation README.txt", "--continuation"),
        ("--service replicate", "--service"),
        ("--top-k many", "--top-k"),
        ("--device tpu", "--device"),
        ("--seed -5", "--seed"),
    ],
)
def test_invalid_values_exit_with_one_line_naming_the_flag(workdir, capsys, args, flag):
    (workdir / "README.txt").write_text("not audio")
    argv = ["generate", "--prompt", "x", *shlex.split(args)]
    if "--model" not in argv:
        argv += ["--model", "debug"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert flag in err
    assert "Traceback" not in err
    assert not list(workdir.glob("*.mp3"))


def test_a_prompt_with_a_control_character_exits_naming_the_flag(workdir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--model", "debug", "--prompt", "beat\x1b[31m", "--duration", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--prompt" in err and "U+001B" in err
    assert not list(workdir.glob("*.mp3"))
