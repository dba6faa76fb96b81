"""Checkpoint loading: names -> fake hub on 127.0.0.1 -> cache in a tmp dir -> safetensors -> network.

Most tests use a small stand-in network with the official key layout (a tied LM head, buffers, a
`module.` prefix in the checkpoint) so that they exercise the loader alone, fast; the tests marked
"real" load a tiny random `Mellow` end to end. The fake hub (tests/fakehub.py) is reached through
HF_ENDPOINT, as a user's mirror would be.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakehub import FakeHub
from torch import nn

from mellow_cli.models import catalogue
from mellow_cli.models.mellow.family import MellowFamily
from mellow_cli.store import conversion, loading, cache as model_cache, tokenizers as tokenizer_files
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.errors import ModelError

TINY_REPO = "test/mellow-tiny"
TINY_COMMIT = "1" * 40
TINY = catalogue.Published(TINY_REPO, "tiny.ckpt", "main", "tiny")
EMBED, HEAD = "caption_decoder.lm.model.embed_tokens.weight", "caption_decoder.lm.lm_head.weight"


# --- a stand-in network with the official key layout --------------------------------------------


class _LM(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.model.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied, as SmolLM2
        self.register_buffer("inv_freq", _inv_freq(hidden), persistent=False)


def _inv_freq(hidden: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, hidden, 2).float() / hidden))


class StandIn(nn.Module):
    """Encoder pieces (with float and int64 buffers) and a tied LM under caption_decoder.lm."""

    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.audio_encoder = nn.Module()
        self.audio_encoder.base = nn.Module()
        self.audio_encoder.base.htsat = nn.BatchNorm1d(cfg.n_mels)
        self.audio_encoder.base.c2l = nn.Linear(cfg.num_classes, cfg.audio_dim)
        self.audio_encoder.projection = nn.Linear(cfg.audio_dim, cfg.hidden_size, bias=False)
        self.caption_decoder = nn.Module()
        self.caption_decoder.lm = _LM(4096, cfg.hidden_size)


class _StandInFamily(MellowFamily):
    """Mellow's family, building the stand-in network instead."""

    def build(self, cfg: MellowConfig, device="cpu") -> nn.Module:
        with torch.device(device):
            return StandIn(cfg)

    def fill(self, model: nn.Module, state: dict) -> nn.Module:
        state = dict(state)
        state.setdefault(HEAD, state.get(EMBED))
        model.load_state_dict(state, strict=True, assign=True)
        lm = model.caption_decoder.lm
        lm.lm_head.weight = lm.model.embed_tokens.weight
        lm.inv_freq = _inv_freq(lm.model.norm.weight.shape[0])
        return model


STANDIN = _StandInFamily()


def _official_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """As the published .ckpt: every key (the tied head too), with DataParallel's prefix."""
    return {f"module.{k}": v.clone() for k, v in net.state_dict().items()}


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def standin_net() -> nn.Module:
    torch.manual_seed(0)
    net = StandIn(MellowConfig.tiny())
    net.audio_encoder.base.htsat.running_mean.uniform_()
    net.audio_encoder.base.htsat.num_batches_tracked.fill_(7)
    return net


@pytest.fixture(scope="module")
def tiny_ckpt(standin_net) -> bytes:
    return _save(_official_state(standin_net))


CHUNK = 64 * 1024


