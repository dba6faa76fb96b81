"""The language model's decode step for one row as one call into C (step.c), built on this machine.

A step in eager torch is ~25 small operations per layer of a few microseconds each around the
matrix-vector products; at 135M parameters that overhead is a third of the step. step.c does the
same arithmetic as llama.py's forward in one call, reading the prepared matrices (float16,
bfloat16 or int8 weights; float32 activations, sums and KV cache) where `prepare` put them, and
writing keys and values into the same cache the torch prefill filled. float32 (the exact path)
never uses it.

It is compiled once per machine with the system's C compiler for the CPU it runs on
(`-march=native`), and kept in the cache beside the models, keyed by the source and the CPU. No
compiler, a failed build, or a build whose step disagrees with torch's on a small random model:
the torch step is used, as everywhere else, and `mellow env` says which step runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("step.c")
PER_LAYER = 12  # pointers per layer, step.c's enum
# How far the step's logits may be from float32 arithmetic on the same rounded weights, relative to
# the largest logit: float32 sums in another order differ in the last bits; int8 also rounds the
# activations to 16 bits (step.c), about 1e-4 on a small random model, while rounding the
# weights to 8 bits moves logits by 1e-2. A wrong index or a lost term moves them by far more.
BOUNDS = {"float16": 1e-5, "bfloat16": 1e-5, "int8": 1e-3}
KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.int8: 2}


class _Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "max_len",
                 "kind", "threads")] + [("eps", ctypes.c_double)]


_library: list = []  # [(the loaded library or None, what happened)], once per process


def library():
    """step.c compiled for this CPU, loaded and checked, or None where that cannot be done."""
    if not _library:
        lib, how = _build()
        if lib is not None and not _agrees(lib):
            lib, how = None, "the C step built here disagreed with float32 arithmetic, so torch's runs"
        _library.append((lib, how))
    return _library[0][0]


def status() -> str:
    """Which decode step a half-precision or int8 model runs here, and why (`mellow env`)."""
    library()
    return _library[0][1]


def attach(lm) -> "FusedStep | None":
    """A fused step for this prepared language model, or None (the torch step then runs)."""
    if not FusedStep.supports(lm):
        return None
    lib = library()
    return FusedStep(lm, lib) if lib is not None else None


def _build():
    """(library, what happened): step.c built (or found built) and loaded, or (None, why not)."""
    if os.environ.get("MELLOW_FUSED_STEP", "1").strip() == "0":
        return None, "torch's (MELLOW_FUSED_STEP=0)"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "torch's (no C compiler found to build the one-call step; set CC)"
    from mellow_cli.files import cache_dir
    from mellow_cli.precision import machine_key

    key = hashlib.sha256(SOURCE.read_bytes() + machine_key().encode() + compiler.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"step-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / "step.so"
                # -fno-math-errno lets expf vectorize; the sums stay in source order except where
                # step.c marks a loop `omp simd` (reordered as torch's own kernels reorder them).
                command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11",
                           "-fno-math-errno", str(SOURCE), "-o", str(built), "-lm"]
                subprocess.run(command, check=True, capture_output=True, timeout=120)
                os.replace(built, target)  # whole or not at all, if another process builds it too
        except subprocess.CalledProcessError as e:
            last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            return None, f"torch's ({compiler} could not build the one-call step: {last[0]})"
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"torch's (building the one-call step failed: {e})"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"torch's (the one-call step would not load: {e})"
    lib.mellow_step.restype = None
    lib.mellow_step.argtypes = [ctypes.POINTER(_Dims), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib, f"one call into C ({target}, built with {compiler} for this CPU)"


def _agrees(lib) -> bool:
    """Whether the built step gives, on a small random model in float16 and in int8, the logits
    that float32 arithmetic gives on the same rounded weights (a compiler that miscompiles step.c
    must not change answers)."""
    from mellow_cli.config import MellowConfig

    cfg = MellowConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) * (1.0 if "norm" in name or "embed" in name else 0.1)
             for name, shape in _shapes(cfg).items()}
    prompt = torch.randn(1, 5, cfg.hidden_size, generator=generator)
    return all(_error(lib, cfg, state, prompt, name) < BOUNDS[name] for name in ("float16", "int8"))


def _shapes(cfg) -> dict[str, tuple[int, ...]]:
    from mellow_cli.model.llama import LlamaForCausalLM

    return {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}


@torch.inference_mode()
def _error(lib, cfg, state: dict, prompt: torch.Tensor, name: str, steps: int = 3) -> float:
    """The largest difference between the fused step's logits and float32 arithmetic on the same
    rounded weights, relative to the largest logit, over `steps` steps after a prefill of
    `prompt`."""
    from mellow_cli.model.llama import LlamaForCausalLM
    from mellow_cli.precision import Precision, apply, head_maker, maker

    precision = Precision(name, name, name, "float32")

    def rounded(weight: torch.Tensor) -> torch.Tensor:
        m = maker(precision)(weight)
        return m.q.float() * m.scale[:, None] if name == "int8" else m.weight.float()

    models = []
    for prepare in (True, False):
        lm = LlamaForCausalLM(cfg)
        lm.load_state_dict(state)
        if prepare:
            apply(lm, precision, fused=False)
        else:  # float32 on the weights as `prepare` rounds them; the head untied where int8 keeps the table
            for module in lm.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight = torch.nn.Parameter(rounded(module.weight))
            head = head_maker(precision)(lm.lm_head.weight)
            lm.lm_head.weight = torch.nn.Parameter(head.q.float() * head.scale[:, None] if name == "int8"
                                                   else head.weight.float())
            if name != "int8":
                lm.model.embed_tokens.weight = lm.lm_head.weight
        lm.eval().setup_cache(1, prompt.shape[1] + steps)
        models.append(lm)
    fused, exact = FusedStep(models[0], lib), models[1]
    token = exact(inputs_embeds=prompt, start=0).logits[:, -1].argmax(-1)
    for mine, theirs in zip(models[0].model.layers, exact.model.layers):  # the same cache to start from
        mine.self_attn.kv_cache.k.copy_(theirs.self_attn.kv_cache.k)
        mine.self_attn.kv_cache.v.copy_(theirs.self_attn.kv_cache.v)
    worst = 0.0
    for pos in range(prompt.shape[1], prompt.shape[1] + steps):
        got = fused(token, pos)[0, -1]
        expected = exact(input_ids=token[:, None], start=pos).logits[0, -1]
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
        token = expected.argmax()[None]
    return worst


def _stored(matrix) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weights, per-row scales or None) of a prepared matrix step.c can read, else None."""
    from mellow_cli.precision import Dense, Int8Matrix

    if isinstance(matrix, Int8Matrix):
        return matrix.q, matrix.scale
    if isinstance(matrix, Dense) and matrix.weight.dtype in (torch.float16, torch.bfloat16) \
            and matrix.decode == matrix.weight.dtype:
        return matrix.weight, None
    return None


