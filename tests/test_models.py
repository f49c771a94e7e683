from __future__ import annotations

import pytest

from generation.engine.models import CATALOGUE, resolve_model
from generation.errors import UnknownModel

RELEASED = [name for name, spec in CATALOGUE.items() if not spec.offline]


def test_catalogue_has_the_eight_released_checkpoints():
    assert sorted(RELEASED) == sorted(
        f"facebook/musicgen-{name}"
        for name in (
            "small",
            "medium",
            "large",
            "melody",
            "melody-large",
            "stereo-small",
            "stereo-medium",
            "stereo-large",
        )
    )


@pytest.mark.parametrize(
    ("name", "melody", "stereo", "vram", "ram"),
    [
        ("facebook/musicgen-small", False, False, 2, 4),
        ("facebook/musicgen-medium", False, False, 6, 8),
        ("facebook/musicgen-large", False, False, 12, 16),
        ("facebook/musicgen-melody", True, False, 6, 8),
        ("facebook/musicgen-melody-large", True, False, 12, 16),
        ("facebook/musicgen-stereo-small", False, True, 2, 4),
        ("facebook/musicgen-stereo-medium", False, True, 6, 8),
        ("facebook/musicgen-stereo-large", False, True, 12, 16),
        ("debug", False, False, 0, 0),
        ("debug-melody", True, False, 0, 0),
        ("debug-stereo", False, True, 0, 0),
    ],
)
def test_capabilities_and_memory(name, melody, stereo, vram, ram):
    spec = CATALOGUE[name]
    assert (spec.melody, spec.stereo, spec.vram_gb, spec.ram_gb) == (melody, stereo, vram, ram)


def test_short_names_resolve_to_hub_ids():
    assert resolve_model("stereo-large").name == "facebook/musicgen-stereo-large"
    assert resolve_model("small").name == "facebook/musicgen-small"


def test_unknown_model_names_the_choices():
    with pytest.raises(UnknownModel) as caught:
        resolve_model("musicgen-xl")
    assert caught.value.option == "model"
    assert "musicgen-xl" in str(caught.value)
    assert "facebook/musicgen-melody" in str(caught.value)
