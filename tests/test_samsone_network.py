"""The Samsone network at toy widths and on the meta device: the published key layout of every
preset, the prefix layout, batch independence, pooling, loading; the encoder against
transformers' WhisperEncoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mellow_cli.errors import ModelError, UsageError
from mellow_cli.models.family import config_dict, config_from_dict
from mellow_cli.models.samsone.checkpoint import export, read_published
from mellow_cli.models.samsone.clip import fit_clip
from mellow_cli.models.samsone.config import SamsoneConfig
from mellow_cli.models.samsone.network import Samsone, load_weights
from mellow_cli.models.samsone.whisper import WhisperEncoder, sinusoids

TINY = SamsoneConfig.preset("tiny")


@pytest.fixture(scope="module")
def tiny() -> Samsone:
    torch.manual_seed(0)
    return Samsone.from_config(TINY)


def clip(seed: int, seconds: float = 3.0, channels: int = 1) -> torch.Tensor:
    wave = 0.1 * np.random.default_rng(seed).standard_normal((channels, int(seconds * TINY.sample_rate)))
    return torch.from_numpy(fit_clip(wave.astype(np.float32), TINY))


@pytest.mark.parametrize("name,keys,params", [("samsone-99m", 256, 99_213_504),
                                              ("samsone-134m", 346, 134_614_464),
                                              ("samsone-356m", 364, 356_883_264)])
def test_presets_have_the_published_layout(samsone_golden_dir, name, keys, params):
    """Each preset, exported, has the published file's keys in its order and shapes (the
    manifests list what the authors' own `_build_model` holds), and its parameter count."""
    manifest = json.loads((samsone_golden_dir / f"manifest-{name.removeprefix('samsone-')}.json").read_text())
    cfg = SamsoneConfig.preset(name)
    model = Samsone.from_config(cfg, "meta")
    published = export(model.state_dict(), cfg)["state_dict"]
    assert len(manifest) == keys
    assert list(published) == list(manifest)
    assert {k: list(t.shape) for k, t in published.items()} == {k: shape for k, (shape, _) in manifest.items()}
    assert sum(p.numel() for p in model.parameters()) == params  # the tied head counted once


def test_config_round_trips_and_says_its_family():
    for name in ("samsone-99m", "samsone-134m", "samsone-356m", "tiny"):
        cfg = SamsoneConfig.preset(name)
        assert SamsoneConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg
        assert config_dict(cfg)["family"] == "samsone" and cfg.name == name
        assert config_from_dict(config_dict(cfg)) == cfg
    big = SamsoneConfig.preset("samsone-356m")
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads,
            big.intermediate_size, big.rope_theta) == (960, 32, 15, 5, 2560, 100000.0)
    assert SamsoneConfig.preset("samsone-99m").num_hidden_layers == 20
    assert (TINY.clip_samples, TINY.audio_frames, TINY.audio_positions) == (480000, 3000, 1500)
    with pytest.raises(KeyError):
        SamsoneConfig.preset("samsone-1b")


def test_prefix_layout_for_two_clips(tiny):
    ids = [5, 17, 42]
    with torch.inference_mode():
        a, b = tiny.encode_clips([clip(1), clip(2)])
        row = tiny.prefix_row([a, b], ids)
        sep = tiny.sep_token
        n = TINY.audio_tokens
        assert a.shape == (n, TINY.hidden_size)
        assert row.embeds.shape == (2 * n + 3 + len(ids), TINY.hidden_size)
        for at in (0, n + 1, 2 * n + 2):
            assert torch.equal(row.embeds[at], sep)
        assert torch.equal(row.embeds[1 : n + 1], a) and torch.equal(row.embeds[n + 2 : 2 * n + 2], b)
        assert torch.equal(row.embeds[2 * n + 3 :], tiny.lm.model.embed_tokens.weight[ids])
    assert row.query is None and row.query_position is None
    assert row.next_position == row.embeds.shape[0]


def test_one_clip_prefix_is_52_positions_and_the_prompt(tiny):
    with torch.inference_mode():
        row = tiny.prefix_row(tiny.encode_clips([clip(1)]), [7])
    assert row.embeds.shape[0] == TINY.audio_tokens + 2 + 1 == row.next_position


