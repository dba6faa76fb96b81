"""`mellow bench speed`: how fast a model runs on this machine, every figure from one run.

gpt-fast's benchmarking habits: a warm-up before timing, the device
synchronised before each clock reading, medians of repeats, tokens/s, bytes read per second and
peak memory, and a baseline measured in the same run: transformers' own `generate` over the very
same float32 weights (runtime/llama.py: transformers_twin). Other processes can slow either, so the
ratio of the two, raced in alternate runs, means more than either figure.

The audio is synthesized (tones over noise, a new clip for every timed run, so the model's clip
cache never answers for the encoder). With a --dtype other than float32 it also loads the model in
float32 and reports how often the two agree (greedy answers, choices, first logits).
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mellow_cli.store import loading
from mellow_cli.api import Model, Question, load_model
from mellow_cli.bench.speed_plan import (
    AGREEMENT,
    BASELINE,
    CAPTIONS,
    DECODE,
    ENCODER,
    ENCODER_BATCH,
    FIRST_TOKEN,
    LOAD,
    Figures,
    Progress,
    Sizes,
)
from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.errors import ModelError
from mellow_cli.runtime.generate import generate_tokens
from mellow_cli.runtime.prefix import Prefix

QUESTION = "what can you infer about the surroundings from the audio?"
CHOICE_QUESTION = "which sound is this?"
CHOICES = ("a dog barking", "rain on a roof", "a car horn", "music playing", "a person speaking")
NEVER = -1  # an eos id no token has: every timed run decodes exactly the tokens asked for


@dataclass(frozen=True)
class SpeedReport:
    """What `mellow bench speed` measured; times are medians of `repeat` runs after a warm-up."""

    model: str  # as the user named it
    revision: str | None  # hub commit of the weights, None for local files
    device: str  # where it ran: cpu, cuda:0, mps
    dtype: str  # of the language model's weights
    decode_step: str  # "c": one call into runtime/step.c per step; "torch": the eager forward
    threads: int  # torch's CPU threads
    torch_version: str
    tokens: int  # tokens decoded per timed decode run
    repeat: int  # timed runs per figure
    batch_size: int  # clips per batch for the batched figures
    fetched_first: bool  # the model was downloaded or converted just before the loads
    load_first_s: float  # first load in this process: the cached safetensors are mapped for the
    # first time here, but the OS page cache was not dropped, so the file may already be in memory
    load_cached_s: float  # a second load of the same files
    encoder_ms_per_clip: float  # one 10 s clip through the audio encoder and mapper
    encoder_ms_per_clip_batched: float  # the same, per clip of a batch of batch_size
    time_to_first_token_s: float  # decoded clip -> first token: encoder, prompt, prefill, argmax
    prefill_ms: float  # the prefix (clips and prompt embedded) -> first token, our loop
    decode_tok_s: float  # our greedy loop, batch 1, after the first token
    decode_gb_s: float  # weight bytes read per second while decoding (each step reads all once)
    captions_per_s: float  # batch_size new clips captioned by ask_batch (up to `tokens` tokens)
    peak_rss_one_question_mb: float | None  # peak resident memory after the loads, the one-clip
    # encoder runs and the first-token runs: what `mellow ask` needs (None: the OS does not say)
    peak_rss_mb: float | None  # peak after the batched runs too, before transformers was imported
    baseline: str | None  # "transformers <version> generate"; None if skipped
    baseline_prefill_ms: float | None
    baseline_decode_tok_s: float | None  # same weights, same prefix, same number of tokens
    decode_ratio: float | None  # decode_tok_s / baseline_decode_tok_s
    peak_rss_with_baseline_mb: float | None  # peak after the baseline ran too
    agreement_prompts: int  # clips (one prompt each) compared with float32; 0 when dtype is float32
    same_greedy: float | None  # share of them whose `tokens` greedy tokens equal float32's
    same_choice: float | None  # share whose pick among CHOICES equals float32's
    max_logit_diff: float | None  # largest |logit - float32's| for the first token over them

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodeRun:
    """One timed greedy decode of a fixed number of tokens."""

    first_token_s: float  # prefill and the first token
    step_s: float  # seconds per later token
    ids: torch.Tensor  # (B, tokens)


# --- clocks and memory ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued device work, so the clock reads when the work is done, not when queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MB; None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB elsewhere


def weight_bytes(lm) -> int:
    """Bytes one decode step reads: every matrix of every layer and the output head, the norms
    (the input embedding is only looked up, one row)."""
    if lm.prepared:
        norms = [p for name, p in lm.named_parameters() if "norm" in name]
        return sum(m.nbytes for m in lm.matrices()) + sum(p.numel() * p.element_size() for p in norms)
    tensors = [*lm.model.layers.parameters(), lm.model.norm.weight, lm.lm_head.weight]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- audio -----------------------------------------------------------------------------------------


def synth_clips(n: int, samples: int, sample_rate: int, seed: int) -> list[np.ndarray]:
    """n different clips: a tone over noise each, float32 mono."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    return [(0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(samples))
            .astype(np.float32) for _ in range(n)]


