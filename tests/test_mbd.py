"""MultiBand Diffusion decoding: audiocraft's ``MultiBandDiffusion`` (tiny, random weights,
built from audiocraft's own classes) turns the tokens into audio, stereo as a mono batch;
from the engine, the command line and Discord."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mutagen.mp3 import MP3

from bot.cli import main
from generation.engine.debug_models import build_debug_model
from generation.engine.mbd import decode_tokens, load_mbd
from generation.engine.models import resolve_model
from generation.errors import InvalidOption
from generation.request import GenerationRequest, validate_request

from .bot_helpers import fields, mp3_of, outcome


@pytest.fixture(scope="module")
def stereo():
    model = build_debug_model("debug-stereo")
    model.set_generation_params(duration=1.0)
    return model


def test_stereo_tokens_decode_as_a_mono_batch_of_left_and_right(stereo):
    mbd = load_mbd(stereo, debug=True)
    _, tokens = stereo.generate(["x", "y"], return_tokens=True)
    assert tokens.shape[1] == 8  # interleaved left and right codebooks
    with pytest.raises(IndexError):  # audiocraft issues #401/#408: MBD takes 4 codebooks
        mbd.tokens_to_wav(tokens)
    torch.manual_seed(0)
    wav = decode_tokens(mbd, tokens, stereo.compression_model)
    assert wav.shape == (2, 2, 32_000)
    # The same as decoding the lefts then the rights as one mono batch, by hand.
    left, right = stereo.compression_model.get_left_right_codes(tokens)
    torch.manual_seed(0)
    by_hand = mbd.tokens_to_wav(torch.cat([left, right]))
    torch.testing.assert_close(wav[:, 0], by_hand[:2, 0])
    torch.testing.assert_close(wav[:, 1], by_hand[2:, 0])


@pytest.mark.parametrize("model", ["debug", "debug-stereo"])
def test_the_engine_decodes_with_mbd_when_asked_reproducibly(engine, model):
    request = GenerationRequest(prompt="x", model=model, duration=1.0, seed=3)
    encodec = engine.generate(request).audio
    mbd = engine.generate(GenerationRequest(**{**vars(request), "decoder": "mbd"})).audio
    again = engine.generate(GenerationRequest(**{**vars(request), "decoder": "mbd"})).audio
    assert mbd.shape == encodec.shape and np.isfinite(mbd).all()
    assert not np.allclose(mbd, encodec, atol=1e-3)
    np.testing.assert_array_equal(mbd, again)  # the seed fixes the diffusion's noise too
    np.testing.assert_array_equal(engine.generate(request).audio, encodec)


def test_an_unknown_decoder_is_refused():
    request = GenerationRequest(prompt="x", model="debug", decoder="wavenet")
    with pytest.raises(InvalidOption) as error:
        validate_request(request, resolve_model("debug"))
    assert (error.value.option, error.value.message) == ("decoder", "Use encodec or mbd.")


def test_the_command_line_decodes_with_mbd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--model", "debug", "--prompt", "x", "--duration", "1"]
    assert main([*args, "--decoder", "mbd", "--output", "take.mp3"]) == 0
    assert MP3(tmp_path / "take.mp3").tags["TXXX:musicgen_decoder"].text == ["mbd"]
    with pytest.raises(SystemExit):
        main([*args, "--decoder", "wavenet"])
    assert "--decoder: invalid choice: 'wavenet'" in capsys.readouterr().err


@pytest.mark.simcord(settle_timeout=60)
async def test_discord_generates_with_mbd_and_says_so(alice, channel):
    result = await alice.slash(
        channel, "music generate", prompt="x", duration=1.0, decoder="mbd", model="debug-stereo"
    )
    message = outcome(result)
    assert fields(message)["Decoder"] == "MultiBand Diffusion"
    assert (await mp3_of(message)).shape[0] == 2
