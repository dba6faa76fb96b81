"""HTSAT + c2l: checkpoint layout, meta-device loading, the tiny config, and the golden vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.models.mellow.htsat import (
    HTSATEncoder,
    relative_position_index,
    shifted_window_mask,
    window_merge,
    window_partition,
)

PREFIX = "audio_encoder.base."


def golden_state(golden_dir) -> dict[str, torch.Tensor]:
    """The golden encoder weights, prefix stripped, floats as float32 (integer buffers untouched)."""
    state = load_file(golden_dir / "mellow_v0_golden_audio_encoder.fp16.safetensors")
    return {
        k.removeprefix(PREFIX): (v.float() if v.is_floating_point() else v)
        for k, v in state.items()
        if k.startswith(PREFIX)
    }


def no_meta_tensors(module: torch.nn.Module) -> bool:
    return not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def golden_encoder(golden_dir) -> HTSATEncoder:
    """v0 built on meta and loaded the gpt-fast way, as the full model will be."""
    with torch.device("meta"):
        enc = HTSATEncoder(MellowConfig.v0())
    enc.load_state_dict(golden_state(golden_dir), strict=True, assign=True)
    return enc.eval()


@pytest.fixture(scope="module")
def golden_wav(golden) -> torch.Tensor:
    return torch.from_numpy(np.stack([golden["wav1"], golden["wav2"]])).float()


def test_state_dict_matches_manifest(golden_dir):
    manifest = json.loads((golden_dir / "mellow_v0_state_dict_manifest.json").read_text())
    expected = {k: (tuple(shape), dtype) for k, (shape, dtype) in manifest.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        enc = HTSATEncoder(MellowConfig.v0())
    ours = {PREFIX + k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in enc.state_dict().items()}
    assert sorted(set(ours) - set(expected)) == []  # no extras
    assert sorted(set(expected) - set(ours)) == []  # nothing missing
    assert {k: ours[k] for k in expected} == expected


def test_computed_buffers_equal_the_checkpoint(golden_dir):
    """The golden load replaces every buffer, so check separately that a fresh build computes the
    same STFT kernels, mel matrix, position indices and shift masks as the checkpoint holds."""
    state = golden_state(golden_dir)
    fresh = HTSATEncoder(MellowConfig.v0()).state_dict()
    for key, stored in state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            assert torch.equal(fresh[key], stored), key
        elif "extractor" in key:  # fp16-rounded in the golden file
            torch.testing.assert_close(fresh[key], stored, rtol=2**-11, atol=1e-7, msg=key)


def test_log_mel_matches_golden(golden_encoder, golden_wav, golden):
    with torch.inference_mode():
        got = golden_encoder.htsat.log_mel(golden_wav)
    diff = (got - torch.from_numpy(golden["logmel_audio1"])).abs().max().item()
    assert got.shape == (2, 1, 1001, 64) and diff < 1e-4


def test_embedding_matches_golden(golden_encoder, golden_wav, golden):
    with torch.inference_mode():
        got = golden_encoder(golden_wav)
    expected = torch.from_numpy(golden["embedding_audio1"])
    assert got.shape == expected.shape == (2, 1025, 768)
    assert (got - expected).abs().max().item() < 1e-4


def test_tiny_shape_and_batch_independence():
    """Eval mode: bn0 uses running statistics, so a clip's embedding does not depend on its batch."""
    cfg = MellowConfig.tiny()
    torch.manual_seed(0)
    enc = HTSATEncoder(cfg).eval()
    wav = 0.1 * torch.randn(2, cfg.clip_samples)
    with torch.inference_mode():
        both = enc(wav)
        second = enc(wav[1:])
    assert both.shape == (2, 1 + cfg.spec_size * cfg.freq_ratio, cfg.audio_dim) == (2, 1025, 64)
    assert torch.isfinite(both).all()
    torch.testing.assert_close(second[0], both[1], rtol=1e-4, atol=1e-5)
    # each token-level frame embedding covers spec_size * freq_ratio / time tokens resized frames
    frames = both[:, 1:].unflatten(1, (32, 32))
    assert torch.equal(frames, frames[:, :, :1].expand_as(frames))


def test_tiny_meta_build_and_assign_load():
    cfg = MellowConfig.tiny()
    torch.manual_seed(0)
    source = HTSATEncoder(cfg).eval()
    with torch.device("meta"):
        enc = HTSATEncoder(cfg)
    enc.load_state_dict(source.state_dict(), strict=True, assign=True)
    enc.eval()
    assert no_meta_tensors(enc)
    wav = 0.1 * torch.randn(1, cfg.clip_samples)
    with torch.inference_mode():
        assert torch.equal(enc(wav), source(wav))


def test_rejects_wrong_length():
    enc = HTSATEncoder(MellowConfig.tiny())
    with pytest.raises(ValueError, match="320000"):
        enc(torch.zeros(1, 16000))


def test_window_partition_round_trip():
    x = torch.randn(2, 16, 16, 3)
    windows = window_partition(x, 8)
    assert windows.shape == (2, 4, 64, 3)
    assert torch.equal(windows[:, 1].view(2, 8, 8, 3), x[:, :8, 8:])  # row-major window order
    assert torch.equal(window_merge(windows, 16, 16, 8), x)


def test_relative_position_index():
    index = relative_position_index(8)
    assert index.shape == (64, 64) and index.dtype == torch.int64
    assert (index.diagonal() == 7 * 15 + 7).all()  # zero offset: the table's centre row
    assert index.min() == 0 and index.max() == 15**2 - 1


def test_shifted_window_mask_only_blocks_tokens_from_other_regions():
    mask = shifted_window_mask(16, 8, 4)
    assert mask.shape == (4, 64, 64) and set(mask.unique().tolist()) == {-100.0, 0.0}
    assert (mask[0] == 0).all()  # the top-left window holds one region
    # bottom-right window: 4 regions of 16 tokens each, each attending to itself only
    assert ((mask[3] == 0).sum(dim=1) == 16).all()
