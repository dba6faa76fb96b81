"""The TinyMU network: the published layout, the tiny preset's wiring, the clip rule and the
prefix row (fast: tiny random weights, or a meta-device build)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import decode_row

from mellow_cli.errors import UsageError
from mellow_cli.models.family import config_dict, config_from_dict
from mellow_cli.models.tinymu.clip import fit_clip
from mellow_cli.models.tinymu.config import TinyMUConfig
from mellow_cli.models.tinymu.network import TinyMU

TINYMU = TinyMUConfig.tinymu()
TINY = TinyMUConfig.tiny()


@pytest.fixture(scope="module")
def tiny() -> TinyMU:
    torch.manual_seed(0)
    return TinyMU.from_config(TINY)


def clips(*seconds: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(int(s * TINY.sample_rate), generator=g) for s in seconds]


# --- the published layout ------------------------------------------------------------------------


def test_state_dict_is_the_published_one_without_the_embedding_alias(tinymu_golden_dir):
    manifest = json.loads((tinymu_golden_dir / "manifest.json").read_text())
    ours = {k: [list(t.shape), str(t.dtype).removeprefix("torch.")]
            for k, t in TinyMU.from_config(TINYMU, "meta").state_dict().items()}
    assert len(manifest) == 430
    assert list(ours) == [k for k in manifest if k != "text_decoder.embed_fn.weight"]  # same order
    assert ours == {k: v for k, v in manifest.items() if k != "text_decoder.embed_fn.weight"}


def test_parameter_budget():
    model = TinyMU.from_config(TINYMU, "meta")
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert count("audio_encoder.") == 85_492_992  # pos_embed included, as in the published count
    assert count("projector.") == 9_046_592
    assert count("text_decoder.") == 134_515_008
    assert sum(p.numel() for p in model.parameters()) == 229_054_592


def test_config_round_trips_and_names_its_family():
    d = config_dict(TINY)  # what config.json holds
    assert d["family"] == "tinymu" and d["name"] == "tiny"
    assert TinyMUConfig.from_dict({**d, "unknown_key": 1}) == TINY
    assert config_from_dict(d) == TINY
    assert TinyMUConfig.preset("tinymu") == TINYMU
    with pytest.raises(KeyError, match="unknown TinyMU preset"):
        TinyMUConfig.preset("v0")


# --- audio in ------------------------------------------------------------------------------------


def test_fit_clip_takes_the_first_channel_and_ten_seconds_without_padding():
    sr = TINY.sample_rate
    stereo = np.stack([np.full(12 * sr, 0.5), np.full(12 * sr, -0.5)]).astype(np.float32)
    clip = fit_clip(stereo, TINY)
    assert clip.dtype == torch.float32 and clip.shape == (10 * sr,) and bool((clip == 0.5).all())
    assert fit_clip(stereo[:, : 7 * sr], TINY).shape == (7 * sr,)  # not padded to 10 s
    # The authors turn a file under 1600 frames into 10 s of silence; here the sound is kept.
    short = np.linspace(-1, 1, 1000, dtype=np.float32)[None]
    assert torch.equal(fit_clip(short, TINY), torch.from_numpy(short[0]))
    assert torch.equal(fit_clip(short[0], TINY), torch.from_numpy(short[0]))  # mono as 1-D
    with pytest.raises(ValueError):
        fit_clip(np.zeros((1, 0), dtype=np.float32), TINY)


@torch.inference_mode()
def test_encode_clips_gives_six_and_a_quarter_tokens_a_second(tiny):
    out = tiny.encode_clips(clips(10, 7, 0.01, 62.0))
    assert [tuple(t.shape) for t in out] == [(63, 64), (44, 64), (1, 64), (388, 64)]
    assert [TINY.audio_tokens(n) for n in (160000, 112000, 160, 992000)] == [63, 44, 1, 388]


@torch.inference_mode()
def test_a_clip_encodes_the_same_alone_and_beside_others(tiny):
    a, b, c = clips(10, 7, 3.3)
    together = tiny.encode_clips([a, b, c])
    assert torch.equal(together[1], tiny.encode_clips([b])[0])
    assert torch.equal(together[0], tiny.encode_clips([a, a])[1])
    assert torch.equal(together[2], tiny.encode_clips([c, a, b])[0])


@torch.inference_mode()
def test_chunks_are_encoded_as_separate_sequences(tiny):
    """A token depends on its own 992-frame chunk only: changing the audio of the second chunk
    leaves the first chunk's 62 tokens as they were."""
    (a,) = clips(10)
    b = a.clone()
    b[-1000:] = 0.0  # frames 992 .. 997 only: the second chunk
    ta, tb = tiny.encode_clips([a, b])
    assert torch.equal(ta[:62], tb[:62]) and not torch.equal(ta[62:], tb[62:])


# --- the prefix row ------------------------------------------------------------------------------


@torch.inference_mode()
def test_prefix_row_layout(tiny):
    (audio,) = tiny.encode_clips(clips(7))
    table = tiny.lm.model.embed_tokens.weight
    row = tiny.prefix_row([audio], [5, 6, 7])
    n = audio.shape[0]
    assert row.embeds.shape == (n + 4, TINY.hidden_size)
    assert torch.equal(row.embeds[:n], audio)
    assert torch.equal(row.embeds[n], table[TINY.sep_token_id])
    assert torch.equal(row.embeds[n + 1 :], table[[5, 6, 7]])
    assert torch.equal(row.query, table[TINY.pad_token_id])
    assert (row.query_position, row.next_position) == (n + 129, n + 130)

    full = tiny.prefix_row([audio], list(range(100, 229)))
    assert full.embeds.shape[0] == n + 130 and full.query is None and full.next_position == n + 130


def test_prefix_row_refuses_two_clips_and_a_long_prompt(tiny):
    audio = torch.zeros(4, TINY.hidden_size)
    with pytest.raises(UsageError, match="one clip"):
        tiny.prefix_row([audio, audio], [1])
    with pytest.raises(ValueError, match="129"):
        tiny.prefix_row([audio], [1] * 130)


@pytest.mark.parametrize("prompt_len", [0, 3, 128, 129])
def test_prefix_row_is_the_authors_padded_sequence(tiny, prompt_len):
    """transformers' Llama over the authors' sequence (prompt `!`-padded to 129, pads masked,
    positions 0 .. L-1) predicts, at its last slot, what our row predicts from its query."""
    from mellow_cli.runtime.llama import transformers_twin

    torch.manual_seed(prompt_len)
    with torch.inference_mode():
        (audio,) = tiny.encode_clips(clips(2, seed=prompt_len))
        ids = torch.randint(20, TINY.vocab_size, (prompt_len,)).tolist()
        padded = torch.tensor([TINY.sep_token_id, *ids] + [TINY.pad_token_id] * (129 - prompt_len))
        embeds = torch.cat([audio, tiny.lm.embed(padded)])[None]
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
        mask[0, audio.shape[0] + 1 + prompt_len :] = 0
        theirs = transformers_twin(tiny.lm)(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
        ours, _ = decode_row(tiny.lm, tiny.prefix_row([audio], ids), steps=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