def test_prefix_needs_a_clip(tiny):
    with pytest.raises(UsageError, match="one or more clips"):
        tiny.prefix_row([], [1])


def test_a_clips_tokens_never_depend_on_the_other_clips(tiny):
    a, b, c = clip(1), clip(2, seconds=40, channels=2), clip(3, seconds=0.5)
    with torch.inference_mode():
        alone = tiny.encode_clips([a])[0]
        first, *_ = tiny.encode_clips([a, b, c])
        *_, last = tiny.encode_clips([c, b, a])
    assert torch.equal(alone, first) and torch.equal(alone, last)


def test_pool_is_the_mean_of_each_30_frames(tiny):
    frames = torch.randn(2, TINY.audio_positions, 8)
    expected = F.avg_pool1d(frames.transpose(1, 2), 30).transpose(1, 2)
    pooled = tiny.pool(frames)
    assert pooled.shape == (2, 50, 8)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_meta_build_then_load_reproduces_the_model(tiny):
    published = export(tiny.state_dict(), TINY)
    loaded = load_weights(Samsone.from_config(TINY, "meta"), read_published(published))
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.lm.lm_head.weight is loaded.lm.model.embed_tokens.weight
    with torch.inference_mode():
        a = tiny.prefix_row(tiny.encode_clips([clip(4)]), [3, 4]).embeds
        b = loaded.prefix_row(loaded.encode_clips([clip(4)]), [3, 4]).embeds
        assert torch.equal(a, b)
        assert torch.equal(tiny.lm(inputs_embeds=a[None]).logits, loaded.lm(inputs_embeds=b[None]).logits)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_as_stored_or_converted(tiny, stored):
    state = {k: v.to(stored) for k, v in tiny.state_dict().items()}
    as_stored = load_weights(Samsone.from_config(TINY, "meta"), state)
    assert {p.dtype for p in as_stored.parameters()} == {stored}
    with torch.inference_mode():
        tokens = as_stored.encode_clips([clip(5)])[0]
        assert tokens.dtype == stored
        assert as_stored.prefix_row([tokens], [1]).embeds.dtype == stored
    converted = load_weights(Samsone.from_config(TINY, "meta"), state, dtype=torch.float32)
    assert {p.dtype for p in converted.parameters()} == {torch.float32}
    assert torch.equal(converted.sep_token, state["sep_token"].float())


def test_wrong_keys_are_named(tiny):
    state = dict(tiny.state_dict())
    del state["projector.linear2.weight"]
    state["projector.extra"] = torch.zeros(1)
    with pytest.raises(ModelError, match=r"projector\.linear2\.weight.*projector\.extra"):
        load_weights(Samsone.from_config(TINY, "meta"), state)


def test_a_fresh_encoder_holds_whispers_sinusoids():
    from transformers.models.whisper.modeling_whisper import sinusoids as reference

    encoder = WhisperEncoder(SamsoneConfig())
    assert torch.equal(encoder.embed_positions.weight, reference(1500, 384))
    assert torch.equal(encoder.embed_positions.weight, sinusoids(1500, 384))
    assert not encoder.embed_positions.weight.requires_grad


@torch.inference_mode()
def test_encoder_matches_transformers_whisper_encoder():
    """Same random weights at Whisper-tiny's sizes: our encoder is transformers' WhisperEncoder
    (which Samsone's reference runs) to float32 rounding."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as Reference

    cfg = SamsoneConfig()
    torch.manual_seed(0)
    ours = WhisperEncoder(cfg).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.05) if p.dim() > 1 else p.data.uniform_(0.9, 1.1)
    config = WhisperConfig(d_model=cfg.audio_dim, encoder_layers=cfg.audio_layers, num_mel_bins=cfg.n_mels,
                           encoder_attention_heads=cfg.audio_heads, encoder_ffn_dim=cfg.audio_ffn,
                           max_source_positions=cfg.audio_positions)
    reference = Reference(config).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    features = torch.randn(2, cfg.n_mels, cfg.audio_frames)
    expected = reference(features).last_hidden_state
    got = ours(features)
    assert got.shape == (2, 1500, 384)
    assert (got - expected).abs().max() < 1e-5
