"""The optimizer side of a training step: which weights train, the optimizer, the learning-rate
schedule and gradient clipping, for both recipes (recipe.py).

The adaptive clipping follows the authors' `GradNormTracker` (soham97/mellow, branch `training`,
utils/utils.py) rule for rule; AdaptiveClip's docstring spells it out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mellow_cli.errors import UsageError
from mellow_cli.train.recipe import FREEZABLE, TrainOptions

def freeze(net, parts: tuple[str, ...]) -> None:
    """requires_grad off for the frozen parts (and for weights the forward pass never uses or
    the family holds fixed)."""
    from mellow_cli.models.family import family_of

    unknown = [p for p in parts if p not in FREEZABLE]
    if unknown:
        raise UsageError(f"--freeze: unknown part {unknown[0]!r}: use {', '.join(FREEZABLE)} or none")
    family = family_of(net.cfg)
    net.requires_grad_(True)
    for name in (*family.unused(), *(family.parts()[p] for p in parts)):
        net.get_submodule(name).requires_grad_(False)
    for name in family.fixed():
        net.get_parameter(name).requires_grad_(False)


def train_mode(net, encoder: str = "eval") -> None:
    """Training mode for the projector's dropout. The encoder stays in eval mode (Mellow's bn0
    keeps the statistics it was loaded with) unless `encoder` is "train": then its training-time
    behaviour is on (Mellow: SpecAugment, DropPath, bn0 normalising with each batch), as the
    authors' model does in training even with the encoder frozen."""
    from mellow_cli.models.family import family_of

    net.train()
    if encoder != "train":
        family_of(net.cfg).frozen_encoder(net).eval()


def optimizer_for(net, opts: TrainOptions) -> torch.optim.Optimizer:
    """adamw: AdamW, matrices and embeddings decay, norms and biases do not. adam: torch's Adam
    with its coupled L2 `weight_decay` on every trainable tensor, in one group (theirs:
    group_weight_decay_params with exclude_bias_bn_from_weight_decay False returns one list)."""
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise UsageError("--freeze leaves nothing to train")
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=opts.lr, betas=tuple(opts.betas), weight_decay=opts.weight_decay)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opts.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=tuple(opts.betas))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then a cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_for(optimizer, opts: TrainOptions, total: int, per_epoch: int):
    """step-cosine: lr_factor per optimizer step. epoch-cosine: the factor of the epoch the step
    falls in, over the run's epochs (CosineAnnealingLR(T_max=epochs) stepped once per epoch, in
    closed form); `per_epoch` is optimizer steps per epoch."""
    if opts.schedule == "epoch-cosine":
        epochs = max(1, math.ceil(total / per_epoch))
        factor = lambda s: lr_factor(s // per_epoch, opts.warmup_steps or 0, epochs, opts.min_lr_ratio)  # noqa: E731
    else:
        warmup = opts.warmup_steps if opts.warmup_steps is not None else max(1, total // 20)
        factor = lambda s: lr_factor(s, warmup, total, opts.min_lr_ratio)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class AdaptiveClip:
    """Per-tensor running gradient norms and one scale for all gradients (the authors' rule).

    Every tensor with a gradient keeps two running norms, of its L2 norm and of its largest
    absolute entry, both starting at (initial, 10 x initial). For each tensor and each of the two
    norms n with running value r: the limit is 2.5 r; if n exceeds it the step's scale becomes
    min(scale, 2.5 r / n) and n is capped at 2.5 x the limit before it enters the running value;
    then r <- 0.995 r + 0.005 n. After all tensors, every gradient is multiplied by the scale (when
    below 1). The running norms are part of the run's state (state.pt, "clip")."""

    overdrive = 2.5
    momentum = 0.995

    def __init__(self, initial: float):
        self.initial = (initial, 10 * initial)
        self.running: dict[str, tuple[float, float]] = {}

    def _track(self, norm: float, running: float, scale: float) -> tuple[float, float]:
        limit = running * self.overdrive
        if norm > limit:
            scale = min(scale, limit / norm)
            norm = min(norm, limit * self.overdrive)  # one outlier moves the running norm only so far
        return self.momentum * running + (1 - self.momentum) * norm, scale

    def __call__(self, named_params) -> tuple[float, float]:
        """Clip in place; returns (L2 norm of the per-tensor L2 norms, the scale applied)."""
        scale, norms = 1.0, []
        grads = [(n, p.grad) for n, p in named_params if p.grad is not None]
        for name, g in grads:
            g = g.detach().flatten()
            l2, top = torch.linalg.norm(g, 2.0).item(), torch.linalg.norm(g, math.inf).item()
            norms.append(l2)
            run_l2, run_top = self.running.get(name, self.initial)
            run_l2, scale = self._track(l2, run_l2, scale)
            run_top, scale = self._track(top, run_top, scale)
            self.running[name] = (run_l2, run_top)
        if scale < 1.0:
            for _, g in grads:
                g.detach().mul_(torch.tensor(scale, device=g.device))
        return torch.linalg.norm(torch.tensor(norms), 2.0).item(), scale

    def state_dict(self) -> dict:
        return dict(self.running)

    def load_state_dict(self, state: dict) -> None:
        self.running = {k: (float(v[0]), float(v[1])) for k, v in state.items()}


def clip_gradients(net, opts: TrainOptions, adaptive: AdaptiveClip | None) -> None:
    if adaptive is not None:
        adaptive([(n, p) for n, p in net.named_parameters() if p.requires_grad])
    elif opts.grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], opts.grad_clip)
