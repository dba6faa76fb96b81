"""One batched `mellow caption` over a folder vs a shell loop calling `mellow caption` once per
file, with the tiny model (goal for issue 6: the batched run at least 10x faster per file).

Both are measured in one run on the same generated clips. The loop pays the start-up (Python,
torch, model load) for every file; running it over all files would take most of an hour, so it
runs over the first `--loop-files` and the figure compared is seconds per file.

    python benchmarks/batch_caption.py --model DIR [--files 200] [--loop-files 20]

`--model` is a model folder, e.g. the tiny one the tests build (tests/conftest.py:
tiny_model_dir) or any `mellow models path NAME`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_clips(folder: Path, n: int) -> list[Path]:
    """n short clips of different tones and noise, 1-3 s at 16 kHz."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sr, seconds = 16000, 1 + (i % 3)
        t = np.arange(sr * seconds) / sr
        wav = 0.3 * np.sin(2 * np.pi * (200 + 37 * i) * t) + 0.05 * rng.standard_normal(t.size)
        path = folder / f"clip{i:04d}.wav"
        sf.write(path, wav.astype("float32"), sr)
        paths.append(path)
    return paths


def caption(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mellow_cli", "caption", *args, "-q"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--loop-files", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=20)
    args = ap.parse_args()
    common = ["--model", args.model, "--max-tokens", str(args.max_tokens), "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp), args.files)
        caption([str(clips[0]), *common])  # warm the OS file cache
        batched = caption([tmp, *common, "--format", "jsonl"])
        loop = sum(caption([str(c), *common]) for c in clips[: args.loop_files])
    per_batched, per_loop = batched / args.files, loop / args.loop_files
    print(f"batched: {args.files} files in {batched:.1f} s = {per_batched * 1000:.0f} ms/file")
    print(f"loop:    {args.loop_files} files in {loop:.1f} s = {per_loop * 1000:.0f} ms/file")
    print(f"batched is {per_loop / per_batched:.1f}x faster per file (goal >= 10x)")


if __name__ == "__main__":
    main()
