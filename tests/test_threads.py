"""OpenMP's wait policy is set before torch loads its OpenMP runtime."""

from __future__ import annotations

import os
import subprocess
import sys


def _after_import(environment: dict[str, str]) -> str:
    code = (
        "import sys; assert 'torch' not in sys.modules; import generation.engine.musicgen, os; "
        "print(os.environ['OMP_WAIT_POLICY'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_generation_makes_openmp_threads_wait_passively():
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _after_import(environment) == "PASSIVE"


def test_an_operator_setting_wins():
    assert _after_import({**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
