"""The training side of the data: every file's rows checked before the first step, the datasets,
and the seeded order each process reads them in (resumable part-way through an epoch).

data.py reads and checks one file; this module joins several (the official recipe's `datafiles`),
holds out validation rows, keeps the rows the model's family can take, and builds the loaders.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from mellow_cli.errors import UsageError
from mellow_cli.train.recipe import TrainOptions

Report = Callable[[dict], None]  # train.Report: called with each of the run's events (train.Event)


class EpochSampler(DistributedSampler):
    """DistributedSampler (seeded permutation per epoch, one share per process) that can start
    part-way through an epoch, for resuming."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = False):
        # drop_last here splits the rows evenly between processes (theirs: CustomDistributedSampler
        # with drop_last=True, the same permutation); a short last batch is the loader's to drop
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def read_checked(path: str, opts: TrainOptions, report: Report, world) -> list:
    """Every row of `path`, validated before the first step; bad rows stop the run (one line
    naming them by line number) unless --skip-bad. Under torchrun rank 0 checks the audio and
    tells the others which rows passed."""
    from mellow_cli.train import data

    rows = data.read_rows(path, audio_root=opts.audio_root, text=opts.text)
    keep = None
    if world.main:
        clips = len({p for r in rows for p in (r.audio1, r.audio2) if p})
        report({"event": "checking", "path": path, "rows": len(rows), "clips": clips})
        good, bad = data.validate_rows(rows, check_audio=True,
                                       progress=lambda n: report({"event": "checked", "clips": n}))
        report({"event": "checked_all", "path": path})
        if bad and not opts.skip_bad:
            keep = data.describe_bad(path, bad) + " (pass --skip-bad to train without them)"
        else:
            if bad:
                report({"event": "note", "message": f"skipping {len(bad)} bad rows:\n{data.describe_bad(path, bad)}"})
            good_ids = {id(r) for r in good}
            keep = [i for i, r in enumerate(rows) if id(r) in good_ids]
    keep = world.broadcast(keep)
    if isinstance(keep, str):
        raise UsageError(keep)  # a data file that cannot be trained on: bad input, as in bench (exit 2)
    rows = [rows[i] for i in keep]
    if not rows:
        raise UsageError(f"{path}: no usable rows")
    return rows


def training_rows(opts: TrainOptions, report: Report, world) -> tuple[list, list]:
    """(train, val) rows, checked; before the model loads, so a bad file fails in seconds. Several
    training files are read in order as one list (theirs: `datafiles`)."""
    from mellow_cli.train import data

    train_rows = [row for path in opts.data_files for row in read_checked(path, opts, report, world)]
    val_rows = read_checked(opts.val, opts, report, world) if opts.val else []
    if not opts.val and opts.val_fraction > 0:
        train_rows, val_rows = data.split_val(train_rows, opts.val_fraction, opts.seed)
    return train_rows, val_rows


def for_family(rows: list, family, tokenizer, cfg, opts: TrainOptions, report: Report) -> list:
    """The rows the model's family can take: no more clips than it hears in a question, and a
    question, answer and choices its tokenizer can spell (Samsone's pruned vocabulary cannot spell
    everything). The others stop the run, named by file and line, unless --skip-bad drops them.
    Every process decides the same, from the same rows."""
    from mellow_cli.train import data

    spelled: dict[tuple[str, bool], str | None] = {}  # a text's problem, each text tried once

    def spelling(text: str, prompt: bool) -> str | None:
        if (text, prompt) not in spelled:
            spelled[text, prompt] = None
            try:
                if prompt:
                    family.prompt_ids(tokenizer, text, cfg)
                else:
                    tokenizer(text, add_special_tokens=False)
            except UsageError as e:
                spelled[text, prompt] = str(e)
        return spelled[text, prompt]

    most, good, bad = family.most_clips, [], {}
    for row in rows:
        problems = [f"{family.title} takes {most} clip{'s' if most > 1 else ''} a question, not {row.clips}"] \
            if most is not None and row.clips > most else []
        texts = [(row.question, True), (row.answer, False), *((c, False) for c in row.choices or ())]
        problems += [p for text, prompt in texts if (p := spelling(text, prompt))]
        if problems:
            bad.setdefault(row.source, []).append(data.BadRow(row.where, "; ".join(dict.fromkeys(problems))))
        else:
            good.append(row)
    if bad:
        listed = "\n".join(data.describe_bad(path, rows) for path, rows in bad.items())
        if not opts.skip_bad:
            raise UsageError(listed + " (pass --skip-bad to train without them)")
        report({"event": "note", "message": f"skipping {sum(map(len, bad.values()))} rows the model cannot take:\n"
                                            f"{listed}"})
        if not good:
            raise UsageError(f"{', '.join(bad)}: no rows {family.title} can take")
    return good


def datasets(opts: TrainOptions, cfg, train_rows: list, val_rows: list):
    from mellow_cli.train import data

    train = data.QADataset(train_rows, cfg, seed=opts.seed, random_window=opts.random_window,
                           second_clip=opts.second_clip)
    val = data.QADataset(val_rows, cfg, seed=opts.seed, random_window=False, second_clip=opts.second_clip) \
        if val_rows else None
    return train, val


def loader(dataset, sampler, opts: TrainOptions, device: torch.device, seed: int, drop_last: bool = False) -> DataLoader:
    from mellow_cli.train import data

    # Its own generator: creating the iterator draws the workers' base seed from it, not from
    # torch's global RNG (which dropout uses, and which a resumed run must find untouched).
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=opts.batch_size, sampler=sampler, num_workers=opts.workers,
                      collate_fn=data.collate, generator=generator, pin_memory=device.type == "cuda",
                      drop_last=drop_last)
