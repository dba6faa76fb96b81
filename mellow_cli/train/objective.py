"""The training objective (arXiv 2503.08540, reference soham97/mellow `models/decoder.py`), for
every family: next-token cross-entropy on the answer tokens only, fed after the question's prefix
as its family lays it out (Mellow: clip 1 · sep · clip 2 · sep · prompt padded with `!`). view.py
runs that view; logits are computed for the answer positions alone (the vocabulary is wide).

Text is the family's: its prompt ids (models/family.py's prompt_ids) and its tokenizer in model
ids for the answer (Samsone's pruned vocabulary, lower-cased; TinyMU's `!` as a token of its own).
Two text encodings (TrainOptions.text):
- mellow: the prompt as at inference; the answer is the tokenizer's ids without special tokens,
  then the end of text (cfg.eos_token_id), so the model learns where to stop; padding is never a
  label.
- official (Mellow's authors'): as their training loader (data/audiotext_dataset.py
  `_tokenize_text`) and loss (training/trainer.py): prompt and answer each get ' <|endoftext|>'
  appended before tokenizing, the answer is cut to `max_answer_tokens` tokens (the end of text
  too, when it falls past the cut), and every `!` token (their pad token) is left out of the
  loss, real ones included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellow_cli.train.view import answer_logits, row_logits  # noqa: F401  (answer_logits: re-exported)

IGNORE = -100  # label of a position that is not an answer token (cross_entropy's ignore_index)
OFFICIAL_END = " <|endoftext|>"  # what the authors append to prompts and answers


def encode_answers(tokenizer, answers: list[str], cfg, max_tokens: int = 256, text: str = "mellow"):
    """Answers -> ids (B, A) and mask (B, A) of the tokens the loss covers, right-padded with the
    family's pad token (its end of text where it has none)."""
    if text == "official":
        rows = [tokenizer(a + OFFICIAL_END, add_special_tokens=True)["input_ids"][:max_tokens] for a in answers]
    else:
        rows = [(tokenizer(a, add_special_tokens=False)["input_ids"] + [cfg.eos_token_id])[:max_tokens]
                for a in answers]
    width = max(len(r) for r in rows)
    pad = getattr(cfg, "pad_token_id", cfg.eos_token_id)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    if text == "official":
        mask &= ids != pad  # ignore_index = the pad token's id
    return ids, mask


def encode_prompts(family, tokenizer, questions: list[str], cfg, text: str = "mellow") -> list[list[int]]:
    """Each question's prompt ids, as the family asks it at inference."""
    if text == "official":
        questions = [q + OFFICIAL_END for q in questions]
    return [family.prompt_ids(tokenizer, q, cfg) for q in questions]


def token_loss(logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    labels = answer_ids.masked_fill(~answer_mask, IGNORE)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def rows_loss(net, clips, prompts: list[list[int]], answer_ids, answer_mask, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the answer tokens (mask True) given each row's clips and prompt ids."""
    from mellow_cli.models.family import family_of

    rows = family_of(net.cfg).training_rows(net, clips, prompts)
    return token_loss(row_logits(net.lm, rows, answer_ids), answer_ids, answer_mask, reduction)


def answer_loss(net, wav1, wav2, prompt_ids, answer_ids, answer_mask, reduction: str = "mean") -> torch.Tensor:
    """rows_loss of a Mellow batch as tensors: clips (B, N) each (wav2 is wav1: one clip a row)
    and the padded prompts (B, prompt_tokens)."""
    clips = [[a] if wav2 is wav1 else [a, b] for a, b in zip(wav1, wav2)]
    return rows_loss(net, clips, prompt_ids.tolist(), answer_ids, answer_mask, reduction)


class TrainingView(nn.Module):
    """What DistributedDataParallel wraps: its forward is the loss (DDP hooks into forward)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, clips, prompts, answer_ids, answer_mask):
        return rows_loss(self.net, clips, prompts, answer_ids, answer_mask)