@pytest.fixture
def hub(smollm2_dir, tiny_ckpt, monkeypatch):
    """The fake hub with the tiny checkpoint under the published name `tiny`, and the tokenizer.

    huggingface_hub reads the body in DOWNLOAD_CHUNK_SIZE pieces (10 MB) and writes only whole ones
    when a connection drops; smaller pieces let a 1 MB test file stop and resume part-way."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    tokenizer = {f: (smollm2_dir / f).read_bytes() for f in loading.TOKENIZER_FILES}
    with FakeHub() as fake:
        fake.add_repo(tokenizer_files.TOKENIZER_REPO, tokenizer, commit=tokenizer_files.TOKENIZER_REVISION, lfs={"tokenizer.json"})
        fake.add_repo(TINY_REPO, {"tiny.ckpt": tiny_ckpt}, commit=TINY_COMMIT, lfs={"tiny.ckpt"})
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setitem(catalogue.PUBLISHED, "tiny", TINY)
        yield fake


def _blob(hub: FakeHub) -> str:
    """The CDN path of the tiny checkpoint."""
    import hashlib

    return "/blobs/" + hashlib.sha256(hub.repos[TINY_REPO].files["tiny.ckpt"]).hexdigest()


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _assert_same_weights(model: nn.Module, net: nn.Module) -> None:
    ours, theirs = model.state_dict(), net.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


# --- names -----------------------------------------------------------------------------------------


def test_names_resolve_without_network(tmp_path):
    v0 = loading.resolve("v0")
    assert (v0.kind, v0.repo, v0.filename, v0.preset) == ("published", "soham97/mellow", "v0.ckpt", "v0")
    assert loading.resolve("v0_s").filename == "v0_s.ckpt"
    hub_id = loading.resolve("someone/mellow-birds@dev")
    assert (hub_id.kind, hub_id.repo, hub_id.revision) == ("hub", "someone/mellow-birds", "dev")
    ckpt = tmp_path / "mine.ckpt"
    ckpt.write_bytes(b"")
    assert loading.resolve(str(ckpt)).kind == "checkpoint"
    assert loading.resolve(str(tmp_path)).kind == "folder"


@pytest.mark.parametrize("name, expected", [
    ("v9", "unknown model 'v9'"),
    ("weights/missing.ckpt", "no such file or folder"),
    ("./nowhere", "no such file or folder"),
])
def test_bad_names_are_one_line_errors(name, expected):
    with pytest.raises(ModelError) as e:
        loading.resolve(name)
    assert expected in _one_line(e) and "v0" in str(e.value)


@pytest.fixture(autouse=True)
def real_cache_untouched():
    """Every test here must keep to its tmp dir: the user's real cache is never created or changed."""
    import platformdirs

    real = Path(platformdirs.user_cache_dir("mellow", appauthor=False))
    before = real.stat().st_mtime_ns if real.exists() else None
    yield
    assert (real.stat().st_mtime_ns if real.exists() else None) == before, f"a test wrote to {real}"


def test_cache_lives_in_the_test_tmp_dir(isolated_home, tmp_path_factory):
    assert loading.cache_dir() == isolated_home
    assert isolated_home.is_relative_to(tmp_path_factory.getbasetemp())


# --- the published-name path, through the fake hub --------------------------------------------------


def test_first_download_converts_once_then_loads_from_cache(hub, standin_net, isolated_home):
    model, files = loading.load("tiny", arch=STANDIN, progress=False)
    _assert_same_weights(model, standin_net)
    assert model.caption_decoder.lm.lm_head.weight is model.caption_decoder.lm.model.embed_tokens.weight
    assert torch.equal(model.caption_decoder.lm.inv_freq, standin_net.caption_decoder.lm.inv_freq)

    folder = isolated_home / "models" / "tiny"
    assert files.folder == folder and files.weights == folder / "model.safetensors"
    assert files.tokenizer_dir == folder and files.revision == TINY_COMMIT
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "source.json",
                                                 "tokenizer.json", "tokenizer_config.json"}
    record = json.loads((folder / "source.json").read_text())
    assert record["source"]["repo"] == TINY_REPO and record["source"]["commit"] == TINY_COMMIT
    assert record["source"]["size"] == len(hub.repos[TINY_REPO].files["tiny.ckpt"])
    assert MellowConfig.from_dict(json.loads((folder / "config.json").read_text())) == MellowConfig.tiny()
    from safetensors import safe_open

    with safe_open(str(files.weights), framework="pt") as f:
        assert EMBED in f.keys() and HEAD not in f.keys()  # the tied head is stored once
    assert not list((isolated_home / "downloads").rglob("*.ckpt*"))  # the raw .ckpt is gone

    # The hub names the file (and gets the token for private repos); the CDN it redirects to serves it.
    assert hub.seen("HEAD", "tiny.ckpt", server="hub") and hub.seen("GET", "/blobs/", server="cdn")

    # Later runs: no request at all, even with the hub gone.
    count = len(hub.requests)
    hub.stop()
    model2, _ = loading.load("tiny", arch=STANDIN, progress=False)
    _assert_same_weights(model2, standin_net)
    assert len(hub.requests) == count