def clip_maker(model: Model) -> Callable[[int], list[np.ndarray]]:
    """`take(n)`: n clips for this model that no earlier call returned."""
    seed = 0

    def take(n: int) -> list[np.ndarray]:
        nonlocal seed
        seed += 1
        rate = model.family.sample_rate(model.cfg)
        return synth_clips(n, round(model.family.clip_seconds(model.cfg) * rate), rate, seed)

    return take


# --- the measures ----------------------------------------------------------------------------------


def make_local(name: str, progress: bool) -> bool:
    """Download or convert the model now if the cache does not hold it, so the timed loads time
    loading, not downloading. True if it had to."""
    src = loading.resolve(name)
    if src.key is None:  # a folder or .safetensors used in place
        return False
    try:
        loading.model_path(name)
        return False
    except ModelError:
        loading.pull(src, progress=progress)
        return True


def load_twice(name: str, device: str, dtype: str | None) -> tuple[float, float, Model]:
    """(first load seconds, second load seconds, the model). The weights are memory-mapped: their
    pages are read when the first forward touches them (in the warm-up), not during the load."""
    start = time.perf_counter()
    first = load_model(name, device=device, dtype=dtype, progress=False)
    first_s = time.perf_counter() - start
    del first
    gc.collect()
    start = time.perf_counter()
    model = load_model(name, device=device, dtype=dtype, progress=False)
    return first_s, time.perf_counter() - start, model


@torch.inference_mode()
def encoder_ms_per_clip(model: Model, clips: Callable[[int], list], batch: int, repeat: int) -> float:
    """Median milliseconds per clip for `batch` clips through the family's encoder (after one
    warm-up)."""
    def run():
        wavs = [torch.from_numpy(c).to(model.device) for c in clips(batch)]
        return timed(lambda: model.family.encode(model.net, wavs), model.device)

    run()
    return statistics.median(run() for _ in range(repeat)) * 1e3 / batch


def time_to_first_token(model: Model, clips: Callable[[int], list], repeat: int) -> float:
    """Median seconds from a decoded clip to the first token, the way `mellow ask` goes."""
    def first_token():
        prefix = model.prefix([Question(clips(1)[0], None, QUESTION)])
        return next(generate_tokens(model.net.lm, prefix, DecodingOptions(max_tokens=1), eos_id=NEVER))

    timed(first_token, model.device)
    return statistics.median(timed(first_token, model.device) for _ in range(repeat))


def captions_per_s(model: Model, clips: Callable[[int], list], batch: int, tokens: int, repeat: int) -> float:
    """Median clips/s for one `ask_batch` caption of `batch` new clips, greedy, up to `tokens`."""
    def caption(max_tokens: int):
        rows = [Question(c, None, model.family.caption_prompt) for c in clips(batch)]
        return timed(lambda: model.ask_batch(rows, DecodingOptions(max_tokens=max_tokens)), model.device)

    caption(2)
    return batch / statistics.median(caption(tokens) for _ in range(repeat))


