"""The int8 copy kept beside a cached model's weights (mellow_cli/int8_copy.py)."""

import json
import os
import shutil

import pytest
import torch

from mellow_cli.runtime import matrices, precision
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.errors import ModelError
from mellow_cli.runtime.int8_copy import FILE, Int8Copy


@pytest.fixture
def cached_ckpt(tmp_path, smollm2_dir):
    """A tiny Mellow as a local .ckpt with its config and tokenizer beside it: loading converts it
    into a folder of the cache, where the int8 copy may be kept."""
    from mellow_cli.models.mellow.network import Mellow

    torch.manual_seed(0)
    cfg = MellowConfig.tiny()
    net = Mellow.from_config(cfg, device="cpu")
    ckpt = tmp_path / "mine.ckpt"
    torch.save({f"module.{k}": v.clone() for k, v in net.state_dict().items()}, ckpt)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_dir / f, tmp_path / f)
    return ckpt


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.net.lm(input_ids=torch.tensor([[1, 2, 3, 17, 5]])).logits


def _no_rounding(monkeypatch):
    def refuse(self, weight):
        raise AssertionError("rounded a matrix again")

    monkeypatch.setattr(matrices.Int8Matrix, "__init__", refuse)


def test_the_first_int8_load_keeps_a_copy_and_the_next_reads_it(cached_ckpt, monkeypatch):
    from mellow_cli.api import load_model

    first = load_model(str(cached_ckpt), device="cpu", dtype="int8", progress=False)
    copies = list(_cache_models().glob(f"*/{FILE}"))
    assert len(copies) == 1
    _no_rounding(monkeypatch)
    second = load_model(str(cached_ckpt), device="cpu", dtype="int8", progress=False)
    assert torch.equal(_logits(second), _logits(first))
    for a, b in zip(first.net.lm.matrices(), second.net.lm.matrices()):
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)


def _cache_models():
    from mellow_cli.files import cache_dir

    return cache_dir() / "models"


def test_other_precisions_and_folders_outside_the_cache_keep_no_copy(cached_ckpt, tiny_model_dir):
    from mellow_cli.api import load_model

    load_model(str(cached_ckpt), device="cpu", dtype="float16", progress=False)
    assert not list(_cache_models().glob(f"*/{FILE}"))
    load_model(str(tiny_model_dir), device="cpu", dtype="int8", progress=False)  # a folder of the user's
    assert not (tiny_model_dir / FILE).exists() and not list(_cache_models().glob(f"*/{FILE}"))


def _prepared(copy: Int8Copy):
    """A tiny language model prepared in int8 through `copy`, and its logits."""
    from mellow_cli.runtime.fused import random_state
    from mellow_cli.runtime.llama import LlamaForCausalLM

    cfg = MellowConfig.tiny()
    lm = LlamaForCausalLM(cfg)
    lm.load_state_dict(random_state(cfg, torch.Generator().manual_seed(0)))
    precision.apply(lm.eval(), precision.named("int8", torch.device("cpu")), fused=False, int8_copy=copy)
    with torch.inference_mode():
        return lm, lm(input_ids=torch.tensor([[4, 5, 6]])).logits


def test_a_copy_of_other_weights_is_made_again(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights, as far as the copy can tell")
    copy = Int8Copy(tmp_path / FILE, weights)
    _, made = _prepared(copy)
    assert copy.read() is not None
    os.utime(weights, ns=(1, 1))  # the weights changed since
    assert copy.read() is None
    _, again = _prepared(copy)
    assert copy.read() is not None and torch.equal(made, again)
    _no_rounding(monkeypatch)
    _, read = _prepared(copy)
    assert torch.equal(read, made)


def test_a_file_that_is_not_ours_is_left_alone(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    theirs = tmp_path / FILE
    save_file({"x": torch.ones(2)}, str(theirs), metadata={"made by": "someone else"})
    before = theirs.read_bytes()
    copy = Int8Copy(theirs, weights)
    _prepared(copy)  # rounds in memory, writes nothing
    assert theirs.read_bytes() == before and not copy.ours()


def test_a_damaged_or_misfitting_copy_is_one_line_naming_it(tmp_path):
    from mellow_cli.runtime.llama import LlamaForCausalLM

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    copy = Int8Copy(tmp_path / FILE, weights)
    _prepared(copy)
    cfg = MellowConfig.tiny()
    wider = LlamaForCausalLM(MellowConfig.from_dict({**cfg.to_dict(), "intermediate_size": cfg.intermediate_size * 2}))
    with pytest.raises(ModelError, match=f"{FILE}: this int8 copy does not fit"):
        precision.apply(wider.eval(), precision.named("int8", torch.device("cpu")), fused=False, int8_copy=copy)
    (tmp_path / FILE).write_bytes((tmp_path / FILE).read_bytes()[:200])
    with pytest.raises(ModelError, match=f"{FILE}: not a readable int8 copy"):
        copy.read()


def test_a_cache_that_cannot_take_the_copy_still_loads(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    copy = Int8Copy(tmp_path / "no-such-folder" / FILE, weights)
    _, logits = _prepared(copy)
    assert torch.isfinite(logits).all() and not (tmp_path / "no-such-folder").exists()


def test_a_partial_copy_left_by_a_killed_writer_goes_and_one_under_way_stays(tmp_path):
    import subprocess
    import sys

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".{FILE}.tmp-{int(gone.stdout)}"  # its writer has exited
    alive = tmp_path / f".{FILE}.tmp-{os.getppid()}"  # a running process's, maybe under way
    for f in (left, alive):
        f.write_bytes(b"part of a copy")
    _prepared(Int8Copy(tmp_path / FILE, weights))
    assert not left.exists() and alive.exists() and (tmp_path / FILE).exists()


def _tampered(tensors: dict, how: str) -> dict:
    last = len(tensors) // 2 - 1
    if how == "a short scale table":
        tensors["0.scale"] = tensors["0.scale"][:-1].clone()
    elif how == "a one-entry scale table":  # would broadcast over every row
        tensors["3.scale"] = tensors["3.scale"][:1].clone()
    elif how == "float16 scales":
        tensors["1.scale"] = tensors["1.scale"].half()
    elif how == "unsigned weights":
        tensors["2.q"] = tensors["2.q"].view(torch.uint8)
    elif how == "a matrix more":
        tensors[f"{last + 1}.q"], tensors[f"{last + 1}.scale"] = tensors["0.q"].clone(), tensors["0.scale"].clone()
    elif how == "a stray tensor":
        tensors["extra"] = torch.zeros(1)
    elif how == "a scale table missing":
        del tensors[f"{last}.scale"]
    return tensors


@pytest.mark.parametrize("how", ["a short scale table", "a one-entry scale table", "float16 scales", "unsigned weights",
                                 "a matrix more", "a stray tensor", "a scale table missing"])
def test_a_tampered_copy_is_refused_in_one_line_before_any_product(how, tmp_path):
    """Of today's weights (its record says so), but its arrays are not the model's: the sizes and
    types of every one are checked, as step.c and torch's kernel read each scale table by rows."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    copy = Int8Copy(tmp_path / FILE, weights)
    _prepared(copy)
    with safe_open(str(copy.path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(_tampered(tensors, how), str(copy.path), metadata=metadata)
    with pytest.raises(ModelError, match=f"^{copy.path}: (this int8 copy does not fit|not a readable int8 copy)"):
        _prepared(copy)
