"""Checkpoint folders in audiocraft's exported format load through the real loading path."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from generation.engine.debug_models import build_debug_model, debug_config
from generation.engine.export import export_checkpoint
from generation.engine.loading import load_model
from generation.engine.models import ModelSpec, resolve_model
from generation.engine.musicgen import MusicGenEngine
from generation.errors import ModelLoadError
from generation.request import GenerationRequest


def export_checkpoint_folder(name: str, folder: Path) -> Path:
    """Export a debug model as audiocraft's exporters write released checkpoints."""
    return export_checkpoint(build_debug_model(name), debug_config(name), folder)


def test_a_checkpoint_folder_loads_and_generates_like_the_model_it_came_from(tmp_path):
    folder = export_checkpoint_folder("debug", tmp_path)
    package = torch.load(folder / "state_dict.bin", weights_only=True)
    assert isinstance(package["xp.cfg"], str)  # a YAML config beside best_state

    spec = resolve_model(str(folder))
    assert (spec.melody, spec.stereo) == (False, False)
    engine = MusicGenEngine(device="cpu")
    request = GenerationRequest(prompt="ambient", model=str(folder), duration=1.0, seed=3)
    from_folder = engine.generate(request).audio
    built = MusicGenEngine(device="cpu").generate(replace(request, model="debug")).audio
    np.testing.assert_array_equal(from_folder, built)


def test_a_stereo_checkpoint_folder_keeps_its_channels(tmp_path):
    folder = export_checkpoint_folder("debug-stereo", tmp_path)
    assert resolve_model(str(folder)).stereo
    model = load_model(resolve_model(str(folder)), "cpu")
    assert model.audio_channels == 2


def test_capabilities_are_read_from_the_checkpoint_config(tmp_path):
    folder = tmp_path / "melody"
    folder.mkdir()
    cfg = OmegaConf.to_yaml(debug_config("debug-melody"))
    torch.save({"xp.cfg": cfg, "best_state": {}}, folder / "state_dict.bin")
    torch.save({"xp.cfg": cfg, "best_state": {}}, folder / "compression_state_dict.bin")
    assert resolve_model(str(folder)).melody


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_needs_unpickling_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = export_checkpoint_folder("debug", tmp_path)
    torch.save({"xp.cfg": _Payload(), "best_state": {}}, folder / "state_dict.bin")
    with pytest.raises(ModelLoadError, match="safely"):
        resolve_model(str(folder))
    with pytest.raises(ModelLoadError, match="safely"):
        load_model(ModelSpec(name=str(folder), size="custom", parameters="?"), "cpu")
    assert not (tmp_path / "pwned").exists()


def test_a_released_model_that_cannot_be_downloaded_says_so():
    with pytest.raises(ModelLoadError, match="facebook/musicgen-small"):
        load_model(resolve_model("facebook/musicgen-small"), "cpu")
