"""Networks built empty and filled from a checkpoint, for every family: the SmolLM2 language model
all of them hold (built, loaded alone, its head tied to its embedding), building on the `meta`
device without initialising anything, adopting a state dict strictly without copying (gpt-fast's
recipe), and comparing a checkpoint's keys, shapes and dtypes with a network's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mellow_cli.errors import ModelError


def build_lm(cfg):
    """A randomly initialised (or, under `torch.device('meta')`, empty) SmolLM2 of `cfg`'s size:
    our own module with transformers' parameter names (runtime/llama.py says why)."""
    from mellow_cli.runtime.llama import LlamaForCausalLM

    return LlamaForCausalLM(cfg).eval()


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                   "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


class Network(nn.Module):
    """What every family's network is besides its own modules: built from its config (`cfg`),
    holding the SmolLM2 language model as `lm` and the module that hears clips as
    `audio_encoder`."""

    @classmethod
    def from_config(cls, cfg, device: "str | torch.device" = "cpu") -> "Network":
        """On a real device: random weights, ready to run. On "meta": no storage at all and
        nothing initialised; follow with a strict load that adopts a checkpoint's tensors."""
        meta = torch.device(device).type == "meta"
        with torch.device(device), (skip_init() if meta else contextlib.nullcontext()):
            model = cls(cfg)
        return model.eval()


@contextlib.contextmanager
def skip_init():
    """Make torch.nn.init a no-op while building on the meta device. There is nothing to fill
    there, and torch runs meta-device init through its Python reference kernels, whose first use
    imports torch._dynamo: 1.3 s of every cached `mellow ask` (what transformers' own
    `no_init_weights` avoids too)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


@dataclass(frozen=True)
class KeyReport:
    """How a state dict differs from the model's: each list holds key names (or descriptions)."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # "key [checkpoint shape] vs [model shape]", or the same with dtypes

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 5) -> str:
        parts = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("wrong shape or type", self.mismatched)):
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:limit])}{more}")
        return "; ".join(parts) or "all keys match"


Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # key -> (shape, dtype)


def compare_layouts(found: Layout, expected: Layout, same_dtype=lambda a, b: a == b) -> KeyReport:
    """The one key check behind every load: a checkpoint's keys, shapes and dtypes (read from
    tensors, or from a safetensors header without reading any) against the network's."""
    mismatched = []
    for k, (shape, dtype) in expected.items():
        if k not in found:
            continue
        got_shape, got_dtype = found[k]
        if tuple(got_shape) != tuple(shape):
            mismatched.append(f"{k} {list(got_shape)} vs {list(shape)}")
        elif not same_dtype(got_dtype, dtype):
            mismatched.append(f"{k} {got_dtype} vs {dtype}")
    return KeyReport(missing=[k for k in expected if k not in found],
                     unexpected=[k for k in found if k not in expected], mismatched=mismatched)


def layout_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def normalize_state_dict(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Strip a DataParallel `module.` prefix and give embedding and head one tensor.

    The reference loads the checkpoint into a tied SmolLM2 by copying, key by key; `lm_head.weight`
    comes last, so if the two stored tensors ever differed the head's values would be the ones in
    use for both. We do the same explicitly. A checkpoint without the head key (an LM exported
    tied) gets it from the embedding. `prefix` is where the LM's keys start ("" for an LM alone).
    """
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    embed, head = prefix + "model.embed_tokens.weight", prefix + "lm_head.weight"
    if head in sd:
        sd[embed] = sd[head]
    elif embed in sd:
        sd[head] = sd[embed]
    return sd


def key_report(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> KeyReport:
    """Compare a state dict with the model's keys, shapes and dtypes (for a raw checkpoint, pass
    it through `normalize_state_dict` first, as `load_weights` does)."""
    return compare_layouts(layout_of(sd), layout_of(model.state_dict(keep_vars=True)))


def load_lm(cfg, sd: Mapping[str, torch.Tensor]):
    """The language model alone, from `LlamaForCausalLM` keys (the tied head key optional)."""
    with torch.device("meta"):
        lm = build_lm(cfg)
    assign(lm, normalize_state_dict(sd, prefix=""), f"the {cfg.name} language model")
    tie_lm_head(lm)
    init_lm_buffers(lm)
    return lm.eval()


def assign(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    report = key_report(module, sd)
    if not report.ok:
        raise ModelError(f"checkpoint does not fit {what}: {report.describe()}")
    module.load_state_dict(sd, strict=True, assign=True)


def tie_lm_head(lm) -> None:
    # assign=True gives each key its own Parameter; one shared Parameter keeps them tied for good.
    lm.lm_head.weight = lm.model.embed_tokens.weight


def init_lm_buffers(lm) -> None:
    from mellow_cli.runtime.llama import init_rotary

    init_rotary(lm)


def check_filled(model: nn.Module) -> None:
    """ModelError if a meta build left any tensor without data after loading."""
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ModelError(f"tensors left without data after loading: {', '.join(leftover[:5])}")


def fresh_weights(family, cfg, seed: int) -> nn.Module:
    """Random weights for `cfg`, seeded. The language model gets transformers' Llama init (normal,
    std 0.02): torch's default N(0, 1) embedding, tied to the output head, starts at a loss near 60."""
    torch.manual_seed(seed)
    net = family.build(cfg, "cpu")
    for module in net.lm.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    return net
