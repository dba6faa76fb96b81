"""How the language model's matrices are stored and multiplied: `--dtype`.

- `float32` is the reference's arithmetic: the exact path, token for token the golden vectors.
- `float16`, `bfloat16` store the matrices in half precision (half the bytes a decode step reads)
  and multiply in it where the CPU is fast at it; the residual stream, norms, attention and the KV
  cache stay float32, so answers part from float32's only at near ties.
- `int8` stores them as 8-bit integers with one scale per output row: a quarter of float32's
  bytes; the activations are never rounded to 8 bits (the one-call decode step of runtime/fused.py
  rounds them to 16, per block of 64), so SmolLM2's logits stay within about 2 of float32's
  (`mellow bench speed --dtype int8` reports the agreement).
- `auto`, the default, takes the fastest faithful kernels of this CPU: which half precision (if
  any) beats float32 at a decode step and at a prefill is not a property of the instruction set
  alone (the same AVX512 machine can be fast at bfloat16 matrix-matrix products and slow at
  float16 matrix-vector ones), so it is measured once on matrices of the model's shapes and kept
  in the cache, keyed by the CPU and torch.

Only the language model's linears and output head change here (matrices.py holds them; a family
may also give its encoder's linears a bfloat16 copy where several rows are multiplied in
bfloat16: models/mellow/htsat.py does).
Where the head is a plain matrix (float16, bfloat16), token embeddings are read from it
(the two are tied) and the float32 table is dropped: the prompt's embeddings then carry the
head's rounding, as every product already does. On a GPU the language model runs wholly in the
half precision.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mellow_cli.errors import UsageError
from mellow_cli.runtime.matrices import (
    DTYPES,
    EXACT,
    NAMES,
    Precision,
    head_maker,
    maker,
    packed_available,
    prepare,
)


def named(name: str, device: torch.device, progress: bool = False) -> Precision:
    """--dtype NAME on `device` (auto measured or read from the cache on a CPU; `progress` says
    so on stderr when it measures)."""
    if name not in NAMES:
        raise UsageError(f"unknown dtype {name!r}: use {', '.join(NAMES)}")
    if device.type != "cpu":
        if name == "auto":
            name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        if name == "int8":
            raise UsageError("--dtype int8 runs on the CPU only; use --device cpu, or float16/bfloat16 here")
        return Precision(name, name, name, name)
    if name == "auto":
        return auto(progress)
    if name == "float16":  # half-precision matrix-matrix products are slow on most CPUs
        return Precision("float16", "float16", "float16", "float32")
    if name == "int8":
        return Precision("int8", "int8", "int8", "int8")
    return Precision(name, name, name, name)


def apply(lm, precision: Precision, release=None, fused: bool = True, int8_copy=None) -> None:
    """Prepare the language model's matrices for inference in `precision`, in place
    (matrices.prepare says what `release` and `int8_copy` are), and, with `fused`, give it the
    one-call decode steps and choice scoring of fused.py where this machine can build them and
    the matrices are of a kind step.c reads (plain float16, bfloat16 or int8), and step.c's work
    for prefills (passes.py: attention for any precision but float32, the layers' passes in
    bfloat16)."""
    prepare(lm, precision, release, int8_copy)
    if fused:
        from mellow_cli.runtime.fused import attach
        from mellow_cli.runtime.passes import PrefillLayer, attention

        lm.fused = attach(lm)
        # float32, the exact path, keeps torch's attention as well as its decode step.
        attend = attention() if precision.name != "float32" else None
        layer_pass = PrefillLayer(attend) if attend is not None and precision.prefill == "bfloat16" else None
        for layer in lm.model.layers:
            layer.self_attn.attend = attend
            layer.prefill = layer_pass


# --- auto: measure once per CPU and torch ---------------------------------------------------

# What auto chooses between, all faithful (float32 residual stream, norms, attention and cache).
CANDIDATES = (
    EXACT,
    Precision("float16", "float16", "float16", "float32"),
    # float16's matrix-vector kernel for one row, a bfloat16 copy of the layers' for several
    # where the CPU multiplies bfloat16 matrices natively: about twice one copy's memory
    Precision("float16", "float16", "float16", "bfloat16"),
    Precision("bfloat16", "bfloat16", "bfloat16", "bfloat16"),
    Precision("bfloat16", "bfloat16", "bfloat16", "bfloat16", packed=True),
    Precision("float16", "float16", "float16", "float16", packed=True),
)
# Bumped whenever what a candidate runs changes while its fields stay the same (2: Dense keeps a
# copy for several rows; 3: but not for the head; 4: the one-call decode step), so that caches
# measured on the old kernels are measured again.
KERNELS = 4
# A workload to choose by: one prefix of two 10 s clips and a prompt, then a short answer.
PREFIX, ANSWER = 389, 32


_measured: dict[str, Precision] = {}  # this process's choices, whatever cache folder is in use


def auto(progress: bool = False) -> Precision:
    key = machine_key()
    if key in _measured:
        return _measured[key]
    path = _cache_file()
    known = _read(path, key)
    if key in known:
        choice = Precision(**{**known[key], "chosen_by": f"auto: measured before ({path})"})
    else:
        from mellow_cli.events import note

        note("timing this CPU's kernels to choose the fastest precision (once, a few seconds)", progress)
        choice, timings = measure()
        known[key] = {**asdict(choice), "timings_ms": timings}
        _write(path, known)
    _measured[key] = choice
    return choice


def machine_key() -> str:
    """This CPU, torch and thread count, and the candidates chosen among: a choice is kept per key."""
    import hashlib

    from mellow_cli.runtime.machine import cpu_key

    # A choice made among other candidates (an older or newer release's) is measured again.
    among = hashlib.sha256(repr((KERNELS, CANDIDATES)).encode()).hexdigest()[:8]
    return f"{cpu_key()}-torch{torch.__version__}-threads{torch.get_num_threads()}-among{among}"


def measure(hidden: int = 576, intermediate: int = 1536, kv: int = 192, vocab: int = 49152, layers: int = 30,
            heads: int = 9, timed_layers: int = 10, rounds: int = 3, fused: bool = True
            ) -> tuple[Precision, dict[str, float]]:
    """Time each candidate on matrices of the language model's shapes (v0's by default): a decode
    step (one position through every layer's q/k/v, o, gate/up and down, then the head) and a
    prefill (PREFIX positions through the layers, the head for the last one only, as
    `generate.prefill` does). `timed_layers` layers stand for all `layers` (their weights, tens
    of MB, still come from memory as the model's do). The least time for PREFIX + ANSWER wins;
    leaving float32 needs a 10% win. The shapes matter: a kernel fast on the MLP's tall matrices
    can be slow on the head or the small attention ones.

    The candidates take turns, `rounds` times, and each keeps its best time: another process
    that loads the CPU for a while then slows every candidate alike instead of the ones measured
    while it ran (timing them one after another, a busy minute once made float32 look fastest).

    With `fused`, a candidate whose matrices the one-call step of runtime/fused.py reads has its
    decode step timed through it too, attention over PREFIX positions and all, and keeps the
    faster of the two; torch's kernels are timed on their products alone, so the comparison
    leans toward them (and toward float32, the exact path)."""
    from mellow_cli.runtime.fused import decode_seconds

    gen = torch.Generator().manual_seed(0)

    def weight(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, columns, generator=gen) * 0.02

    stack = [(weight(hidden + 2 * kv, hidden), weight(hidden, hidden), weight(2 * intermediate, hidden),
              weight(hidden, intermediate)) for _ in range(timed_layers)]
    head = weight(vocab, hidden)
    inputs = {n: (torch.randn(1, 1, n, generator=gen), torch.randn(1, PREFIX, n, generator=gen))
              for n in (hidden, intermediate)}
    scale = layers / timed_layers
    runs = [c for c in CANDIDATES if not c.packed or packed_available(DTYPES[c.store])]
    decode, prefill = [float("inf")] * len(runs), [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, candidate in enumerate(runs):
            make = maker(candidate)  # one candidate in memory at a time
            matrices = [(make(w), inputs[w.shape[1]]) for ws in stack for w in ws]
            top = head_maker(candidate)(head)
            one = inputs[hidden][0]
            last = _time(lambda: top(one), repeat=3)  # one position through the head, in both
            step = _time(lambda: [m(x[0]) for m, x in matrices], repeat=3) * scale + last
            if fused:  # the one-call step where it can run these matrices (runtime/fused.py)
                fast = decode_seconds([tuple(m for m, _ in matrices[j:j + 4]) for j in range(0, len(matrices), 4)],
                                      top, heads, kv // (hidden // heads), layers, PREFIX,
                                      lambda fn: _time(fn, repeat=3))
                step = step if fast is None else min(step, fast)
            whole = _time(lambda: [m(x[1]) for m, x in matrices], repeat=1) * scale + last
            decode[i], prefill[i] = min(decode[i], step), min(prefill[i], whole)
            del matrices, top
    timings, best = {}, None
    for candidate, d, f in zip(runs, decode, prefill):
        cost = d * ANSWER + f
        timings[candidate.describe()] = round(cost * 1e3, 1)
        if best is None or cost < best[0] * 0.9:
            best = (cost, candidate)
    summary = "; ".join(f"{k}: {v} ms" for k, v in timings.items())
    return replace(best[1], chosen_by=f"auto: measured now ({summary})"), timings


def _time(fn, repeat: int) -> float:
    """The least of `repeat` timed calls after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _cache_file() -> Path:
    from mellow_cli.files import cache_dir

    return cache_dir() / "precision.json"


def _read(path: Path, key: str) -> dict:
    """The choices measured before, by machine key, each a Precision's fields checked by type and
    range (others', of other releases, that are not are left out). A file that cannot be read as
    such, or whose entry for `key` is not one, is said once and measured again."""
    from mellow_cli.errors import MellowError
    from mellow_cli.events import note
    from mellow_cli.files import read_table

    try:
        data = read_table(path, "json") or {}
    except MellowError as e:
        note(f"{e}; measuring again")
        return {}
    known = {k: fields for k, fields in ((k, _fields(v)) for k, v in data.items()) if fields is not None}
    if key in data and key not in known:
        note(f"{path}: the entry for this machine is not a precision this release runs; measuring again")
    return known


def _fields(entry) -> dict | None:
    """A Precision's fields but chosen_by, as precision.json keeps them; None where one is of the
    wrong type or names a kind of matrix there is no maker for."""
    fields = {f: entry.get(f) for f in ("name", "store", "decode", "prefill", "packed")} if isinstance(entry, dict) else {}
    kinds = [fields.get(f) for f in ("name", "store", "decode", "prefill")]
    ok = kinds == ["int8"] * 4 and fields["packed"] is False or all(isinstance(k, str) and k in DTYPES for k in kinds)
    return fields if ok and isinstance(fields.get("packed"), bool) else None


def _write(path: Path, known: dict) -> None:
    """Best effort: an unwritable cache only means measuring again next time."""
    from mellow_cli.files import write_json_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, known)
    except OSError:
        pass
