"""``musicgen-bot generate``: the MusicGen command line's examples, with the debug models;
help and argument errors through the installed entry point."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from mutagen import File as read_tagged
from mutagen.flac import FLAC
from mutagen.id3 import ID3
from mutagen.mp3 import MP3
from mutagen.oggvorbis import OggVorbis
from mutagen.wave import WAVE

from bot.cli import main

from .helpers import encode_titled_tone, encode_tone, ima_adpcm_wav, wav_without_decoder

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


@pytest.mark.parametrize(
    ("flag", "data", "expected"),
    [
        ("--melody", wav_without_decoder(), "audio codec is not one we can decode"),
        ("--continuation", ima_adpcm_wav(sample_rate=8), "sample rate is 8 Hz"),
        ("--continuation", b"RIFF" + bytes(100), "not audio we can read"),
    ],
    ids=["no-decoder", "tiny-rate", "garbage"],
)
def test_an_upload_that_cannot_be_decoded_exits_with_one_line_naming_the_flag(
    workdir, capsys, flag, data, expected
):
    (workdir / "upload.wav").write_bytes(data)
    argv = ["generate", "--prompt", "x", "--model", "debug-melody", flag, "upload.wav"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"musicgen-bot generate: error: {flag}: ") and expected in err


def test_an_upload_titled_in_latin_1_is_extended(workdir):
    encode_titled_tone(workdir / "cafe.wav", "Café".encode("latin-1"), seconds=2.0)
    argv = ["generate", "--prompt", "x", "--model", "debug", "--duration", "3"]
    assert main([*argv, "--continuation", "cafe.wav", "--output", "out.mp3"]) == 0
    assert MP3(workdir / "out.mp3").info.length == pytest.approx(3.0, abs=0.1)


# Runs the installed ``musicgen-bot`` script, then reports which heavy packages it loaded.
ENTRY_POINT_PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]  # as if the script had been run: its path, then its arguments
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    heavy = {name.partition(".")[0] for name in sys.modules} & {"torch", "audiocraft", "discord"}
    print("loaded:", ",".join(sorted(heavy)), file=sys.stderr)
"""


def run_main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = shutil.which("musicgen-bot", path=str(Path(sys.executable).parent))
    assert script is not None
    return subprocess.run(
        [sys.executable, "-c", ENTRY_POINT_PROBE, script, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "status"),
    [
        ("--help", 0),
        ("generate --help", 0),
        ("run --help", 0),
        ("prune --help", 0),
        ("generate --prompt x --bogus", 2),
        ("generate --prompt x --top-p 1.5", 2),
        ("generate --prompt x --output take.aiff", 2),
        ("generate --prompt x --output nodir/out.mp3", 2),
        ("run", 2),
        ("prune", 2),
    ],
)
def test_help_and_argument_errors_load_neither_torch_nor_discord(tmp_path, args, status):
    result = run_main(*shlex.split(args), cwd=tmp_path)
    assert result.returncode == status, result.stderr
    *message, loaded = result.stderr.splitlines()
    assert loaded == "loaded: "
    assert len(message) == (0 if status == 0 else 1)  # one line: what to change
    assert "Traceback" not in result.stderr


def test_help_gives_every_numeric_flags_range_and_the_short_model_names(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, range_text in {
        "--duration SECONDS": "more than 0, at most 120",
        "--temperature T": "0.0 to 2.0",
        "--top-k K": "0 to 2048",
        "--top-p P": "0.0 to 1.0",
        "--cfg-coef COEF": "0.0 to 20.0",
        "--extend-stride SECONDS": "more than 0, less than 30",
        "--seed N": "0 to 4294967295",
    }.items():
        assert f"{flag} {range_text}:" in text
    for short in ("small", "melody-large", "stereo-large", "debug-stereo"):
        assert re.search(rf"[ ,]{short}[,) ]", text), short


@pytest.mark.parametrize(
    ("args", "flag", "named", "advice"),
    [
        ("--temperature 2.5", "--temperature", "temperature", "from 0 to 2"),
        ("--top-k 5000", "--top-k", "top_k", "from 0 to 2048"),
        ("--top-p 1.5", "--top-p", "top_p", "from 0 to 1"),
        ("--cfg-coef -1", "--cfg-coef", "cfg_coef", "from 0 to 20"),
        ("--duration 500", "--duration", "duration", "at most 120 seconds"),
        ("--extend-stride 30", "--extend-stride", "extend_stride", "less than the 30 s window"),
        ("--seed -5", "--seed", "seed", "from 0 to 4294967295"),
    ],
)
def test_a_range_error_names_the_flag_once_as_typed(workdir, capsys, args, flag, named, advice):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--model", "debug", *shlex.split(args)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"musicgen-bot generate: error: {flag}: ")
    rest = err.removeprefix(f"musicgen-bot generate: error: {flag}: ")
    assert named.replace("_", " ") not in rest.replace("_", " ").lower()
    assert advice in rest


@pytest.mark.parametrize(
    ("name", "kind", "sound_format"),
    [
        ("take.wav", WAVE, "WAV"),
        ("take.flac", FLAC, "FLAC"),
        ("take.OGG", OggVorbis, "OGG"),
        ("take.mp3", MP3, None),
    ],
)
def test_the_output_extension_picks_the_format_with_the_tags(workdir, name, kind, sound_format):
    args = "generate --model debug-stereo --prompt 'lo-fi' --duration 1 --seed 7 --output"
    assert main([*shlex.split(args), name]) == 0
    written = read_tagged(workdir / name)
    assert type(written) is kind
    assert written.info.length == pytest.approx(1.0, abs=0.06)
    assert written.info.channels == 2
    if sound_format is not None:  # libsndfile reads the same file as that format
        assert soundfile.info(str(workdir / name)).format == sound_format
    tags = written.tags
    if kind in (WAVE, MP3):
        assert tags["TXXX:musicgen_seed"].text == ["7"]
        assert tags["TIT2"].text == ["lo-fi"]
    else:
        assert tags["musicgen_seed"] == ["7"]
        assert tags["title"] == ["lo-fi"]


@pytest.mark.parametrize(
    ("output", "says"),
    [
        ("take.aiff", "take.aiff does not end in a known extension: use .mp3, .wav, .flac, .ogg"),
        ("take", "take does not end in a known extension"),
        ("nodir/out.mp3", "there is no folder nodir: create it"),
        ("notes.txt/out.mp3", "there is no folder notes.txt"),
        ("sub", "sub is a folder: name a file in it"),
    ],
)
def test_an_output_that_cannot_be_written_exits_before_generating(workdir, capsys, output, says):
    (workdir / "notes.txt").write_text("a file, not a folder")
    (workdir / "sub").mkdir()
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--model", "debug", "--output", output])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"musicgen-bot generate: error: --output: {says}")
    assert err.count("\n") == 1
    assert {p.name for p in workdir.iterdir()} == {"intro.wav", "melody.wav", "notes.txt", "sub"}


def test_a_prompt_with_a_control_character_exits_naming_the_flag(workdir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--model", "debug", "--prompt", "beat\x1b[31m", "--duration", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--prompt" in err and "U+001B" in err
    assert not list(workdir.glob("*.mp3"))