class FusedStep:
    """Decode steps of one prepared language model through step.c, on the cache that
    `lm.setup_cache` made (re-read whenever the cache changes)."""

    def __init__(self, lm, lib):
        self.lm, self.lib = lm, lib
        stored = [_stored(m) for m in lm.matrices()]
        kinds = {KINDS[w.dtype] for w, _ in stored}
        if len(kinds) != 1:
            raise ValueError("matrices of several kinds")
        self.weights = stored  # kept alive with their pointers
        c = lm.config
        self.dims = _Dims(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                          c.hidden_size // c.num_attention_heads, c.intermediate_size, c.vocab_size, 0,
                          kinds.pop(), torch.get_num_threads(), c.rms_norm_eps)
        self._cache_key = None

    @staticmethod
    def supports(lm) -> bool:
        if not lm.prepared or lm.model.embed_tokens.weight.device.type != "cpu":
            return False
        if lm.model.embed_tokens.weight.dtype != torch.float32:
            return False
        stored = [_stored(m) for m in lm.matrices()]
        return all(s is not None for s in stored) and len({w.dtype for w, _ in stored}) == 1

    def _pointers(self):
        caches = [layer.self_attn.kv_cache for layer in self.lm.model.layers]
        key = tuple((c.k.data_ptr(), c.v.data_ptr()) for c in caches)
        if key == self._cache_key:
            return
        first = caches[0].k
        if first.shape[0] != 1 or any(not (c.k.is_contiguous() and c.v.is_contiguous()) for c in caches):
            raise ValueError("the cache is not one contiguous row")
        self.dims.max_len = first.shape[2]
        self.dims.threads = torch.get_num_threads()
        pointers, stored = [], iter(self.weights)
        for layer, cache in zip(self.lm.model.layers, caches):
            mats = [next(stored) for _ in range(4)]
            pointers += [w.data_ptr() for w, _ in mats]
            pointers += [s.data_ptr() if s is not None else 0 for _, s in mats]
            pointers += [layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                         cache.k.data_ptr(), cache.v.data_ptr()]
        head, scale = next(stored)
        pointers += [self.lm.model.norm.weight.data_ptr(), head.data_ptr(), scale.data_ptr() if scale is not None else 0]
        self.pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        c = self.dims
        self.scratch = torch.empty(c.hidden * 3 + (c.heads + 2 * c.kv_heads) * c.head_dim + c.intermediate * 2
                                   + max(c.hidden, c.intermediate) + c.heads * c.max_len + 16)  # see step.c
        self.cos, self.sin = self.lm.model.rotary_emb.span(0, c.max_len, torch.float32)
        self._cache_key = key

    def takes(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, start: int | None) -> bool:
        """Whether a forward call is a decode step this can run: one token of one row, at a
        position inside a cache of one row."""
        if input_ids is None or inputs_embeds is not None or start is None or input_ids.shape != (1, 1):
            return False
        cache = self.lm.model.layers[0].self_attn.kv_cache
        return cache is not None and cache.k.shape[0] == 1 and start < cache.k.shape[2]

    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """token (1,) at position `pos` -> float32 logits (1, 1, vocab)."""
        self._pointers()
        x = self.lm.embed(token[:1]).float().contiguous()
        logits = torch.empty(1, 1, self.dims.vocab)
        d = self.dims.head_dim
        self.lib.mellow_step(ctypes.byref(self.dims), self.pointers, x.data_ptr(), pos,
                             self.cos.data_ptr() + pos * d * 4, self.sin.data_ptr() + pos * d * 4,
                             self.scratch.data_ptr(), logits.data_ptr())
        return logits
