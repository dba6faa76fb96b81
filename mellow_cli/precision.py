"""How the language model's matrices are stored and multiplied: `--dtype`.

- `float32` is the reference's arithmetic: the exact path, token for token the golden vectors.
- `float16`, `bfloat16` store the matrices in half precision (half the bytes a decode step reads)
  and multiply in it where the CPU is fast at it; the residual stream, norms, attention and the KV
  cache stay float32, so answers part from float32's only at near ties.
- `int8` stores them as 8-bit integers with one scale per output row: a quarter of float32's
  bytes; the activations are never rounded to 8 bits (the one-call decode step of model/fused.py
  rounds them to 16, per block of 64), so SmolLM2's logits stay within about 2 of float32's
  (`mellow bench speed --dtype int8` reports the agreement).
- `auto`, the default, takes the fastest faithful kernels of this CPU: which half precision (if
  any) beats float32 at a decode step and at a prefill is not a property of the instruction set
  alone (the same AVX512 machine can be fast at bfloat16 matrix-matrix products and slow at
  float16 matrix-vector ones), so it is measured once on matrices of the model's shapes and kept
  in the cache, keyed by the CPU and torch.

Only the language model's linears and output head change, and, where several rows are multiplied
in bfloat16 (auto on a CPU that is fast at it, or `bfloat16`), the HTSAT encoder's linears too
(`apply_encoder`): its convolution, norms and attention, and the mapper, stay float32 on a CPU.
Where the head is a plain matrix (float16, bfloat16), token embeddings are read from it
(the two are tied) and the float32 table is dropped: the prompt's embeddings then carry the
head's rounding, as every product already does. On a GPU the language model runs wholly in the
half precision.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UsageError

NAMES = ("auto", "float32", "float16", "bfloat16", "int8")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """What each prepared matrix is stored in and multiplied in (int8: stored as int8, multiplied
    by dynamic quantization, activations float32)."""

    name: str  # float32, float16, bfloat16, int8
    store: str
    decode: str
    prefill: str
    packed: bool = False  # stored in oneDNN's blocked layout (Packed), else a plain tensor (Dense)
    chosen_by: str = "--dtype"  # or "auto: measured ..."

    def describe(self) -> str:
        if self.name == "int8":
            return "int8 (8-bit weights, per-channel scales)"
        layout = ", oneDNN-packed" if self.packed else ""
        if self.store == self.decode == self.prefill:
            return self.name + layout
        if self.prefill not in (self.store, "float32"):  # the layers' Dense keep a copy (head_maker)
            return f"{self.store} weights for one row, a {self.prefill} copy of the layers' for several"
        return f"{self.store} weights{layout} (decode in {self.decode}, prefill in {self.prefill})"


EXACT = Precision("float32", "float32", "float32", "float32")


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
    """Prepare the language model's matrices for inference in `precision`, in place (`release`:
    see LlamaForCausalLM.prepare; `int8_copy`: where int8 matrices rounded once are kept, an
    int8_copy.Int8Copy), and, with `fused`, give it the one-call decode steps and
    choice scoring of model/fused.py where this machine can build them and the matrices are of
    a kind step.c reads (plain float16, bfloat16 or int8), and step.c's work for prefills
    (model/passes.py: attention for any precision but float32, the layers' passes in bfloat16)."""
    matrix, head = maker(precision), head_maker(precision)
    kept = int8_copy.read() if int8_copy is not None and precision.name == "int8" else None
    if kept is not None:
        matrix, head = int8_copy.makers(kept)
    lm.prepare(matrix, release, head=head)
    if int8_copy is not None and precision.name == "int8" and kept is None:
        int8_copy.write(lm.matrices())
    if fused:
        from .model.fused import attach
        from .model.passes import PrefillLayer, attention

        lm.fused = attach(lm)
        # float32, the exact path, keeps torch's attention as well as its decode step.
        attend = attention() if precision.name != "float32" else None
        layer_pass = PrefillLayer(attend) if attend is not None and precision.prefill == "bfloat16" else None
        for layer in lm.model.layers:
            layer.self_attn.attend = attend
            layer.prefill = layer_pass


def apply_encoder(htsat, precision: Precision, release=None) -> bool:
    """Multiply the HTSAT encoder's linears (two thirds of its time) through a bfloat16 copy,
    oneDNN-packed, where `precision` multiplies several rows in bfloat16 on a CPU that packs it:
    a 10 s clip's embeddings then stay within 0.2% of float32's (their norm) for a third less
    time. Biases, and each MLP's GELU, are applied inside oneDNN's product, to its float32 sums
    before the output is rounded, and an MLP's hidden activations stay bfloat16 between its two
    products (its second product rounds them so anyway), as do each window attention's queries,
    keys and values: its attention then runs in bfloat16 too (torch's flash kernel sums in float32),
    a fifteenth less time for the same error. The float32 weights go, each handed to
    `release` first (as in LlamaForCausalLM.prepare). The exact path (float32) and float16
    leave the encoder as it is. Whether it changed."""
    from .model.htsat import MLP, WindowAttention

    if precision.prefill != "bfloat16" or not packed_available(torch.bfloat16):
        return False
    for module in list(htsat.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MLP) and child.fc1.weight.device.type == "cpu":
                first = PackedLinear(child.fc1, torch.bfloat16, post="gelu", keep=True)
                setattr(module, name, torch.nn.Sequential(first, PackedLinear(child.fc2, torch.bfloat16)))
                if release is not None:
                    release([child.fc1.weight.detach(), child.fc2.weight.detach()])
            elif isinstance(child, torch.nn.Linear) and child.weight.device.type == "cpu":
                keep = isinstance(module, WindowAttention) and name == "qkv"
                setattr(module, name, PackedLinear(child, torch.bfloat16, keep=keep))
                if release is not None:
                    release([child.weight.detach()])
    return True


class PackedLinear(torch.nn.Module):
    """An encoder's nn.Linear multiplied through a Packed copy in `dtype`, its bias added (and
    `post`, "gelu", applied) by oneDNN to the float32 sums; the output in the input's dtype, or in
    `dtype` with `keep` (for a product that rounds it so anyway). The float32 weight goes (the
    copy is the only one)."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype, post: str = "none", keep: bool = False):
        super().__init__()
        self.matrix = Packed(linear.weight, dtype)
        self.bias = linear.bias
        self.post, self.keep = post, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x, self.bias, self.post, self.keep)


# From how many rows the head multiplies through a float32 copy (Dense.wide_from): at the sizes
# of a batch's answer choices, widening the float16 head at each call cost three times the
# product (v0, 60 choice tokens: 61 ms against 20). One question's choices stay below it.
HEAD_WIDE_FROM = 32


def head_maker(precision: Precision):
    """weight (vocab, hidden) -> the prepared output head. As `maker`, except that a half-precision
    copy for several rows is not made for the head: its products are the logits themselves, and
    bfloat16's 8-bit mantissa moves them enough to flip near-tie picks (choices after a batch's
    prefill, greedy tokens in a batch). Several positions multiply in float32 instead: a few
    (one question's choices) widen the float16 head per call; from HEAD_WIDE_FROM rows on (a
    batch's choices) a float32 copy does, made at the first such call (113 MB for v0), so
    a question alone does not hold it. Rows of one position each (a batch's last positions)
    stay on the float16 kernel below that."""
    if precision.name == "int8" or precision.packed or precision.prefill in (precision.store, "float32"):
        return maker(precision)
    store, decode = DTYPES[precision.store], DTYPES[precision.decode]
    return lambda w: Dense(w, store, decode, torch.float32, wide_from=HEAD_WIDE_FROM)


def maker(precision: Precision):
    """weight (out, in) -> the prepared matrix for `precision`."""
    if precision.name == "int8":
        return Int8Matrix
    if precision.store == precision.decode == precision.prefill == "float32":
        return _float32
    if precision.packed:
        return lambda w: Packed(w, DTYPES[precision.store])
    store, decode, prefill = (DTYPES[d] for d in (precision.store, precision.decode, precision.prefill))
    return lambda w: Dense(w, store, decode, prefill)


# --- the matrices ---------------------------------------------------------------------------


class Dense:
    """A plain tensor stored in `store`, multiplied in `decode` for one row (a decode step, bound
    by reading the weights) and in `prefill` for several (a prefill, choice scoring, a batch of
    decode steps: bound by arithmetic). Inputs and outputs stay in the activations' dtype, so the
    residual stream and the KV cache keep theirs.

    A half-precision `prefill` other than `store` gets a copy of its own, made once (oneDNN-packed
    where it can be): on a CPU whose float16 matrix-vector product is fast, that product gains
    nothing from more rows (it costs ~6x at 8 rows) while a bfloat16 matrix-matrix one does, and
    converting every weight for each call would cost a prefill ~20%. A float32 `prefill` widens
    the weights per call instead (a float32 copy would triple the memory), and only for several
    positions: a batch of decode steps stays on the stored kernel."""

    def __init__(self, weight: torch.Tensor, store: torch.dtype, decode: torch.dtype, prefill: torch.dtype,
                 wide_from: int = 0):
        self.weight = weight.detach().to(store)
        self.decode, self.prefill = decode, prefill
        self.copy = None
        # With a float32 `prefill`: from this many rows on, a float32 copy made at the first such
        # call takes them (head_maker); 0: never.
        self.wide_from, self.wide = wide_from, None
        if prefill != store and prefill != torch.float32:
            self.copy = (Packed(weight, prefill) if weight.device.type == "cpu" and packed_available(prefill)
                         else Dense(weight, prefill, prefill, prefill))
        self.nbytes = self.weight.numel() * self.weight.element_size()  # what one decode step reads

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the stored matrix (the head's are the token embeddings), in its dtype."""
        return F.embedding(ids, self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy is not None:
            # Several rows; or one already in the copy's dtype: a prefill's (passes.PrefillLayer),
            # whose last layer may compute one position only (LlamaForCausalLM.hidden's `keep`).
            if x.numel() != x.shape[-1] or x.dtype == self.prefill:
                return self.copy(x)
            dtype = self.decode
        elif self.wide_from and x.numel() >= self.wide_from * x.shape[-1]:
            if self.wide is None:
                self.wide = _float32(self.weight.float())
            return self.wide(x)
        else:
            dtype = self.decode if x.shape[-2] == 1 else self.prefill
        w = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return F.linear(x.to(dtype), w).to(x.dtype)


class Packed:
    """A matrix reordered once into oneDNN's blocked layout, multiplied by oneDNN's
    linear (what torch.compile's CPU backend uses for frozen weights): its matrix-vector product
    streams the packed weights at close to memory speed where the plain kernel does not."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), 1)
        self.nbytes = weight.numel() * torch.finfo(dtype).bits // 8

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, post: str = "none",
                 keep: bool = False) -> torch.Tensor:
        """x @ weight.T (+ `bias`, then `post`: "gelu" is erf's, as F.gelu; both applied to the
        float32 sums) in the input's dtype, or in the matrix's with `keep`."""
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, bias, post, [],
                                               "none" if post == "gelu" else "")
        return y if keep else y.to(x.dtype)


def _float32(weight: torch.Tensor):
    """float32 as the reference computes it, in oneDNN's packed layout on a CPU that has it: its
    matrix-vector product (a decode step) runs about twice as fast as the plain kernel's, and its
    sums differ from the plain kernel's only in rounding order, as another thread count's do (the
    golden tests hold it to the reference's tokens)."""
    if weight.device.type == "cpu" and packed_available(torch.float32):
        return Packed(weight, torch.float32)
    return Dense(weight, torch.float32, torch.float32, torch.float32)


_packable: dict[torch.dtype, bool] = {}


def packed_available(dtype: torch.dtype) -> bool:
    """Whether this torch can pack `dtype` matrices for oneDNN on this CPU (checked once)."""
    if dtype not in _packable:
        _packable[dtype] = _try_packed(dtype)
    return _packable[dtype]


def _try_packed(dtype: torch.dtype) -> bool:
    try:
        Packed(torch.ones(8, 8), dtype)(torch.ones(1, 1, 8))
        return True
    except (RuntimeError, AttributeError):
        return False



class Int8Matrix:
    """A matrix as int8 with one scale per output row (symmetric, round to nearest). A decode
    step multiplies it as it is stored (torch's int8-weight matrix-vector kernel, activations in
    bfloat16, a quarter of float32's bytes); several positions multiply a bfloat16 copy made on
    the fly, as compute, not bytes, bounds them. The activations are never rounded to 8 bits:
    dynamic int8 (activations rounded to 8 bits per token) moved SmolLM2's logits by 10+ where
    this moves them by about 2. (The one-call step, model/fused.py, reads `q` and `scale` as
    they are, and rounds activations to 16 bits per block of 64: far finer than the weights.)"""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self._hold(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale)

    @classmethod
    def stored(cls, q: torch.Tensor, scale: torch.Tensor) -> "Int8Matrix":
        """The matrix as an earlier one rounded it (int8_copy.py): `q` int8, `scale` float32."""
        matrix = cls.__new__(cls)
        matrix._hold(q, scale)
        return matrix

    def _hold(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.q, self.scale = q, scale
        self.scale_bf16 = scale.to(torch.bfloat16)
        self.nbytes = q.numel() + 4 * scale.numel()
        self.kernel_q = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if x.shape[-2] == 1 and _int8_matvec():
            if self.kernel_q is None:
                # torch's int8 kernel faults on weights that are not 32-byte aligned from 4 rows
                # on, as a matrix read from the int8 copy may be (memory-mapped where the file
                # puts it): such a one is copied for it, once. `q` itself stays: step.c reads it.
                self.kernel_q = self.q if self.q.data_ptr() % 64 == 0 else self.q.clone()
            y = torch._weight_int8pack_mm(flat, self.kernel_q, self.scale_bf16)
        else:
            y = F.linear(flat, self.q.to(torch.bfloat16) * self.scale_bf16[:, None])
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


_int8_kernel: list[bool] = []


def _int8_matvec() -> bool:
    """Whether this torch has the int8-weight kernel on the CPU (checked once)."""
    if not _int8_kernel:
        try:
            one = torch.ones(1, 8, dtype=torch.bfloat16)
            torch._weight_int8pack_mm(one, torch.ones(8, 8, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16))
            _int8_kernel.append(True)
        except (RuntimeError, AttributeError):
            _int8_kernel.append(False)
    return _int8_kernel[0]


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
        from .files import note

        note("timing this CPU's kernels to choose the fastest precision (once, a few seconds)", progress)
        choice, timings = measure()
        known[key] = {**asdict(choice), "timings_ms": timings}
        _write(path, known)
    _measured[key] = choice
    return choice


def machine_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line.split(":", 1)[1].strip() + ";"
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    import hashlib
    import platform

    cpu = hashlib.sha256((platform.machine() + platform.processor() + flags).encode()).hexdigest()[:16]
    # A choice made among other candidates (an older or newer release's) is measured again.
    among = hashlib.sha256(repr((KERNELS, CANDIDATES)).encode()).hexdigest()[:8]
    return f"{cpu}-torch{torch.__version__}-threads{torch.get_num_threads()}-among{among}"


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

    With `fused`, a candidate whose matrices the one-call step of model/fused.py reads has its
    decode step timed through it too, attention over PREFIX positions and all, and keeps the
    faster of the two; torch's kernels are timed on their products alone, so the comparison
    leans toward them (and toward float32, the exact path)."""
    from .model.fused import decode_seconds

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
            if fused:  # the one-call step where it can run these matrices (model/fused.py)
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
    from .loading import cache_dir

    return cache_dir() / "precision.json"


def _read(path: Path, key: str) -> dict:
    """The choices measured before, by machine key, each a Precision's fields checked by type and
    range (others', of other releases, that are not are left out). A file that cannot be read as
    such, or whose entry for `key` is not one, is said once and measured again."""
    from .errors import MellowError
    from .files import note, read_table

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
    from .files import write_json_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, known)
    except OSError:
        pass