def ours(lm, prefix: Prefix, tokens: int) -> DecodeRun:
    """Our cached greedy loop (runtime/generate.py) over `prefix`, exactly `tokens` tokens."""
    device = prefix.embeds.device
    sync(device)
    start = time.perf_counter()
    steps = generate_tokens(lm, prefix, DecodingOptions(max_tokens=tokens), eos_id=NEVER)
    ids = [next(steps)]
    sync(device)
    first = time.perf_counter()
    ids += list(steps)
    sync(device)
    end = time.perf_counter()
    return DecodeRun(first - start, (end - first) / max(tokens - 1, 1), torch.stack(ids, dim=1))


class _TokenClock:
    """A transformers streamer that notes when each put arrives: the prompt first, then each new
    token (`put` receives them already copied to the CPU, so the device is in step)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_generate(hf_lm, prefix: torch.Tensor, tokens: int) -> DecodeRun:
    """transformers' greedy `generate` over the same inputs_embeds, exactly `tokens` tokens
    (min_new_tokens keeps it from stopping at end of text)."""
    clock = _TokenClock()
    eos = hf_lm.config.eos_token_id
    sync(prefix.device)
    start = time.perf_counter()
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    out = hf_lm.generate(inputs_embeds=prefix.to(hf_lm.dtype), attention_mask=mask, max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, streamer=clock, pad_token_id=eos, eos_token_id=eos)
    sync(prefix.device)
    end = time.perf_counter()
    first = clock.times[-tokens]  # the puts before it are the prompt's
    return DecodeRun(first - start, (end - first) / max(tokens - 1, 1), out[:, -tokens:])


def baseline_lm(name: str, device: torch.device):
    """transformers' LlamaForCausalLM over the float32 weights as loaded (our prepared matrices
    are not nn.Linear weights it could read)."""
    from mellow_cli.runtime.llama import transformers_twin

    net, _ = loading.load(name, device="cpu", progress=False)
    return transformers_twin(net.lm.to(device))


# --- the run ---------------------------------------------------------------------------------------


def run(model: str = "v0", device: str = "auto", dtype: str | None = None, tokens: int = 64, repeat: int = 3,
        batch_size: int = 8, baseline: bool = True, prompts: int = 8,
        log: Callable[[str], None] | None = None) -> SpeedReport:
    """Every measure of the report, in order: loads, one-clip encoder, time to first token, the
    batched encoder and captions, our decode, then (after importing transformers) the baseline,
    interleaved with ours so that load from other processes hits both alike. `log` hears each
    step as it starts, numbered, with an estimate of the rest (speed_plan.py)."""
    fetched = make_local(model, progress=log is not None)  # a model that is none: its error alone
    sizes = Sizes(tokens, repeat, batch_size, prompts, baseline)
    steps = Progress(sizes, bool(prompts) and dtype != "float32", log or (lambda message: None))
    steps.start(LOAD)
    load_first, load_cached, loaded = load_twice(model, device, dtype)
    lm, clips = loaded.net.lm, clip_maker(loaded)
    if prompts and dtype != "float32" and loaded.precision.name == "float32":
        steps.skip(AGREEMENT, f"auto chose float32 here ({loaded.precision.chosen_by}): no agreement to check")
    steps.start(ENCODER)
    enc1 = encoder_ms_per_clip(loaded, clips, 1, repeat)
    steps.start(FIRST_TOKEN)
    ttft = time_to_first_token(loaded, clips, repeat)
    rss_one = peak_rss_mb()
    prefix = loaded.prefix([Question(clips(1)[0], None, QUESTION)])
    warm = ours(lm, prefix, min(tokens, 4))  # the decode's warm-up, and the estimate's step time
    steps.know(Figures(load=load_cached, clip=enc1 / 1e3, first_token=ttft, step=warm.step_s))
    steps.start(ENCODER_BATCH)
    enc_batched = encoder_ms_per_clip(loaded, clips, batch_size, repeat)
    steps.start(CAPTIONS)
    caps = captions_per_s(loaded, clips, batch_size, tokens, repeat)
    rss_alone = peak_rss_mb()

    hf_lm = None
    if baseline:
        steps.start(BASELINE)
        hf_lm = baseline_lm(model, loaded.device)
        hf_generate(hf_lm, prefix.embeds.float(), min(tokens, 4))  # warm-up
    steps.start(DECODE)
    runs, hf_runs = [], []
    for _ in range(repeat):
        runs.append(ours(lm, prefix, tokens))
        if hf_lm is not None:
            hf_runs.append(hf_generate(hf_lm, prefix.embeds.float(), tokens))

    rss_baseline = peak_rss_mb() if hf_runs else None
    agreed = dict(agreement_prompts=0, same_greedy=None, same_choice=None, max_logit_diff=None)
    if loaded.precision.name != "float32" and prompts:
        steps.start(AGREEMENT)
        exact = load_model(model, device=device, dtype="float32", progress=False)
        agreed = agreement(loaded, exact, clips(prompts), tokens)
        del exact
    steps.done()
    step = statistics.median(r.step_s for r in runs)
    hf_step = statistics.median(r.step_s for r in hf_runs) if hf_runs else None
    return SpeedReport(
        model=loaded.name, revision=loaded.revision, device=str(loaded.device),
        dtype=loaded.precision.describe(), decode_step="torch" if lm.fused is None else "c",
        threads=torch.get_num_threads(), torch_version=torch.__version__, tokens=tokens, repeat=repeat,
        batch_size=batch_size, fetched_first=fetched, load_first_s=load_first, load_cached_s=load_cached,
        encoder_ms_per_clip=enc1, encoder_ms_per_clip_batched=enc_batched, time_to_first_token_s=ttft,
        prefill_ms=statistics.median(r.first_token_s for r in runs) * 1e3, decode_tok_s=1 / step,
        decode_gb_s=weight_bytes(lm) / step / 1e9, captions_per_s=caps, peak_rss_one_question_mb=rss_one,
        peak_rss_mb=rss_alone,
        baseline=_baseline_name() if hf_runs else None,
        baseline_prefill_ms=statistics.median(r.first_token_s for r in hf_runs) * 1e3 if hf_runs else None,
        baseline_decode_tok_s=1 / hf_step if hf_step else None,
        decode_ratio=hf_step / step if hf_step else None,
        peak_rss_with_baseline_mb=rss_baseline,
        **agreed,
    )


@torch.inference_mode()
def agreement(model: Model, exact: Model, clips: list[np.ndarray], tokens: int) -> dict:
    """How often `model` answers as the float32 `exact` does over the same clips."""
    from mellow_cli.runtime.generate import Session

    same_tokens = same_pick = 0
    diff = 0.0
    for clip in clips:
        ids, logits = [], []
        for m in (model, exact):
            prefix = m.prefix([Question(clip, None, QUESTION)])
            ids.append(ours(m.net.lm, prefix, tokens).ids)
            logits.append(Session(m.net.lm, prefix, 0).first())
        same_tokens += torch.equal(*ids)
        diff = max(diff, float((logits[0] - logits[1]).abs().max()))
        picks = [m.choose(clip, CHOICE_QUESTION, CHOICES).choice for m in (model, exact)]
        same_pick += picks[0] == picks[1]
    n = len(clips)
    return dict(agreement_prompts=n, same_greedy=same_tokens / n, same_choice=same_pick / n, max_logit_diff=diff)


def _baseline_name() -> str:
    import transformers

    return f"transformers {transformers.__version__} generate"


# --- presentation (render.py draws it) -------------------------------------------------------------


def title(r: SpeedReport, several: bool = False) -> str:
    what = "each model" if several else f"{r.model} ({r.dtype})"
    return (f"mellow bench speed: {what} on {r.device}, {r.threads} threads, torch {r.torch_version}, "
            f"median of {r.repeat} after a warm-up")


def side_by_side(reports: list[SpeedReport]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Several models' tables as one: a row per measure, a column per model, then the first
    model's "how"; the dtype each ran in, and each decode's ratio to the first model's."""
    names = [os.path.basename(r.model.rstrip("/\\")) or r.model for r in reports]  # a folder by its name
    tables = [{measure: value for measure, value, _ in table_rows(r)} for r in reports]
    how: dict[str, str] = {}  # each measure once, in order, explained as for the first model that has it
    for r in reports:
        for measure, _, explained in table_rows(r):
            how.setdefault(measure, explained)
    first = reports[0].decode_tok_s
    rows = [("dtype", *(r.dtype for r in reports), "as --dtype chose")]
    rows += [(measure, *(t.get(measure, "-") for t in tables), explained) for measure, explained in how.items()]
    rows.insert(rows.index(next(row for row in rows if row[0] == "decode, mellow")) + 1,
                (f"decode vs {names[0]}", *(f"{r.decode_tok_s / first:.2f}x" for r in reports),
                 "tokens/s over the first model's, measured in this run"))
    return ("measure", *names, "how"), rows