def test_hf_token_reaches_the_hub_but_not_the_cdn(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    loading.pull("tiny", arch=STANDIN, progress=False)
    hub_calls = hub.seen(server="hub")
    assert hub_calls and all(r.headers.get("authorization") == "Bearer hf_test_token" for r in hub_calls)
    assert all("authorization" not in r.headers for r in hub.seen(server="cdn"))


def test_offline_not_cached_says_how_to_fix(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        loading.load("tiny", arch=STANDIN, progress=False)
    message = _one_line(e)
    assert "HF_HUB_OFFLINE" in message
    assert "run `mellow models pull tiny` with network, or pass --model PATH" in message
    assert hub.requests == []


def test_offline_after_a_pull_loads_without_requests(hub, monkeypatch, standin_net):
    loading.pull("tiny", arch=STANDIN, progress=False)
    count = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = loading.load("tiny", arch=STANDIN, progress=False)
    _assert_same_weights(model, standin_net)
    assert len(hub.requests) == count


def test_unreachable_hub_and_nothing_cached(monkeypatch):
    monkeypatch.setitem(catalogue.PUBLISHED, "tiny", TINY)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ModelError) as e:
        loading.pull("tiny", arch=STANDIN, progress=False)
    message = _one_line(e)
    assert message.startswith("cannot reach http://127.0.0.1:9 to download tiny")
    assert "--model PATH" in message


# --- interrupted and damaged downloads -----------------------------------------------------------


def test_dropped_connection_resumes_in_the_same_call(hub, standin_net):
    size = len(hub.repos[TINY_REPO].files["tiny.ckpt"])
    hub.drop_after(_blob(hub), size // 2)
    model, _ = loading.load("tiny", arch=STANDIN, progress=False)
    _assert_same_weights(model, standin_net)
    ranges = [r.headers.get("range") for r in hub.seen("GET", _blob(hub))]
    assert ranges == [None, f"bytes={size // 2 // CHUNK * CHUNK}-"]


def test_failed_download_leaves_nothing_half_written(hub, standin_net, isolated_home):
    hub.drop_after(_blob(hub), len(hub.repos[TINY_REPO].files["tiny.ckpt"]) // 3)
    hub.fail(_blob(hub), 503)  # the retry within the call meets a broken server
    with pytest.raises(ModelError) as e:
        loading.pull("tiny", arch=STANDIN, progress=False)
    message = _one_line(e)
    assert "download of test/mellow-tiny/tiny.ckpt" in message and "stopped (HTTP 503)" in message
    assert "run `mellow models pull tiny` again" in message
    assert model_cache.partial_downloads() == []

    hub.clear_faults()
    del hub.requests[:]
    model, _ = loading.load("tiny", arch=STANDIN, progress=False)
    _assert_same_weights(model, standin_net)
    assert [r.headers.get("range") for r in hub.seen("GET", _blob(hub))] == [None]


def test_damaged_download_is_refused_and_deleted(hub, isolated_home):
    hub.corrupt(_blob(hub))
    with pytest.raises(ModelError) as e:
        loading.pull("tiny", arch=STANDIN, progress=False)
    message = _one_line(e)
    assert "arrived damaged" in message and "sha256" in message and "mellow models pull tiny" in message
    assert model_cache.partial_downloads() == []
    assert not (isolated_home / "models" / "tiny").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_fetched_again(hub, standin_net, isolated_home, damage, capsys):
    loading.pull("tiny", arch=STANDIN, progress=False)
    weights = isolated_home / "models" / "tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed: the mtime moved, so the sha256 is checked
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    model, _ = loading.load("tiny", arch=STANDIN, progress=True)
    _assert_same_weights(model, standin_net)
    assert "the cached copy is damaged" in capsys.readouterr().err
    assert len(hub.seen("GET", _blob(hub))) == 2


def test_damaged_cache_offline_is_refused(hub, isolated_home, monkeypatch):
    loading.pull("tiny", arch=STANDIN, progress=False)
    weights = isolated_home / "models" / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        loading.load("tiny", arch=STANDIN, progress=False)
    message = _one_line(e)
    assert "damaged" in message and "bytes, expected" in message
    assert "run `mellow models pull tiny` with network" in message


def test_pull_of_a_cached_model_checks_every_byte(hub, isolated_home):
    loading.pull("tiny", arch=STANDIN, progress=False)
    weights = isolated_home / "models" / "tiny" / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even when the mtime looks unchanged
    loading.pull("tiny", arch=STANDIN, progress=False)
    assert len(hub.seen("GET", _blob(hub))) == 2


# --- checkpoint contents -------------------------------------------------------------------------


def test_key_mismatch_names_the_first_keys(tmp_path, standin_net, hub):
    state = _official_state(standin_net)
    state["module.audio_encoder.extra.weight"] = torch.zeros(2)
    del state["module.audio_encoder.projection.weight"]
    ckpt = tmp_path / "odd.ckpt"
    torch.save(state, ckpt)
    with pytest.raises(ModelError) as e:
        loading.load(str(ckpt), arch=STANDIN, progress=False)
    message = _one_line(e)
    assert "does not fit the Mellow v0 network" in message
    assert "1 missing: audio_encoder.projection.weight" in message
    assert "1 unexpected: audio_encoder.extra.weight" in message


def test_wrong_shapes_are_named(tmp_path, standin_net, hub):
    state = _official_state(standin_net)
    state["module.audio_encoder.base.c2l.bias"] = torch.zeros(3)
    ckpt = tmp_path / "odd.ckpt"
    torch.save(state, ckpt)
    (tmp_path / "config.json").write_text(json.dumps(MellowConfig.tiny().to_dict()))
    with pytest.raises(ModelError) as e:
        loading.load(str(ckpt), arch=STANDIN, progress=False)
    assert "wrong shape or type: audio_encoder.base.c2l.bias [3] vs [64]" in _one_line(e)


class _Payload:
    """Unpickling this calls os.system: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["zip", "legacy", "raw-pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, layout, hub):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    payload = {"weight": torch.ones(2), "boom": _Payload(marker)}
    if layout == "zip":
        torch.save(payload, ckpt)
    elif layout == "legacy":
        torch.save(payload, ckpt, _use_new_zipfile_serialization=False)
    else:
        ckpt.write_bytes(pickle.dumps(payload))
    with pytest.raises(ModelError) as e:
        loading.load(str(ckpt), arch=STANDIN, progress=False)
    message = _one_line(e)
    assert message.startswith(f"{ckpt}: refused: ")
    if layout != "raw-pickle":  # torch.save's protocol-2 pickle: the global is named before anything runs
        assert "a pickled Python object (posix.system) that could run code" in message
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path, hub):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ModelError) as e:
        loading.load(str(junk), arch=STANDIN, progress=False)
    assert "not a readable PyTorch checkpoint" in _one_line(e)


def test_local_checkpoint_is_converted_once(tmp_path, standin_net, hub, isolated_home):
    ckpt = tmp_path / "mine.ckpt"
    torch.save(_official_state(standin_net), ckpt)
    (tmp_path / "config.json").write_text(json.dumps(MellowConfig.tiny().to_dict()))
    model, files = loading.load(str(ckpt), arch=STANDIN, progress=False)
    _assert_same_weights(model, standin_net)
    assert files.config == MellowConfig.tiny() and files.folder.parent == isolated_home / "models"
    mtime = files.weights.stat().st_mtime_ns
    loading.load(str(ckpt), arch=STANDIN, progress=False)
    assert files.weights.stat().st_mtime_ns == mtime  # not converted again
    # the cached folder is a model folder in its own right
    model3, files3 = loading.load(str(files.folder), arch=STANDIN, progress=False)
    _assert_same_weights(model3, standin_net)
    assert files3.weights == files.weights and files3.config == MellowConfig.tiny()


def test_missing_weights_in_a_folder(tmp_path):
    (tmp_path / "v0.ckpt").write_bytes(b"")
    with pytest.raises(ModelError) as e:
        loading.load(str(tmp_path), arch=STANDIN, progress=False)
    assert f"to use the checkpoint inside, pass {tmp_path / 'v0.ckpt'}" in _one_line(e)


# --- disk full -----------------------------------------------------------------------------------


def test_not_enough_space_before_downloading(hub, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ModelError) as e:
        loading.pull("tiny", arch=STANDIN, progress=False)
    message = _one_line(e)
    assert message.startswith("not enough disk space in") and "set MELLOW_HOME" in message
    assert not hub.seen("GET", _blob(hub))


def test_disk_full_while_converting(hub, monkeypatch, isolated_home):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(ModelError) as e:
            loading.pull("tiny", arch=STANDIN, progress=False)
    assert _one_line(e).startswith("not enough disk space in")
    assert [p.name for p in (isolated_home / "models").iterdir()] == []  # no half-written folder
    # the verified download waits for the next attempt instead of being fetched again
    loading.pull("tiny", arch=STANDIN, progress=False)
    assert len(hub.seen("GET", _blob(hub))) == 1


# --- a folder of ours on the hub -----------------------------------------------------------------


def test_hub_folder_with_the_tokenizer_from_smollm2(hub, standin_net, tmp_path):
    loading.pull("tiny", arch=STANDIN, progress=False)
    folder = loading.model_path("tiny")
    hub.add_repo("someone/mellow-birds", {
        "model.safetensors": (folder / "model.safetensors").read_bytes(),
        "config.json": (folder / "config.json").read_bytes(),
    }, lfs={"model.safetensors"})
    model, files = loading.load("someone/mellow-birds", arch=STANDIN, progress=False)
    _assert_same_weights(model, standin_net)
    assert files.folder.name == "someone--mellow-birds" and files.config == MellowConfig.tiny()
    assert (files.folder / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    with pytest.raises(ModelError) as e:
        loading.pull("someone/nothing-here", arch=STANDIN, progress=False)
    assert "no model repo someone/nothing-here" in _one_line(e) and "HF_TOKEN" in str(e.value)


# --- the real network ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mellow():
    from mellow_cli.models.mellow.network import Mellow

    torch.manual_seed(0)
    return Mellow.from_config(MellowConfig.tiny(), device="cpu").eval()


def test_real_mellow_through_the_hub(hub, tiny_mellow):
    hub.add_repo("test/real-tiny", {"tiny.ckpt": _save(_official_state(tiny_mellow))}, lfs={"tiny.ckpt"})
    catalogue.PUBLISHED["real-tiny"] = catalogue.Published("test/real-tiny", "tiny.ckpt", "main", "tiny")
    try:
        model, files = loading.load("real-tiny", progress=False)
    finally:
        del catalogue.PUBLISHED["real-tiny"]
    _assert_same_weights(model, tiny_mellow)
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3, 17]])
    with torch.no_grad():
        assert torch.equal(model.lm(input_ids=ids).logits, tiny_mellow.lm(input_ids=ids).logits)
        wav = torch.randn(1, tiny_mellow.cfg.clip_samples)
        assert torch.allclose(model.encode_audio(wav), tiny_mellow.encode_audio(wav))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(files.tokenizer_dir))("a dog")["input_ids"]


# --- the `mellow models` commands -----------------------------------------------------------------


def _app():
    """The command line as `mellow` runs it, root callback included."""
    from mellow_cli.cli.entry import app

    return app


def test_models_commands(hub, monkeypatch, isolated_home):
    from typer.testing import CliRunner

    import mellow_cli.models.mellow as mellow_family

    monkeypatch.setattr(mellow_family, "FAMILY", STANDIN)
    runner = CliRunner()
    app = _app()
    empty = runner.invoke(app, ["models", "list"])
    assert empty.exit_code == 0 and empty.stdout == ""

    pulled = runner.invoke(app, ["models", "pull", "tiny", "-q"])
    assert pulled.exit_code == 0, pulled.output
    assert pulled.stdout.strip() == str(isolated_home / "models" / "tiny")

    listed = runner.invoke(app, ["models", "list"])
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "REVISION", "SOURCE"]
    assert row.split()[0] == "tiny" and TINY_COMMIT[:12] in row and f"{TINY_REPO}/tiny.ckpt" in row
    (entry,) = [json.loads(line) for line in runner.invoke(app, ["models", "list", "--json"]).stdout.splitlines()]
    assert entry["name"] == "tiny" and entry["revision"] == TINY_COMMIT and entry["bytes"] > 0

    assert runner.invoke(app, ["models", "path"]).stdout.strip() == str(isolated_home)
    assert runner.invoke(app, ["models", "path", "tiny"]).stdout.strip() == str(isolated_home / "models" / "tiny")

    removed = runner.invoke(app, ["models", "rm", "tiny"])
    assert removed.exit_code == 0 and removed.stdout.startswith("removed tiny (")
    assert not (isolated_home / "models" / "tiny").exists()
    gone = runner.invoke(app, ["models", "path", "tiny"])
    assert isinstance(gone.exception, ModelError) and "run `mellow models pull tiny`" in str(gone.exception)


def test_rm_deletes_unfinished_downloads(hub, monkeypatch, isolated_home):
    import errno

    import safetensors.torch
    from typer.testing import CliRunner

    from mellow_cli.files import megabytes

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # the verified download stays, awaiting conversion
        m.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(ModelError):
            loading.pull("tiny", arch=STANDIN, progress=False)
    killed = isolated_home / "downloads" / "test--mellow-tiny" / "tiny.ckpt.incoming-1234" / "tiny.ckpt.abcd.incomplete"
    killed.parent.mkdir()
    killed.write_bytes(b"x" * 1000)  # what a download killed part-way leaves
    left = model_cache.partial_downloads()
    assert {p.name for p, _ in left} == {"tiny.ckpt", "tiny.ckpt.json", killed.name}
    listed = CliRunner().invoke(_app(), ["models", "list"])
    assert listed.stdout == "" and "unfinished downloads" in listed.stderr
    removed = CliRunner().invoke(_app(), ["models", "rm", "tiny"])
    assert removed.stdout == f"removed tiny ({megabytes(sum(size for _, size in left))})\n"
    assert model_cache.partial_downloads() == []


def test_force_offline_is_refused(hub, monkeypatch):
    loading.pull("tiny", arch=STANDIN, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loading.pull("tiny", arch=STANDIN, progress=False)  # verifies the cached copy, no network
    with pytest.raises(ModelError) as e:
        loading.pull("tiny", force=True, arch=STANDIN, progress=False)
    assert "drop --force" in _one_line(e)


def test_models_help_has_examples():
    from typer.testing import CliRunner

    for command in ("list", "pull", "rm", "path"):
        result = CliRunner().invoke(_app(), ["models", command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output


MAIN = ("import sys\nfrom mellow_cli.cli import app, main\nfrom mellow_cli.cli.models import models_app\n"
        "if not any(g.name == 'models' for g in app.registered_groups):\n"
        "    app.add_typer(models_app, name='models')\nmain(sys.argv[1:])\n")


def _mellow(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", MAIN, *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_cli_offline_error_is_one_line_on_stderr():
    out = _mellow("models", "pull", "v0", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == ("mellow: error: v0 is not in the cache and HF_HUB_OFFLINE is set: run "
                          "`mellow models pull v0` with network, or pass --model PATH\n")


def test_cli_pulls_a_real_hub_folder_in_a_fresh_process(hub, tiny_mellow, tmp_path, isolated_home):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_mellow.state_dict().items() if k != HEAD}
    save_file(state, str(tmp_path / "model.safetensors"))
    hub.add_repo("someone/real-tiny", {
        "model.safetensors": (tmp_path / "model.safetensors").read_bytes(),
        "config.json": json.dumps(MellowConfig.tiny().to_dict()).encode(),
    }, lfs={"model.safetensors"})
    out = _mellow("models", "pull", "someone/real-tiny", env={"HF_ENDPOINT": hub.url})
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{isolated_home / 'models' / 'someone--real-tiny'}\n"
    hub.stop()
    offline = _mellow("models", "list", env={"HF_HUB_OFFLINE": "1"})
    assert offline.stdout.splitlines()[1].startswith("someone/real-tiny ")


@pytest.mark.parametrize("name", ["a/b@..", "a/b@.hidden", "a/b@v1..v2"])
def test_a_revision_that_could_leave_the_cache_is_refused(name):
    from mellow_cli.models.catalogue import resolve
    from mellow_cli.errors import UsageError

    with pytest.raises(UsageError, match="is not a revision"):
        resolve(name)


def test_models_rm_on_a_read_only_cache_is_one_line(monkeypatch, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    monkeypatch.setattr(model_cache, "_cached_folder_for", lambda name: (folder, None))

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(model_cache.shutil, "rmtree", refuse)
    with pytest.raises(ModelError, match="cannot delete it .*read-only"):
        loading.remove("m")


def test_usage_errors_of_models_exit_2(tmp_path):
    """A model used in place has nothing to remove, and a revision with '..' is not one: both are
    mistakes in the command line, so they exit 2 like any other usage error."""
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(b"")
    removed = _mellow("models", "rm", str(weights), env={})
    assert removed.returncode == 2 and removed.stdout == ""
    assert removed.stderr == f"mellow: error: {weights} is used in place, not cached: there is nothing to remove\n"
    bad = _mellow("models", "path", "a/b@..", env={})
    assert bad.returncode == 2 and "is not a revision" in bad.stderr


def test_first_conversion_draws_a_bar_in_megabytes(hub, monkeypatch):
    import contextlib

    from mellow_cli import events

    bars = []

    class Recorded(events.Reporter):
        @contextlib.contextmanager
        def progress(self, total, description=""):
            bar = {"total": total, "description": description, "done": 0}
            bars.append(bar)
            yield lambda n=1: bar.update(done=bar["done"] + n)

    monkeypatch.setattr(events, "_reporter", Recorded())
    loading.pull("tiny", arch=STANDIN, progress=False)
    assert bars == []  # --quiet: no bar
    loading.pull("tiny", force=True, arch=STANDIN, progress=True)
    (bar,) = bars
    assert bar["description"] == "tiny: converting to safetensors (MB)"
    assert bar["total"] >= 1 and bar["done"] == bar["total"]

    del bars[:]
    with conversion.conversion_bar("big", 10 * 10**6, True) as advance:
        for _ in range(4):
            advance(2_500_000)
            bars[0]["seen"] = bars[0].get("seen", []) + [bars[0]["done"]]
    assert bars[0]["total"] == 10 and bars[0]["seen"] == [2, 5, 7, 10]
    with pytest.raises(RuntimeError), conversion.conversion_bar("big", 10 * 10**6, True) as advance:
        advance(3_000_000)
        raise RuntimeError("a failed conversion leaves the bar where it was")
    assert bars[1]["done"] == 3


@pytest.mark.parametrize("capability, tried", [("DEFAULT", False), ("AVX2", True)])
def test_nnpack_is_not_tried_on_an_x86_cpu_that_cannot_run_it(monkeypatch, capability, tried):
    """(Else torch prints its own warning into our output at the first convolution.)"""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    with torch.backends.nnpack.flags(enabled=True):
        loading._without_nnpack_where_it_cannot_run()
        assert torch._C._get_nnpack_enabled() is tried


def test_each_command_starts_at_the_default_verbosity(isolated_home):
    """A command run in the same process after a quiet one still prints its notes (the root
    callback resets the verbosity; `mellow ...` from a shell always starts fresh)."""
    from typer.testing import CliRunner

    from mellow_cli.cli import render

    render.configure(quiet=True)  # what an earlier `-q` command leaves behind
    listed = CliRunner().invoke(_app(), ["models", "list"])
    assert listed.exit_code == 0 and "no models in" in listed.stderr
