"""Decode speed of Mellow's language-model half on the CPU: our cached loop (`mellow_cli.generate`)
against transformers' `generate` on the same SmolLM2 weights and the same 389-position
inputs_embeds prefix, in one run.

gpt-fast's habits: a warm-up run, then timed repeats; tokens/s, effective memory bandwidth (weight
bytes / step time: each decode step reads every weight once) and peak RSS. The repeats of the two
loops are interleaved and medians reported, so that load from other processes hits both alike:
read the ratios. No asserts; this only measures.

    python benchmarks/decode_speed.py --lm-dir .pytest_cache/d/smollm2/hf
    python benchmarks/decode_speed.py --lm-dir DIR --batch 2 --tokens 32 --dtypes auto,int8

`--lm-dir` is a folder with `lm.safetensors` (LlamaForCausalLM keys, head optional) and tokenizer
files, as the tests' `smollm2_dir` fixture builds. The audio encoder is not timed here; `mellow
bench speed` times the whole model (load, encoder, first token) with the same decode timers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from mellow_cli.bench.speed import hf_generate, ours, peak_rss_mb, weight_bytes
from mellow_cli.runtime import precision
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.runtime.llama import transformers_twin
from mellow_cli.models.weights import load_lm
from mellow_cli.models.mellow.network import tokenize_prompts
from mellow_cli.runtime.tokenizer import Tokenizer

CFG = MellowConfig.v0()


def load(lm_dir: Path):
    from safetensors.torch import load_file
    return load_lm(CFG, load_file(lm_dir / "lm.safetensors")), Tokenizer(lm_dir)


@torch.inference_mode()
def make_prefix(lm, tokenizer, batch: int) -> torch.Tensor:
    """Clips as unit-variance vectors (the projection ends in a LayerNorm), real prompt tokens."""
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(2, batch, CFG.audio_tokens, CFG.hidden_size, generator=g)
    prompt = "what can you infer about the surroundings from the audio?"
    ids = tokenize_prompts(tokenizer, [prompt] * batch, CFG)
    embed = lm.model.embed_tokens
    sep = embed.weight[CFG.sep_token_id].expand(batch, 1, -1)
    return torch.cat([clips[0], sep, clips[1], sep, embed(ids)], dim=1)


def report(name: str, step_s: float, batch: int, nbytes: int, extra: str = "") -> None:
    # bandwidth per step: a step reads every weight once, whatever the batch size
    print(f"{name:<34} {batch / step_s:7.1f} tok/s  {nbytes / step_s / 1e9:6.2f} GB/s  {extra}")


def compare(name: str, model, prefix, reference_ids, tokens: int, repeats: int) -> None:
    """Our loop on another form of the weights: speed, and agreement with float32 greedy."""
    ours(model, prefix, min(tokens, 4))  # warm-up
    runs = [ours(model, prefix, tokens) for _ in range(repeats)]
    decode = statistics.median(r.step_s for r in runs)
    same = (runs[0].ids == reference_ids[:, :tokens]).all(dim=0).long().cumprod(0).sum().item()
    report(name, decode, prefix.shape[0], weight_bytes(model),
           f"prefill {statistics.median(r.first_token_s for r in runs) * 1e3:.0f} ms; "
           f"first {same}/{tokens} tokens as float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-dir", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=48, help="tokens decoded per run")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtypes", default="auto,float16,bfloat16,int8",
                    help="also time our loop with the matrices prepared in these (--dtype names)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm, tokenizer = load(args.lm_dir)
    hf = transformers_twin(lm)  # the same tensors inside transformers' own LlamaForCausalLM
    exact = copy.deepcopy(lm)
    precision.apply(exact, precision.EXACT)  # what `--dtype float32` runs: fused, float32
    prefix = make_prefix(lm, tokenizer, args.batch)
    nbytes = weight_bytes(exact)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, prefix "
          f"{prefix.shape[1]} positions, {args.tokens} new tokens; "
          f"decode reads {nbytes / 1e6:.0f} MB of float32 weights per step")

    ours(exact, prefix, 4), hf_generate(hf, prefix, 4)  # warm-up
    ours_runs, hf_runs = [], []
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        ours_runs.append(ours(exact, prefix, args.tokens))
        hf_runs.append(hf_generate(hf, prefix, args.tokens))

    prefill = statistics.median(r.first_token_s for r in ours_runs)
    decode = statistics.median(r.step_s for r in ours_runs)
    hf_pre = statistics.median(r.first_token_s for r in hf_runs)
    hf_decode = statistics.median(r.step_s for r in hf_runs)
    same = torch.equal(ours_runs[0].ids, hf_runs[0].ids)

    print(f"prefill ({prefix.shape[1]} positions) and first token: ours float32 {prefill * 1e3:.0f} ms, "
          f"transformers generate {hf_pre * 1e3:.0f} ms")
    report("ours float32 (--dtype float32)", decode, args.batch, nbytes, f"{decode * 1e3:.1f} ms/step")
    report("transformers generate float32", hf_decode, args.batch, nbytes, f"{hf_decode * 1e3:.1f} ms/step")
    print(f"decode speed-up {hf_decode / decode:.2f}x; same greedy tokens: {same}")
    del hf
    for name in filter(None, args.dtypes.split(",")):
        chosen = precision.named(name, torch.device("cpu"))
        model = copy.deepcopy(lm)
        precision.apply(model, chosen)
        compare(f"ours --dtype {name} ({chosen.describe()})", model, prefix, ours_runs[0].ids,
                args.tokens, args.repeats)
        del model
    print(f"peak RSS {peak_rss_mb():.0f} MB (float32 model, its transformers twin and the copies)")


if __name__ == "__main__":
    main()
