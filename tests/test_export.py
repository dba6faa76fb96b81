"""`mellow models export`: our model -> the authors' plain torch.save state dict.

The official layout is held to tests/golden/mellow_v0_state_dict_manifest.json, recorded from the
reference code (every key, shape and dtype of v0.ckpt). The reference classes themselves need
torchlibrosa and the SmolLM2 hub download, so "loads with strict=True" is checked as the reference
checks it: the exported keys, shapes and dtypes against that manifest, and a strict
`load_state_dict` into our v0 network, whose layout the first test pins to the same manifest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mellow_cli.models.mellow import checkpoint as mellow_checkpoint
from mellow_cli.store import export, loading
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.errors import ModelError, UsageError

MANIFEST = Path(__file__).parent / "golden" / "mellow_v0_state_dict_manifest.json"
EMBED, HEAD = "caption_decoder.lm.model.embed_tokens.weight", "caption_decoder.lm.lm_head.weight"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mellow_cli", *args], capture_output=True, text=True)


def _manifest() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(shape), getattr(torch, dtype)) for k, (shape, dtype) in json.loads(MANIFEST.read_text()).items()}


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_official_layout_is_the_golden_manifest():
    layout, manifest = mellow_checkpoint.official_layout(), _manifest()
    assert len(manifest) == 479
    assert layout == manifest  # names, shapes, dtypes (the order of the keys does not matter to a load)
    assert HEAD in layout and "audio_encoder.base.htsat.bn0.running_var" in layout  # tied head, buffers


# --- a v0-sized model, end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def v0_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A model folder of ours with the v0 architecture and seeded random weights (670 MB), as
    `mellow train` writes a checkpoint: the tied head stored once."""
    from safetensors.torch import save_file

    from mellow_cli.models.mellow.network import Mellow

    torch.manual_seed(0)
    net = Mellow.from_config(MellowConfig.v0(), device="cpu")
    net.audio_encoder.base.htsat.bn0.num_batches_tracked.fill_(7)  # an int64 buffer that is not zero
    out = tmp_path_factory.mktemp("v0_model")
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if k != HEAD}, str(out / loading.WEIGHTS_FILE))
    (out / loading.CONFIG_FILE).write_text(json.dumps(MellowConfig.v0().to_dict()))
    for f in loading.TOKENIZER_FILES:
        shutil.copyfile(smollm2_dir / f, out / f)
    return out


def test_v0_export_holds_every_official_key_and_round_trips(v0_dir, tmp_path):
    from safetensors.torch import load_file

    from mellow_cli.models.mellow.network import Mellow
    from mellow_cli.models.weights import compare_layouts, layout_of

    source = load_file(str(v0_dir / loading.WEIGHTS_FILE))
    out = v0_dir / "exported.ckpt"  # beside the tokenizer files, so loading it back needs no hub
    done = export.export(str(v0_dir), out, export.ExportOptions(progress=False))
    assert (done.path, done.keys, done.bytes, done.wrap) == (out, 479, out.stat().st_size, None)
    assert not list(v0_dir.glob(".exported.ckpt.tmp-*"))

    state = torch.load(out, map_location="cpu", weights_only=True, mmap=True)
    assert type(state) is dict and len(state) == 479
    assert compare_layouts(layout_of(state), _manifest()).ok  # same names, shapes and dtypes
    assert torch.equal(state[HEAD], state[EMBED])  # the tied head is there, with the embedding's values
    assert state["audio_encoder.base.htsat.bn0.num_batches_tracked"].item() == 7
    for k, t in source.items():
        assert torch.equal(state[k], t), k
    # the head is stored once, as a tied model's state_dict saves it: the file is the tensors' size
    assert done.bytes < 1.01 * sum(t.numel() * t.element_size() for t in source.values())

    official = Mellow.from_config(MellowConfig.v0(), device="meta")
    official.load_state_dict(state, strict=True, assign=True)

    model, files = loading.load(str(out), progress=False)  # our loader takes it back unchanged
    assert files.config == MellowConfig.v0()
    back = model.state_dict()
    assert back.keys() == state.keys()
    for k, t in state.items():
        assert torch.equal(back[k], t), k

    wrapped = tmp_path / "resume.ckpt"
    export.export(str(v0_dir), wrapped, export.ExportOptions(wrap="state_dict", progress=False))
    obj = torch.load(wrapped, map_location="cpu", weights_only=True, mmap=True)
    assert list(obj) == ["state_dict"]  # what the authors' resume reads: torch.load(path)["state_dict"]
    assert obj["state_dict"].keys() == state.keys()
    assert all(torch.equal(obj["state_dict"][k], t) for k, t in state.items())


