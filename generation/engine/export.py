"""Writing a model built in this process as a checkpoint folder, the way audiocraft releases
its models, so it loads through ``MusicGen.get_pretrained`` like a downloaded one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from audiocraft.models import MusicGen
from audiocraft.utils.export import export_encodec, export_lm
from omegaconf import DictConfig, OmegaConf

from generation.engine.models import COMPRESSION_CHECKPOINT, LM_CHECKPOINT


def export_checkpoint(model: MusicGen, cfg: DictConfig, folder: Path) -> Path:
    """Save ``model`` (built from training config ``cfg``) as a checkpoint folder in ``folder``.

    The weights go through what a training run saves and then audiocraft's own exporters
    (``export_lm``, ``export_encodec``), as for the released checkpoints.

    Returns:
        The checkpoint folder (``folder/<model name>``).
    """
    config = OmegaConf.to_container(cfg)
    release = folder / Path(model.name).name
    codec = model.compression_model
    with tempfile.TemporaryDirectory(dir=folder) as training:
        lm_state, codec_state = Path(training) / "lm.th", Path(training) / "codec.th"
        states = (
            (lm_state, model.lm),
            (codec_state, getattr(codec, "model", codec)),  # a wrapped codec saves its model
        )
        for path, module in states:
            state = {"xp.cfg": config, "best_state": {"model": module.state_dict()}}
            torch.save({**state, "fsdp_best_state": None}, path)  # as a run without FSDP
        export_lm(lm_state, release / LM_CHECKPOINT)
        export_encodec(codec_state, release / COMPRESSION_CHECKPOINT)
    return release
