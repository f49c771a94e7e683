"""Checkpoint folders in audiocraft's exported format load through the real loading path."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from audiocraft.models import MusicGen, builders
from omegaconf import OmegaConf

from generation.engine.debug_models import build_debug_model, debug_config
from generation.engine.export import export_checkpoint
from generation.engine.loading import load_checkpoint, load_model
from generation.engine.models import ModelSpec, resolve_model
from generation.engine.musicgen import MusicGenEngine, model_bytes
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


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("name", ["debug", "debug-stereo"])
def test_loading_on_the_meta_device_gives_what_audiocrafts_loader_gives(tmp_path, name):
    folder = export_checkpoint_folder(name, tmp_path)
    ours = load_checkpoint(str(folder), "cpu")
    theirs = MusicGen.get_pretrained(str(folder), device="cpu")
    for part in ("lm", "compression_model"):
        mine, reference = tensors(getattr(ours, part)), tensors(getattr(theirs, part))
        assert mine.keys() == reference.keys()
        for key, tensor in mine.items():
            assert tensor.dtype == reference[key].dtype, key
            assert torch.equal(tensor, reference[key]), key
    outputs = []
    for model in (ours, theirs):
        model.set_generation_params(use_sampling=False, duration=1.0)
        torch.manual_seed(0)
        outputs.append(model.generate(["lo-fi hip hop beat"]))
    assert torch.equal(*outputs)


def test_a_checkpoint_loads_its_transformer_in_the_dtype_asked(tmp_path):
    folder = export_checkpoint_folder("debug", tmp_path)
    full = load_checkpoint(str(folder), "cpu").lm
    half = load_checkpoint(str(folder), "cpu", torch.float16).lm
    assert half.cfg.dtype == "float16"
    for (key, tensor), reference in zip(
        half.transformer.state_dict().items(), full.transformer.state_dict().values(), strict=True
    ):
        assert tensor.dtype == torch.float16, key
        assert torch.equal(tensor, reference.half()), key
    assert {p.dtype for p in half.linears.parameters()} == {torch.float32}  # as audiocraft


_PEAK_SCRIPT = """
import sys
from audiocraft.models import MusicGen
from generation.engine.loading import load_checkpoint
from tests.helpers import peak_resident_bytes, reset_peak

way, folder = sys.argv[1:]
reset_peak()
before = peak_resident_bytes()
load = load_checkpoint if way == "meta" else MusicGen.get_pretrained
load(folder, device="cpu")
print(peak_resident_bytes() - before)
"""


def loading_peak(way: str, folder: Path) -> int:
    """Bytes the resident memory rose by at its peak while ``folder`` loaded, in a fresh
    process (torch's allocations are invisible to tracemalloc)."""
    command = [sys.executable, "-c", _PEAK_SCRIPT, way, str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, check=True, cwd=Path(__file__).parents[1]
    )
    return int(done.stdout.split()[-1])


def test_loading_on_the_meta_device_never_holds_a_random_model(tmp_path):
    # A debug model widened to 136 MB, so the memory of one copy stands out of the noise.
    cfg = debug_config("debug")
    cfg.transformer_lm.update(dim=512, num_layers=8, num_heads=8)
    lm = builders.get_lm_model(cfg).eval()
    lm.cfg = cfg
    model = MusicGen("wide", builders.get_compression_model(cfg).eval(), lm)
    size = model_bytes(model)
    folder = export_checkpoint(model, cfg, tmp_path)
    del model, lm

    random_first = loading_peak("audiocraft", folder)
    meta = loading_peak("meta", folder)
    print(
        f"model {size / 2**20:.0f} MiB, peak audiocraft {random_first / 2**20:.0f} MiB, "
        f"meta {meta / 2**20:.0f} MiB"
    )
    assert random_first - meta >= 0.9 * size  # audiocraft's loader holds the model twice
    assert meta <= 1.2 * size