def table_rows(r: SpeedReport) -> list[tuple[str, str, str]]:
    """(measure, value, how) for the table; `footnote` explains the load figures."""
    rows = [
        ("load, first", f"{r.load_first_s:.2f} s", "first in this process (see below)"),
        ("load, cached", f"{r.load_cached_s:.2f} s", "the same files again"),
        ("encoder, 1 clip", f"{r.encoder_ms_per_clip:.0f} ms/clip", "10 s clip, encoder and mapper"),
        (f"encoder, batch of {r.batch_size}", f"{r.encoder_ms_per_clip_batched:.0f} ms/clip", "per clip of the batch"),
        ("time to first token", f"{r.time_to_first_token_s:.2f} s", "decoded clip -> first token"),
        ("prefill", f"{r.prefill_ms:.0f} ms", "the prefix -> first token"),
        ("decode, mellow", f"{r.decode_tok_s:.1f} tok/s",
         f"greedy, {r.tokens} tokens, {r.decode_gb_s:.2f} GB/s, {'one call into C' if r.decode_step == 'c' else 'torch'} a step"),
    ]
    if r.baseline is not None:
        rows += [("decode, transformers", f"{r.baseline_decode_tok_s:.1f} tok/s", "generate, same weights"),
                 ("decode ratio", f"{r.decode_ratio:.2f}x", "mellow / transformers")]
    rows += [(f"captions, batch of {r.batch_size}", f"{r.captions_per_s:.2f} clips/s", f"up to {r.tokens} tokens each"),
             ("peak RSS, one question", _mb(r.peak_rss_one_question_mb), "load, encoder, first token"),
             ("peak RSS", _mb(r.peak_rss_mb), f"with the batches of {r.batch_size} too")]
    if r.peak_rss_with_baseline_mb is not None:
        rows.append(("peak RSS with baseline", _mb(r.peak_rss_with_baseline_mb), "after the transformers runs"))
    if r.agreement_prompts:
        n = r.agreement_prompts
        rows += [("same greedy answer as float32", f"{r.same_greedy:.0%}", f"{n} clips, {r.tokens} tokens each"),
                 ("same choice as float32", f"{r.same_choice:.0%}", f"{n} clips, {len(CHOICES)} choices"),
                 ("first-token logits vs float32", f"{r.max_logit_diff:.3f}", "largest difference")]
    return rows


def footnote(r: SpeedReport) -> str:
    first = ("The model was fetched just before, so its file was in the page cache for the first load."
             if r.fetched_first else
             "The first load maps the cached safetensors for the first time in this process; the OS page "
             "cache was not dropped, so the file may still be in memory from an earlier run.")
    base = f" Baseline: {r.baseline}, racing ours in alternate runs." if r.baseline else ""
    return f"{first} Weights are memory-mapped: the warm-up's first forward reads them.{base}"


def _mb(value: float | None) -> str:
    return "?" if value is None or not math.isfinite(value) else f"{value:.0f} MB"