# --- refusals -------------------------------------------------------------------------------------


def test_tiny_is_refused_in_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "tiny.ckpt"
    result = run("models", "export", str(tiny_model_dir), "-o", str(out), "-q")
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert f"{tiny_model_dir}: a Mellow tiny model cannot be exported to the official layout" in line
    assert "differs in embed_dim" in line
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("field", ["embed_dim", "rope_theta", "tokenizer"])
def test_only_the_v0_architecture_is_exportable(field):
    mellow_checkpoint.check_exportable(MellowConfig.preset("v0_s"), "v0_s")  # the second published model: same architecture
    value = {"embed_dim": 48, "rope_theta": 10000.0, "tokenizer": "someone/other"}[field]
    import dataclasses

    with pytest.raises(ModelError, match=f"differs in {field}\\)"):
        mellow_checkpoint.check_exportable(dataclasses.replace(MellowConfig.v0(), **{field: value}), "mine")


def test_an_existing_output_is_kept_without_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "old.ckpt"
    out.write_bytes(b"keep me")
    result = run("models", "export", str(tiny_model_dir), "-o", str(out))
    assert result.returncode == 2
    assert _one_line(result.stderr) == f"mellow: error: {out}: exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"keep me" and result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["-o", "{tmp}/model.safetensors"], "the output must be a .ckpt (or .pt, .pth) file"),
    (["-o", "{tmp}/missing/model.ckpt"], "no such folder"),
    (["-o", "{tmp}/model.ckpt", "--wrap", "model"], "--wrap model: expected one of state_dict"),
])
def test_bad_arguments_are_usage_errors(tiny_model_dir, tmp_path, args, message):
    result = run("models", "export", str(tiny_model_dir), *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert message in _one_line(result.stderr)


def test_a_folder_named_as_output_is_refused(tmp_path):
    folder = tmp_path / "out.ckpt"
    folder.mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        export.check_target(folder, overwrite=True)



def test_a_device_or_pipe_named_as_output_is_never_replaced(tmp_path):
    # Writing goes to a temporary file renamed over the target: over a device node (as root) or
    # a pipe that rename would replace the node itself.
    fifo = tmp_path / "out.ckpt"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        export.check_target(fifo, overwrite=True)
    assert fifo.is_fifo()

# --- writing ---------------------------------------------------------------------------------------


def _small_state() -> dict[str, torch.Tensor]:
    w = torch.arange(6.0).reshape(2, 3)
    return {"a.weight": w, "tied.weight": w, "n": torch.tensor(3)}


def test_writes_atomically_and_keeps_ties(tmp_path):
    out = tmp_path / "x.ckpt"
    export.save_atomic(_small_state(), out, overwrite=False, progress=False)
    back = torch.load(out, weights_only=True)
    assert back.keys() == _small_state().keys() and torch.equal(back["a.weight"], back["tied.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]
    with pytest.raises(UsageError, match="exists"):  # a file that appeared while writing is not replaced
        export.save_atomic({"n": torch.tensor(4)}, out, overwrite=False, progress=False)
    assert torch.load(out, weights_only=True)["n"].item() == 3
    export.save_atomic({"n": torch.tensor(4)}, out, overwrite=True, progress=False)
    assert torch.load(out, weights_only=True)["n"].item() == 4
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_a_full_disk_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "x.ckpt"
    out.write_bytes(b"old")

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ModelError) as e:
        export.save_atomic(_small_state(), out, overwrite=True, progress=False)
    assert str(e.value) == f"{out}: not enough disk space to write it"
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_big_files_show_progress_on_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "BIG", 1)
    export.save_atomic(_small_state(), tmp_path / "x.ckpt", overwrite=False, progress=True)
    err = capsys.readouterr().err
    assert f"mellow: writing {tmp_path / 'x.ckpt'}" in err and "x.ckpt:" in err  # the note, then the bar
    export.save_atomic(_small_state(), tmp_path / "y.ckpt", overwrite=False, progress=False)
    assert capsys.readouterr().err == ""


def test_help_shows_the_options_and_examples():
    from typer.testing import CliRunner

    from mellow_cli.cli import app

    result = CliRunner().invoke(app, ["models", "export", "--help"])
    assert result.exit_code == 0, result.output
    assert "mellow models export" in result.output and "--wrap" in result.output and "--overwrite" in result.output
