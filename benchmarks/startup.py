"""How long `mellow --help` takes next to a bare `python -c pass`, measured side by side.

The CLI must not import torch, transformers or numpy to print its help (goal: less than 0.35 s
more than bare Python). Runs alternate between the two commands so load from other processes slows both alike;
the figure that matters is the difference of the medians.

    python benchmarks/startup.py [--runs 20]
"""

import argparse
import statistics
import subprocess
import sys
import time


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    bare = [sys.executable, "-c", "pass"]
    help_ = [sys.executable, "-m", "mellow_cli", "--help"]
    _time(bare), _time(help_)  # warm the OS file cache
    times = {"python -c pass": [], "mellow --help": []}
    for _ in range(args.runs):
        times["python -c pass"].append(_time(bare))
        times["mellow --help"].append(_time(help_))
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, m in medians.items():
        print(f"{name:16s} median {m * 1000:7.1f} ms  (min {min(times[name]) * 1000:.1f} ms, {args.runs} runs)")
    extra = medians["mellow --help"] - medians["python -c pass"]
    print(f"{'difference':16s}        {extra * 1000:7.1f} ms  (goal < 350 ms)")


if __name__ == "__main__":
    main()
