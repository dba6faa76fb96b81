"""SmolLM2-135M (a Llama) in plain torch, with the module and parameter names of transformers'
`LlamaForCausalLM`, so a Mellow checkpoint's `caption_decoder.lm.*` keys load into it unchanged.

Why not transformers' class itself: importing `transformers.LlamaForCausalLM` costs about 4 s on a
2-core CPU (it pulls in torch._dynamo, torch.distributed and scipy), longer than loading the whole
cached model. The network is small and standard; tests/test_llama.py checks it against
transformers' `LlamaForCausalLM` logit for logit, on random and on the real SmolLM2 weights, and
transformers stays the baseline that benchmarks compare against.

The full-sequence `forward` here is the reference's view (re-run everything); fast decoding with a
KV cache lives in generate.py and uses these same modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mellow_cli.config import MellowConfig


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalise in float32, scale in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of Llama's rotary position embedding ("rotate half" layout)."""

    def __init__(self, cfg: MellowConfig, device=None):
        super().__init__()
        dim = cfg.hidden_size // cfg.num_attention_heads
        # Computed on the CPU even inside `with torch.device("meta")`: see frontend.constant.
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        inv_freq = 1.0 / (cfg.rope_theta**exponent)
        # Not in the checkpoint: recomputed on the weights' device after a meta build (init_rotary).
        self.register_buffer("inv_freq", inv_freq.to(device or torch.get_default_device()), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, head_dim) in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv = cfg.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU with SiLU, as SmolLM2."""

    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, vocab), or the last `logits_to_keep` positions


class LlamaForCausalLM(nn.Module):
    """The language model: `model.*` and a `lm_head` tied to the token embedding."""

    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.config = cfg  # generate.py reads the sizes by their transformers names, which these are
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> CausalLMOutput:
        """The whole sequence at once, causally, as the reference re-runs it each step."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        positions = torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = self.model.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        return CausalLMOutput(self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x))


def init_rotary(lm: LlamaForCausalLM) -> None:
    """Give the rotary table real values on the weights' device (after a meta-device build)."""
    lm.model.rotary_emb = RotaryEmbedding(lm.config, device=lm.model.embed_tokens.weight.device)


def transformers_twin(lm: LlamaForCausalLM):
    """transformers' own `LlamaForCausalLM` holding the same weights (shared, not copied): the
    reference that tests check this module against and the baseline benchmarks race."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as Reference

    cfg = lm.config
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=True,
        bos_token_id=cfg.eos_token_id,  # SmolLM2 uses `<|endoftext|>` for both
        eos_token_id=cfg.eos_token_id,
        pad_token_id=None,  # SmolLM2 has none; `!` (our padding) is a real, trained token
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        twin = Reference(config)
    twin.load_state_dict(lm.state_dict(), strict=True, assign=True)
    twin.lm_head.weight = twin.model.embed_tokens.weight
    with torch.device(lm.model.embed_tokens.weight.device):  # its table is not in the state dict
        twin.model.rotary_emb = type(twin.model.rotary_emb)(config)
    return twin.eval()
