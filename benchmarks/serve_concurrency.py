"""`mellow serve` under load: N requests sent at once vs the same N sent one after another
(goal: at once at least 2x faster, because the server answers waiting requests as one batch).

Starts `mellow serve --port 0` on the loopback, waits until it answers /health, warms it with one
request, then times each round: N requests in sequence, and N in parallel (N threads), each
request a different generated clip with the same question (fresh clips in every phase, so neither
phase profits from the server's clip-embedding cache). Prints the seconds, requests per second and
the ratio; stops the server with SIGTERM at the end.

    python benchmarks/serve_concurrency.py --model DIR_OR_CKPT [--requests 8] [--max-tokens 64]
        [--rounds 2] [--dtype float32] [--threads N]

`--model` is anything `mellow serve --model` takes: the tiny folder the tests build (tests/conftest.py:
tiny_model_dir), a checkpoint file, or a cached name.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def clip_b64(i: int) -> str:
    """A 2 s, 16 kHz WAV: a tone of its own pitch and a little noise, base64."""
    import numpy as np
    import soundfile as sf

    sr = 16000
    t = np.arange(2 * sr) / sr
    wav = 0.3 * np.sin(2 * np.pi * (180 + 23 * i) * t) + 0.05 * np.random.default_rng(i).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wav.astype("float32"), sr, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def ask(url: str, clip: str, max_tokens: int) -> dict:
    body = {"model": "mellow", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
        {"type": "text", "text": "caption the audio."}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.load(r)


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mellow_cli", "serve", "--model", args.model, "--port", "0",
           "--dtype", args.dtype, "--max-batch", str(args.requests)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in server.stderr:  # the model loads first; then the address is printed
        lines.append(line)
        found = re.search(r"at (http://\S+)/v1", line)
        if found:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return server, found.group(1)
    raise SystemExit("mellow serve did not start:\n" + "".join(lines))


def wait_ready(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never answered /health")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    n = args.requests
    clips = iter(clip_b64(i) for i in range(1, 2 * n * args.rounds + 1))
    server, url = start_server(args)
    try:
        wait_ready(url)
        first = ask(url, clip_b64(0), args.max_tokens)  # warm-up: first-call costs stay out of the timing
        print(f"model {first['model']}, {first['usage']['completion_tokens']} answer tokens in the warm-up")
        rows = []
        for r in range(args.rounds):
            seq, par = [next(clips) for _ in range(n)], [next(clips) for _ in range(n)]
            t_seq = timed(lambda: [ask(url, c, args.max_tokens) for c in seq])
            with ThreadPoolExecutor(n) as pool:
                t_par = timed(lambda: list(pool.map(lambda c: ask(url, c, args.max_tokens), par)))
            rows.append((t_seq, t_par))
            print(f"round {r + 1}: {n} sequential {t_seq:.2f} s ({n / t_seq:.2f} req/s), "
                  f"{n} concurrent {t_par:.2f} s ({n / t_par:.2f} req/s), ratio {t_seq / t_par:.2f}x")
        total_seq, total_par = sum(s for s, _ in rows), sum(p for _, p in rows)
        print(f"overall: concurrent is {total_seq / total_par:.2f}x faster than sequential "
              f"(goal >= 2x; max_tokens {args.max_tokens}, dtype {args.dtype})")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
