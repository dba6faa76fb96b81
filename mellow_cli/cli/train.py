"""`mellow train`: parse the options, hand the run to train/loop.py, draw its progress on stderr."""

from __future__ import annotations

import contextlib
from typing import Annotated, Optional

import typer

from mellow_cli.cli.options import Console, Device, DeviceOpt, at_most_cores, grouped
from mellow_cli.errors import UsageError
from mellow_cli.train.recipe import limits as _limits
from mellow_cli.train.recipe import preset_help as _p


@grouped
def train(
    out: Annotated[str, typer.Option("--out", "-o", metavar="RUN_DIR", help="Run folder: checkpoints/step-NNNNNN (each usable as --model), checkpoints/last (the newest), checkpoints/best (the lowest validation loss; without validation, the newest), metrics.jsonl.", show_default=False)],
    data: Annotated[Optional[list[str]], typer.Argument(metavar="DATA...", help="Training rows: JSONL (audio1, audio2, question, answer, choices, id), the official JSON list (filepath1, filepath2, caption1, caption2, input, answer) or MusicSkills' JSON list (file_name, input_text, target_text); several files are read as one list. Optional with --resume.", show_default=False)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Start from these weights, a model of any family: v0 (published), v0_s, tinymu, samsone-99m/134m/356m, a checkpoint of ours (RUN_DIR/checkpoints/step-NNNNNN), a file or hub id.")] = "v0",
    recipe: Annotated[str, typer.Option("--recipe", help="Preset for the options marked [mellow: ...; official: ...]: mellow (fine-tuning a trained model of any family) or official (Mellow's authors' training recipe, for Mellow). Explicit options override it.")] = "mellow",
    init: Annotated[Optional[str], typer.Option("--init", metavar="PRESET", help="Start from fresh random weights of a config preset instead of --model: tiny (tests, a few minutes on a CPU) or v0; or pretrained: the authors' start (the AudioSet HTSAT of --encoder-weights, the SmolLM2-135M base of --lm-weights, a fresh projection).")] = None,
    encoder_weights: Annotated[Optional[str], typer.Option("--encoder-weights", metavar="FILE", help="--init pretrained: the AudioSet HTSAT checkpoint (HTSAT_AudioSet_Saved_1.ckpt, keys sed_model.*), a file or REPO:FILE on the hub.", show_default=False)] = None,
    lm_weights: Annotated[str, typer.Option("--lm-weights", metavar="NAME", help="--init pretrained: the language model's weights, a .safetensors file, a folder with model.safetensors, a hub repo (its model.safetensors) or REPO:FILE.")] = "HuggingFaceTB/SmolLM2-135M",
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", metavar="DIR", help="Folder with tokenizer.json [default: the model's; with --init, SmolLM2's from the cache or hub].")] = None,
    freeze: Annotated[Optional[str], typer.Option("--freeze", help="Keep parts unchanged (each family names its own; for Mellow): encoder = HTSAT (what the reference's training config freezes; c2l and the mapper still train), decoder = the SmolLM2 language model with its token embeddings (the paper's frozen-LM ablation), encoder,decoder = train only the mapper, none = train everything. HTSAT's front end (STFT, mel) never trains. " + _p("freeze"), show_default=False)] = None,
    encoder_mode: Annotated[Optional[str], typer.Option("--encoder-mode", help="HTSAT while training: eval, or train (SpecAugment, DropPath 0.1, bn0 normalising with and updating from batch statistics; frozen or not). " + _p("encoder_mode"), show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint: weights, optimizer, schedule, random state and place in the epoch, so it ends exactly as an uninterrupted run. Its options stay; --max-steps, --epochs, --save-every, --eval-every, --log-every, --keep, --workers, --device may change.")] = False,
    val: Annotated[Optional[str], typer.Option("--val", metavar="FILE", help="Validation rows, same formats as DATA.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", **_limits("val_fraction"), help="Or hold out this fraction of DATA (whole recordings go to one side).")] = 0.0,
    audio_root: Annotated[Optional[str], typer.Option("--audio-root", "--data-root", metavar="DIR", help="Relative audio paths start here (the official config's datapath) [default: each data file's folder].")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Every row is checked before the first step (audio readable, question and answer present, answer among the choices); bad rows stop the run, listed by line number, unless this drops them.")] = False,
    workers: Annotated[int, typer.Option("--workers", **_limits("workers"), help="Processes decoding audio for the batches (0: in the training process).")] = 2,
    text: Annotated[Optional[str], typer.Option("--text", help="Prompt and answer text: mellow (the official format's keyword prompts spelled out one fixed way, lower-cased) or official (the authors' random paraphrases and casing per epoch, ' <|endoftext|>' after prompt and answer, every '!' left out of the loss). " + _p("text"), show_default=False)] = None,
    second_clip: Annotated[Optional[str], typer.Option("--second-clip", help="A row without a second clip hears: first (its one clip, as at inference: Mellow hears it twice) or random (a random first clip of the rows, seeded). " + _p("second_clip"), show_default=False)] = None,
    no_random_window: Annotated[bool, typer.Option("--no-random-window", help="Recordings longer than the model's clip (Mellow's 10 s): always the first clip (inference's window) instead of a seeded random window per epoch.")] = False,
    epochs: Annotated[float, typer.Option("--epochs", **_limits("epochs"), help="Passes over DATA (the paper: 30 on ReasonAQA).")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", **_limits("max_steps"), help="Stop after this many optimizer steps (wins over --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", **_limits("batch_size"), help="Rows per batch, per process. " + _p("batch_size"), show_default=False)] = None,
    drop_last: Annotated[Optional[bool], typer.Option("--drop-last/--no-drop-last", help="Drop each epoch's last, short batch. " + _p("drop_last"), show_default=False)] = None,
    grad_accum: Annotated[int, typer.Option("--grad-accum", **_limits("grad_accum"), help="Batches per optimizer step (rows per step = batch size x this x processes).")] = 1,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="adamw (decoupled weight decay on matrices and embeddings) or adam (torch's Adam: coupled L2 on every trainable tensor). " + _p("optimizer"), show_default=False)] = None,
    betas: Annotated[Optional[str], typer.Option("--betas", metavar="B1,B2", help="Adam's betas. " + _p("betas"), show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", **_limits("lr"), help="Peak learning rate. " + _p("lr"), show_default=False)] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="step-cosine (warmup, then a cosine per step) or epoch-cosine (one value per epoch, a cosine over the epochs). " + _p("schedule"), show_default=False)] = None,
    min_lr_ratio: Annotated[Optional[float], typer.Option("--min-lr-ratio", **_limits("min_lr_ratio"), help="The cosine ends at lr x this. " + _p("min_lr_ratio"), show_default=False)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", **_limits("warmup_steps"), help="Linear warmup steps (auto: 5% of the steps). " + _p("warmup_steps"), show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", **_limits("weight_decay"), help="Weight decay (see --optimizer). " + _p("weight_decay"), show_default=False)] = None,
    clip: Annotated[Optional[str], typer.Option("--clip", help="global (clip the norm of all gradients to --grad-clip) or adaptive (the authors' per-tensor running norms, starting at --grad-clip). " + _p("clip"), show_default=False)] = None,
    grad_clip: Annotated[Optional[float], typer.Option("--grad-clip", **_limits("grad_clip"), help="global: the max norm (0: no clipping); adaptive: the initial running L2 norm. " + _p("grad_clip"), show_default=False)] = None,
    max_answer_tokens: Annotated[Optional[int], typer.Option("--max-answer-tokens", **_limits("max_answer_tokens"), help="Answers are cut to this many tokens (with the end of text). " + _p("max_answer_tokens"), show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", **_limits("seed"), help="Seeds the weights (--init), the order of rows, random windows and dropout.")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", **_limits("save_every"), help="Checkpoint every N steps (and at the end).")] = 500,
    eval_every: Annotated[int, typer.Option("--eval-every", **_limits("eval_every"), help="Validate every N steps (and at the end): loss, and accuracy on rows with choices.")] = 500,
    log_every: Annotated[int, typer.Option("--log-every", **_limits("log_every"), help="A metrics.jsonl row (and a progress line when stderr is not a terminal) every N steps.")] = 10,
    keep: Annotated[int, typer.Option("--keep", **_limits("keep"), help="Keep the last K checkpoints, plus the best by validation loss (checkpoints/last and best always name kept ones).")] = 3,
    trace: Annotated[bool, typer.Option("--trace-indices", hidden=True, help="Write the row indices each process read to RUN_DIR/trace-rankN.jsonl.")] = False,
    device: DeviceOpt = Device.auto,
    *,
    console: Console,
) -> None:
    """Fine-tune the model on your own recordings and questions.

    Any family's model (--model v0, tinymu, samsone-134m, a folder): the loss is next-token
    cross-entropy on the answer after the clips and the question, laid out as the model reads them
    when it answers. --recipe official trains Mellow as its authors did; the options it presets show
    both recipes' values. bfloat16 on a CUDA GPU, float32 on a CPU. Stop with Ctrl-C (or lose the
    machine) and continue with --resume.

    \b
    Examples:
      mellow train rows.jsonl --audio-root clips/ --val-fraction 0.05 -o runs/mine
      mellow train rows.jsonl --val val.jsonl -o runs/mine --epochs 3 --freeze encoder
      mellow train MusicCaps_train.json --data-root music/ --model tinymu --freeze encoder -o runs/music
      mellow train -o runs/mine --resume
      mellow train a.json b.json --data-root clips/ --recipe official -o runs/official --init pretrained --encoder-weights HTSAT_AudioSet_Saved_1.ckpt
      mellow ask clip.wav "what do you hear?" --model runs/mine/checkpoints/best
      mellow caption clip.wav --model runs/mine/checkpoints/last
      torchrun --nproc-per-node 4 -m mellow_cli train rows.jsonl -o runs/big -b 16
    """
    from mellow_cli.train.recipe import options, parse_betas, parse_freeze
    from mellow_cli.train.loop import run

    console.setup()
    if init is not None and resume:
        raise UsageError("--init starts a new run; --resume continues one: pass one of them")
    if val is not None and val_fraction:
        raise UsageError("pass --val FILE or --val-fraction, not both")
    opts = options(
        recipe, data=None if not data else data[0] if len(data) == 1 else tuple(data), out=out, model=model,
        init=init, encoder_weights=encoder_weights, lm_weights=lm_weights, tokenizer=tokenizer,
        freeze=None if freeze is None else parse_freeze(freeze), encoder_mode=encoder_mode, val=val,
        val_fraction=val_fraction, audio_root=audio_root, skip_bad=skip_bad, text=text, second_clip=second_clip,
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, drop_last=drop_last, grad_accum=grad_accum,
        optimizer=optimizer, betas=None if betas is None else parse_betas(betas), lr=lr, schedule=schedule,
        min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, weight_decay=weight_decay, clip=clip,
        grad_clip=grad_clip, max_answer_tokens=max_answer_tokens, random_window=not no_random_window, seed=seed,
        workers=at_most_cores("--workers", workers), device=device.value, save_every=save_every, eval_every=eval_every, log_every=log_every,
        keep=keep, resume=resume, trace=trace,
    )
    with _Progress() as progress:
        run(opts, progress.report)


class _Progress:
    """Turns train.run's events into a live line (step, loss, lr, samples/s, ETA) and log lines."""

    def __init__(self):
        self._live = None
        self._stack = contextlib.ExitStack()
        self._check = contextlib.ExitStack()  # the bar while every clip is decoded before step 1
        self._advance = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._check.close()
        self._stack.close()

    def report(self, e: dict) -> None:
        from mellow_cli.cli import render

        kind = e["event"]
        if kind == "checking":
            render.info(f"checking {e['rows']} rows of {e['path']}: decoding {e['clips']} clips")
            self._check = contextlib.ExitStack()
            self._advance = self._check.enter_context(render.progress(e["clips"], "checking clips"))
        elif kind == "checked":
            self._advance(e["clips"])
        elif kind == "checked_all":
            self._check.close()
        elif kind == "start":
            self._start(e)
        elif kind == "step" and self._live:
            self._live.update(e["step"])
        elif kind == "train" and self._live:
            self._live.update(e["step"], f"step {e['step']}/{e['total']}  loss {e['loss']:.4f}  lr {e['lr']:.2e}  "
                                         f"{e['samples_per_s']:.1f} samples/s  eta {_duration(e['eta'])}")
        elif kind == "val":
            accuracy = "" if e["val_accuracy"] is None else f"  accuracy {e['val_accuracy']:.3f} ({e['val_choice_rows']} rows with choices)"
            self._log(f"step {e['step']}: validation loss {e['val_loss']:.4f}{accuracy}{'  (best)' if e['best'] else ''}")
        elif kind == "checkpoint":
            render.debug(f"saved {e['path']}")
        elif kind == "note":
            render.warn(e["message"])
        elif kind == "done":
            self._stack.close()
            best = f"; best: {e['best']}" if e["best"] else ""
            render.info(f"trained {e['steps']} step{'' if e['steps'] == 1 else 's'} in {_duration(e['seconds'])}; last checkpoint: {e['checkpoint']}{best}")

    def _start(self, e: dict) -> None:
        from mellow_cli.cli import render

        frozen = "" if e["frozen"] == "none" else f", frozen: {e['frozen']}"
        what = "resuming" if e["resumed"] else "training"
        processes = f" x {e['world_size']} processes" if e["world_size"] > 1 else ""
        render.info(f"{what} {e['model']} on {e['device']}{processes}: "
                    f"{e['trainable'] / 1e6:.1f}M of {e['parameters'] / 1e6:.1f}M parameters train{frozen}; "
                    f"{e['rows']} rows ({e['val_rows']} validation), {e['rows_per_step']} rows a step; "
                    f"steps {e['step']} -> {e['total']}; run folder {e['run_dir']}")
        self._live = self._stack.enter_context(render.live(e["total"], e["step"], "train"))

    def _log(self, text: str) -> None:
        from mellow_cli.cli import render

        if self._live:
            self._live.log(text)
        else:
            render.info(text)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
