"""Audio-reasoning tasks made from synthesized sound: a dataset that proves training works.

    python -m mellow_cli.train.tasks OUT_DIR --rows 2000 --seed 0 [--val-rows 200]

writes OUT_DIR/audio/*.flac (32 kHz mono 16-bit, exactly 10 s each, so the model's 10 s window
neither crops nor tiles them: tiling would repeat beeps) and OUT_DIR/train.jsonl, OUT_DIR/val.jsonl
in the JSONL training format of data.py (paths relative to OUT_DIR), every row with `choices`, its
`answer` one of them, and a `task` field naming the task. Four tasks, equally many rows each, every
answer equally often within a task:

| task | clips | question (fixed per task) | answers | chance |
| --- | --- | --- | --- | --- |
| louder | two | which clip is louder | the first / the second | 1/2 |
| pitch | one | does the pitch rise or fall | rises / falls | 1/2 |
| beeps | one | how many beeps | one / two / three / four | 1/4 |
| same | two | are the clips the same kind of sound | yes / no | 1/2 |

Overall chance is 7/16 = 0.4375. The question names only the task, so the answer has to be heard:
frequencies, durations, onsets and levels are random, and levels are drawn independently of the
answer everywhere except where the level is the answer (louder: >= 12 dB apart).

The two-clip tasks draw their clips from a pool per split (a clip serves in many pairs; which pair
and in what order decides the answer); the one-clip tasks get one clip per row. Train and val never
share a clip, and val depends only on the seed and --val-rows. Each sound fills a second or two of
the 10 s and the rest is digital silence, which FLAC stores almost for free.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 32000
CLIP_SECONDS = 10
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS

TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "louder": ("Which clip is louder, the first or the second?", ("the first", "the second")),
    "pitch": ("Does the pitch of the sound rise or fall?", ("rises", "falls")),
    "beeps": ("How many beeps are in the clip: one, two, three or four?", ("one", "two", "three", "four")),
    "same": ("Are the two clips the same kind of sound, yes or no?", ("yes", "no")),
}
KINDS = ("tone", "noise", "clicks", "chirp")  # sound types of the `same` task

MIN_DB, MAX_DB = -44.0, -14.0  # event RMS levels, dBFS: quiet but far above 16-bit noise, no clipping
LOUDER_MIN_GAP_DB = 12.0
RAMP_SECONDS = 0.005  # fade in/out: no click at a sound's edges (a click would be a beep)


# ---------------------------------------------------------------- sounds


def _fade(x: np.ndarray) -> np.ndarray:
    n = min(round(RAMP_SECONDS * SAMPLE_RATE), len(x) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
    x = x.copy()
    x[:n] *= ramp
    x[len(x) - n:] *= ramp[::-1]
    return x


def _at_level(x: np.ndarray, db: float) -> np.ndarray:
    """`x` scaled to an RMS of `db` dBFS, or less if its peaks would pass 0.9 (sparse clicks)."""
    gain = 10 ** (db / 20) / np.sqrt(np.mean(x**2))
    return x * min(gain, 0.9 / np.max(np.abs(x)))


def level_db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x**2))))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _n(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def tone(rng: np.random.Generator, seconds: float) -> np.ndarray:
    f = _log_uniform(rng, 200, 4000)
    return np.sin(2 * np.pi * f * np.arange(_n(seconds)) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi))


def noise(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Noise in a band two to three octaves wide: a hiss or a rumble, never a pitch."""
    n = _n(seconds)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    hz = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    lo = _log_uniform(rng, 150, 2000)
    spectrum[(hz < lo) | (hz > lo * rng.uniform(4, 8))] = 0
    return np.fft.irfft(spectrum, n)


