"""Samsone's published layout: reading it, writing it back byte for byte, and one line for a file
of another family or a damaged one; the golden checkpoint and a 356M-shaped one built by rule."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch

from mellow_cli.errors import ModelError
from mellow_cli.models.samsone.checkpoint import export, read_published, sniff
from mellow_cli.models.samsone.clip import fit_clip
from mellow_cli.models.samsone.config import SamsoneConfig
from mellow_cli.models.samsone.network import Samsone, load_weights

TINY = SamsoneConfig.preset("tiny")
TIED = ("audio_lm.text_model.model.model.embed_tokens.weight", "audio_lm.text_model.model.lm_head.weight",
        "audio_lm.text_model.embedding_layer.weight")


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.to(torch.bfloat16) for k, v in Samsone.from_config(TINY).state_dict().items()}


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_file_after_a_round_trip(path, cfg, tmp_path) -> dict:
    """read_published then export, saved under the same name: the same bytes as the original."""
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / path.name
    torch.save(export(read_published(load(path)), cfg), again)
    assert filecmp.cmp(path, again, shallow=False)
    return load(again)["state_dict"]


def test_export_then_read_gives_the_state_back(tiny_state, tmp_path):
    published = export(tiny_state, TINY)
    assert list(published) == ["state_dict"]
    keys = list(published["state_dict"])
    assert all(k.startswith("audio_lm.") for k in keys) and keys[0] == "audio_lm.sep_token" and keys[-1] == TIED[2]
    assert len(keys) == len(tiny_state) + 1  # the table's third name
    path = tmp_path / "samsone_tiny_model_bf16.ckpt"
    torch.save(published, path)
    state = read_published(load(path))
    assert list(state) == list(tiny_state)
    assert all(torch.equal(state[k], tiny_state[k]) and state[k].dtype == torch.bfloat16 for k in state)
    stored = assert_same_file_after_a_round_trip(path, TINY, tmp_path)
    assert len({stored[k].untyped_storage().data_ptr() for k in TIED}) == 1  # one tensor, three names


def test_export_fills_the_head_from_a_table_saved_once(tiny_state):
    state = {k: v for k, v in tiny_state.items() if k != "text_model.model.lm_head.weight"}
    published = export(state, TINY)["state_dict"]
    assert all(published[k] is published[TIED[0]] for k in TIED)


def test_export_refuses_a_state_of_another_size(tiny_state):
    with pytest.raises(ModelError, match="missing"):
        export(tiny_state, SamsoneConfig.preset("samsone-134m"))


def test_the_last_of_the_three_names_wins(tiny_state):
    published = export(tiny_state, TINY)["state_dict"]
    published[TIED[2]] = published[TIED[2]] + 1  # the authors' load copies embedding_layer last
    state = read_published({"state_dict": published})
    assert torch.equal(state["text_model.model.model.embed_tokens.weight"], published[TIED[2]])
    assert state["text_model.model.lm_head.weight"] is state["text_model.model.model.embed_tokens.weight"]


def foreign_objects(tiny_state):
    t = torch.zeros(2)
    published = export(tiny_state, TINY)["state_dict"]
    return {
        "a Mellow checkpoint": {"caption_decoder.lm.model.norm.weight": t, "audio_encoder.base.htsat.x": t},
        "TinyMU's layout": {"model": {"audio_encoder.enc.x": t}, "config": {}, "epoch": 3},
        "not under 'audio_lm.'": {"state_dict": {"model.sep_token": t}},
        "is empty": {"state_dict": {}},
        "a list": [t, t],
        "keys 'weight'": {"weight": t},
        "damaged .* holds a str": {"state_dict": {**published, "audio_lm.sep_token": "oops"}},
        "damaged .* no audio_lm.text_model.embedding_layer.weight":
            {"state_dict": {k: v for k, v in published.items() if k != TIED[2]}},
    }


@pytest.mark.parametrize("what", ["a Mellow checkpoint", "TinyMU's layout", "not under 'audio_lm.'", "is empty",
                                  "a list", "keys 'weight'", "damaged .* holds a str",
                                  "damaged .* no audio_lm.text_model.embedding_layer.weight"])
def test_another_family_or_a_damaged_file_gets_one_line(tiny_state, what):
    obj = foreign_objects(tiny_state)[what]
    with pytest.raises(ModelError, match=what) as error:
        read_published(obj)
    assert "\n" not in str(error.value)
    assert sniff(obj) is None or what.startswith("damaged")


def test_sniff_names_ours(tiny_state):
    assert sniff(export(tiny_state, TINY)) == "a Samsone checkpoint"
    assert sniff({"state_dict": {"audio_lm.x": 1, "other": 2}}) is None


@pytest.mark.slow
def test_golden_checkpoint_round_trips_byte_for_byte(samsone_golden_checkpoint, samsone_golden_dir, tmp_path):
    manifest = json.loads((samsone_golden_dir / "manifest-134m.json").read_text())
    stored = assert_same_file_after_a_round_trip(samsone_golden_checkpoint, SamsoneConfig.preset("samsone-134m"), tmp_path)
    assert {k: [list(t.shape), "float16"] for k, t in stored.items()} == {k: [s, "float16"] for k, (s, _) in manifest.items()}
    assert list(stored) == list(manifest)
    assert all(t.dtype == torch.float16 for t in stored.values())  # the golden file's dtype, kept


def by_rule(manifest: dict, dtype: torch.dtype) -> dict:
    """Random weights at a manifest's shapes (seeded; norms near 1, the tied table once)."""
    generator = torch.Generator().manual_seed(0)
    sd, table = {}, None
    for key, (shape, _) in manifest.items():
        if key in TIED:
            table = table if table is not None else (0.02 * torch.randn(shape, generator=generator)).to(dtype)
            sd[key] = table
        elif len(shape) == 1 and key.endswith("norm.weight"):
            sd[key] = (1 + 0.05 * torch.randn(shape, generator=generator)).to(dtype)
        else:
            sd[key] = (0.02 * torch.randn(shape, generator=generator)).to(dtype)
    return {"state_dict": sd}


@pytest.mark.slow
@torch.inference_mode()
def test_a_356m_checkpoint_built_by_rule_loads_strictly_and_answers(samsone_golden_dir, tmp_path):
    cfg = SamsoneConfig.preset("samsone-356m")
    manifest = json.loads((samsone_golden_dir / "manifest-356m.json").read_text())
    path = tmp_path / "samsone_356m_model_bf16.ckpt"
    torch.save(by_rule(manifest, torch.bfloat16), path)
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model = load_weights(Samsone.from_config(cfg, "meta"), read_published(obj))
    assert model.lm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    wave = torch.from_numpy(fit_clip(torch.randn(2, 5 * cfg.sample_rate).numpy(), cfg))
    tokens = model.encode_clips([wave, wave])
    row = model.prefix_row(tokens, [1, 2, 3])
    assert tokens[0].shape == (50, 960) and torch.equal(tokens[0], tokens[1])
    assert row.embeds.shape == (50 * 2 + 3 + 3, 960) and row.next_position == 106
    logits = model.lm(inputs_embeds=row.embeds[None], logits_to_keep=1).logits
    assert logits.shape == (1, 1, 34111) and torch.isfinite(logits).all()
