"""TinyMU's published checkpoint layout: reading it into our names, writing ours back, and the one
line a file of another family, the encoder-only file or a damaged file gets."""

from __future__ import annotations

import pytest
import torch

from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.store.conversion import read_checkpoint
from mellow_cli.errors import ModelError
from mellow_cli.models.mellow.network import Mellow
from mellow_cli.models.tinymu.checkpoint import ALIAS, EMBED, HEAD, export, read_published, sniff
from mellow_cli.models.tinymu.config import TinyMUConfig
from mellow_cli.models.tinymu.network import TinyMU, load_weights

TINY = TinyMUConfig.tiny()


@pytest.fixture(scope="module")
def tiny() -> TinyMU:
    torch.manual_seed(0)
    return TinyMU.from_config(TINY)


@pytest.fixture(scope="module")
def published(tiny, tmp_path_factory):
    """The tiny model saved as the authors save theirs, extra entries included."""
    path = tmp_path_factory.mktemp("tinymu") / "tinymu.pt"
    obj = export(tiny.state_dict(), TINY)
    torch.save({**obj, "optimizer": {"state": {}, "param_groups": []}, "config": {"model": {}}, "epoch": 3}, path)
    return path


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def test_export_is_the_published_layout(tiny):
    model = export(tiny.state_dict(), TINY)["model"]
    assert list(model) == [*tiny.state_dict(), ALIAS]  # the authors' order: the alias last
    assert model[EMBED] is model[HEAD] is model[ALIAS]
    assert all(t.dtype == torch.float32 for t in model.values())


def test_round_trip_through_a_file_is_identical(tiny, published):
    obj = load(published)
    assert sniff(obj) == "a TinyMU checkpoint"
    # torch.save keeps one tensor for the three tied keys
    ptrs = {obj["model"][k].untyped_storage().data_ptr() for k in (EMBED, HEAD, ALIAS)}
    assert len(ptrs) == 1
    state = read_published(obj)
    ours = tiny.state_dict()
    assert list(state) == list(ours)
    assert all(torch.equal(state[k], ours[k]) for k in ours)
    again = export(state, TINY)["model"]
    assert list(again) == list(obj["model"])
    assert all(again[k].shape == v.shape and again[k].dtype == v.dtype for k, v in obj["model"].items())


@torch.inference_mode()
def test_a_loaded_file_answers_as_the_model_it_came_from(tiny, published):
    loaded = load_weights(TinyMU.from_config(TINY, "meta"), read_published(load(published)))
    assert loaded.lm.lm_head.weight is loaded.lm.model.embed_tokens.weight
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    wave = 0.1 * torch.randn(50000)
    (a,), (b,) = tiny.encode_clips([wave]), loaded.encode_clips([wave])
    assert torch.equal(a, b)
    ra, rb = tiny.prefix_row([a], [1, 2]), loaded.prefix_row([b], [1, 2])
    assert torch.equal(tiny.lm(inputs_embeds=ra.embeds[None]).logits, loaded.lm(inputs_embeds=rb.embeds[None]).logits)


def test_the_embedding_alias_is_the_value_in_use(tiny):
    """The authors' strict load copies the three tied keys in order into one table: the last
    (`embed_fn`) wins."""
    model = {k: v.clone() for k, v in export(tiny.state_dict(), TINY)["model"].items()}
    model[ALIAS] += 1.0
    state = read_published({"model": model})
    assert torch.equal(state[EMBED], model[ALIAS]) and state[HEAD] is state[EMBED]


def test_a_bare_state_dict_reads_too(tiny):
    model = export(tiny.state_dict(), TINY)["model"]
    assert list(read_published(model)) == list(tiny.state_dict())


def test_a_mellow_checkpoint_is_named():
    mellow = Mellow.from_config(MellowConfig.tiny(), "meta").state_dict()
    assert sniff(mellow) is None
    with pytest.raises(ModelError, match=r"^v0\.ckpt: a Mellow checkpoint, not TinyMU$"):
        read_published({f"module.{k}": v for k, v in mellow.items()}, source="v0.ckpt")


def test_a_samsone_checkpoint_is_named():
    obj = {"state_dict": {"audio_lm.encoder.conv1.weight": torch.zeros(2), "audio_lm.lm.lm_head.weight": torch.zeros(2)}}
    assert sniff(obj) is None
    with pytest.raises(ModelError, match=r"^s\.ckpt: a Samsone checkpoint, not TinyMU$"):
        read_published(obj, source="s.ckpt")


def test_the_encoder_alone_is_named(tiny):
    """matpac_plus_as_48_1_map_enconly.pt: a bare state dict of MATPAC++ alone."""
    encoder = {k.removeprefix("audio_encoder.enc."): v for k, v in tiny.state_dict().items()
               if k.startswith("audio_encoder.enc.")}
    assert "matpac_plus_as_48_1_map_enconly.pt" in sniff(encoder)
    with pytest.raises(ModelError, match=r"^m\.pt: the MATPAC\+\+ encoder alone \(matpac_plus_as_48_1_map_enconly\.pt\), "
                                         r"not the whole TinyMU model \(tinymu\.pt\)$"):
        read_published(encoder, source="m.pt")


@pytest.mark.parametrize("obj, said", [
    ([1, 2], "it holds a list"),
    ({"epoch": 3}, "this holds 'epoch'"),
    ({"model": {"text_decoder.lm.model.norm.weight": torch.zeros(2)}}, "incomplete TinyMU checkpoint: no audio encoder"),
    ({"model": {"audio_encoder.enc.cls_token": torch.zeros(2), "text_decoder.lm.x": "text"}}, "damaged TinyMU checkpoint"),
])
def test_anything_else_gets_one_line(obj, said):
    with pytest.raises(ModelError, match=said) as e:
        read_published(obj, source="x.pt")
    assert str(e.value).startswith("x.pt: ") and "\n" not in str(e.value)


def test_missing_keys_are_named_when_loading(tiny):
    state = read_published(export(tiny.state_dict(), TINY))
    del state["projector.linear2.bias"]
    with pytest.raises(ModelError, match=r"TinyMU tiny: 1 missing: projector\.linear2\.bias"):
        load_weights(TinyMU.from_config(TINY, "meta"), state)
    with pytest.raises(ModelError, match=r"cannot export as TinyMU tiny: 1 missing: projector\.linear2\.bias"):
        export(state, TINY)


def test_a_truncated_file_gets_one_line_naming_it(published, tmp_path):
    """The safe reader the project loads checkpoints with stops a cut file before we see it."""
    cut = tmp_path / "tinymu.pt"
    cut.write_bytes(published.read_bytes()[: published.stat().st_size // 2])
    with pytest.raises(ModelError, match=rf"^{cut}: not a readable PyTorch checkpoint") as e:
        read_published(read_checkpoint(cut, label=str(cut)), source=str(cut))
    assert "\n" not in str(e.value)
    # the whole file passes the same reader
    assert list(read_published(read_checkpoint(published, label=str(published)))) == list(TinyMU.from_config(TINY, "meta").state_dict())