def clicks(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A train of 2 ms decaying clicks, 5 to 20 a second."""
    n = _n(seconds)
    click = rng.standard_normal(_n(0.002)) * np.exp(-np.linspace(0, 5, _n(0.002)))
    x = np.zeros(n)
    period = _n(1 / rng.uniform(5, 20))
    for start in range(rng.integers(0, period // 2 + 1), n - len(click), period):
        x[start:start + len(click)] += click
    return x


def chirp(rng: np.random.Generator, seconds: float, rising: bool) -> np.ndarray:
    """A logarithmic sweep over 1 to 2.5 octaves between 200 Hz and 5 kHz."""
    octaves = rng.uniform(1, 2.5)
    low = _log_uniform(rng, 200, 5000 / 2**octaves)
    f0, f1 = (low, low * 2**octaves) if rising else (low * 2**octaves, low)
    t = np.arange(_n(seconds)) / SAMPLE_RATE
    k = np.log(f1 / f0) / seconds
    return np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)


def beeps(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` beeps of one random frequency, separated by 0.2 to 0.6 s of silence."""
    f = _log_uniform(rng, 400, 3000)
    parts = []
    for i in range(count):
        if i:
            parts.append(np.zeros(_n(rng.uniform(0.2, 0.6))))
        beep = np.sin(2 * np.pi * f * np.arange(_n(rng.uniform(0.1, 0.3))) / SAMPLE_RATE)
        parts.append(_fade(beep))
    return np.concatenate(parts)


def kind_sound(rng: np.random.Generator, kind: str) -> np.ndarray:
    seconds = rng.uniform(0.6, 2.0)
    if kind == "chirp":
        return chirp(rng, seconds, rising=bool(rng.integers(2)))
    return {"tone": tone, "noise": noise, "clicks": clicks}[kind](rng, seconds)


def place(rng: np.random.Generator, event: np.ndarray) -> np.ndarray:
    """The event at a random onset in 10 s of silence, at least 0.2 s from either end."""
    clip = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    margin = _n(0.2)
    start = int(rng.integers(margin, CLIP_SAMPLES - margin - len(event) + 1))
    clip[start:start + len(event)] = event
    return clip


# ---------------------------------------------------------------- a split


class _Split:
    """Writes one split's clips and rows: names, pools, and the per-task row makers."""

    def __init__(self, out_dir: Path, name: str, rng: np.random.Generator):
        self.out_dir, self.name, self.rng = out_dir, name, rng
        self.count = 0

    def write(self, label: str, event: np.ndarray) -> str:
        """Save `event` in a 10 s clip; its path relative to the output folder."""
        self.count += 1
        rel = f"audio/{self.name}_{label}_{self.count:05d}.flac"
        sf.write(self.out_dir / rel, place(self.rng, event), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return rel

    def leveled(self, event: np.ndarray, db: float | None = None) -> np.ndarray:
        """Faded in and out, at `db` dBFS or a random level independent of any answer."""
        return _at_level(_fade(event), float(self.rng.uniform(MIN_DB, MAX_DB)) if db is None else db)

    # --- one-clip tasks: a new clip per row
    def pitch(self, answer: str) -> dict:
        rising = answer == "rises"
        event = chirp(self.rng, self.rng.uniform(0.6, 1.8), rising)
        return {"audio1": self.write("pitch", self.leveled(event))}

    def beeps(self, answer: str) -> dict:
        count = TASKS["beeps"][1].index(answer) + 1
        return {"audio1": self.write("beeps", self.leveled(beeps(self.rng, count)))}

    # --- two-clip tasks: pairs from a pool
    def louder_pool(self, size: int) -> dict[str, list[tuple[str, str, float]]]:
        """{carrier: [(path, path, level difference dB)]}: every pair of the carrier's clips at
        least LOUDER_MIN_GAP_DB apart. Half the clips are tones, half noise; levels are uniform
        between MIN_DB and MAX_DB except that each carrier's first two clips lie near the two
        ends, so that even a tiny pool has a pair."""
        clips: dict[str, list[tuple[str, float]]] = {"tone": [], "noise": []}
        for i in range(size):
            carrier = ("tone", "noise")[i % 2]
            db = (MIN_DB + self.rng.uniform(0, 5), MAX_DB - self.rng.uniform(0, 5), None)[min(i // 2, 2)]
            event = self.leveled(kind_sound(self.rng, carrier), db)
            clips[carrier].append((self.write(f"level_{carrier}", event), level_db(event)))
        return {carrier: [(a, b, la - lb) for i, (a, la) in enumerate(cs) for b, lb in cs[i + 1:]
                          if abs(la - lb) >= LOUDER_MIN_GAP_DB]
                for carrier, cs in clips.items()}

    def louder(self, answer: str, pool) -> dict:
        pairs = pool[("tone", "noise")[int(self.rng.integers(2))]]
        a, b, gap = pairs[int(self.rng.integers(len(pairs)))]
        loud, soft = (a, b) if gap > 0 else (b, a)
        first, second = (loud, soft) if answer == "the first" else (soft, loud)
        return {"audio1": first, "audio2": second}

    def kind_pool(self, per_kind: int) -> dict[str, list[str]]:
        return {k: [self.write(f"kind_{k}", self.leveled(kind_sound(self.rng, k))) for _ in range(per_kind)]
                for k in KINDS}

    def same(self, answer: str, pool: dict[str, list[str]]) -> dict:
        if answer == "yes":
            kind = KINDS[int(self.rng.integers(len(KINDS)))]
            i, j = self.rng.choice(len(pool[kind]), 2, replace=False)
            return {"audio1": pool[kind][i], "audio2": pool[kind][j]}
        k1, k2 = self.rng.choice(len(KINDS), 2, replace=False)
        return {"audio1": self.rng.choice(pool[KINDS[k1]]).item(),
                "audio2": self.rng.choice(pool[KINDS[k2]]).item()}


def _per_task(rows: int) -> dict[str, int]:
    """Rows per task, as equal as `rows` allows."""
    return {t: rows // len(TASKS) + (i < rows % len(TASKS)) for i, t in enumerate(TASKS)}


def _balanced(rng: np.random.Generator, choices: Sequence[str], n: int) -> list[str]:
    labels = [choices[i % len(choices)] for i in range(n)]
    return [labels[i] for i in rng.permutation(n)]


def make_split(out_dir: Path, name: str, rows: int, rng: np.random.Generator) -> list[dict]:
    split = _Split(out_dir, name, rng)
    counts = _per_task(rows)
    louder_pool = split.louder_pool(max(8, counts["louder"] // 2)) if counts["louder"] else {}
    kind_pool = split.kind_pool(max(4, counts["same"] // 8)) if counts["same"] else {}
    makers: dict[str, Callable[[str], dict]] = {
        "louder": lambda a: split.louder(a, louder_pool),
        "pitch": split.pitch,
        "beeps": split.beeps,
        "same": lambda a: split.same(a, kind_pool),
    }
    out = []
    for task, n in counts.items():
        question, choices = TASKS[task]
        for answer in _balanced(rng, choices, n):
            out.append({"task": task, **makers[task](answer), "question": question,
                        "choices": list(choices), "answer": answer})
    out = [out[i] for i in rng.permutation(len(out))]
    for i, row in enumerate(out, 1):
        row["id"] = f"{name}-{i:05d}"
    return out


# ---------------------------------------------------------------- public


def make_tasks(out_dir, rows: int = 2000, seed: int = 0, val_rows: int | None = None) -> tuple[Path, Path]:
    """Write the dataset into `out_dir`; returns (train.jsonl, val.jsonl). The same seed writes the
    same rows and the same samples. `val_rows` defaults to a tenth of `rows`."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    val_rows = max(1, rows // 10) if val_rows is None else val_rows
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    paths = []
    for split_id, (name, n) in enumerate((("train", rows), ("val", val_rows))):
        # One generator per split: val does not change when --rows does.
        rng = np.random.default_rng([seed % 2**64, split_id])
        path = out / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in make_split(out, name, n, rng))
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def chance_accuracy(rows) -> float:
    """Expected accuracy of guessing uniformly among each row's choices (rows: QARow or dicts)."""
    def choices(r):
        return r.get("choices") if isinstance(r, dict) else r.choices

    sizes = [len(choices(r)) for r in rows if choices(r)]
    if not sizes:
        raise ValueError("no row has choices")
    return sum(1 / k for k in sizes) / len(sizes)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mellow_cli.train.tasks", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write audio/, train.jsonl, val.jsonl into")
    parser.add_argument("--rows", type=int, default=2000, help="training rows (default 2000)")
    parser.add_argument("--val-rows", type=int, default=None, help="validation rows (default rows/10)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same dataset")
    args = parser.parse_args(argv)
    if args.rows < 1 or (args.val_rows is not None and args.val_rows < 1):
        parser.error("--rows and --val-rows must be at least 1")
    train, val = make_tasks(args.out_dir, args.rows, args.seed, args.val_rows)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    clips = len(list((Path(args.out_dir) / "audio").glob("*.flac")))
    print(f"{len(rows)} training rows, chance accuracy {chance_accuracy(rows):.4f}; "
          f"{clips} clips, {_size(Path(args.out_dir)) / 1e6:.1f} MB", file=sys.stderr)
    print(train)
    print(val)
    return 0


if __name__ == "__main__":
    sys.exit(main())
