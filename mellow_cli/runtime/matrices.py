"""How the language model's matrices are held and multiplied once prepared for a precision:
`Precision` names what each one is stored in and multiplied in; `maker` and `head_maker` turn a
float weight into a prepared matrix (`Dense`, `Packed`, `Int8Matrix`); `prepare` gives a language
model all of its matrices. Which precision to use, and `--dtype auto`'s measurement, are
precision.py's; the C step that reads these matrices is fused.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def prepare(lm, precision: Precision, release=None, int8_copy=None) -> None:
    """The language model's matrices prepared for `precision`, in place (`release`: see
    LlamaForCausalLM.prepare; `int8_copy`: where int8 matrices rounded once are kept, an
    int8_copy.Int8Copy, read instead of rounding again and written the first time)."""
    matrix, head = maker(precision), head_maker(precision)
    kept = int8_copy.read() if int8_copy is not None and precision.name == "int8" else None
    if kept is not None:
        matrix, head = int8_copy.makers(kept)
    lm.prepare(matrix, release, head=head)
    if int8_copy is not None and precision.name == "int8" and kept is None:
        int8_copy.write(lm.matrices())


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
    this moves them by about 2. (The one-call step, runtime/fused.py, reads `q` and `scale` as
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
