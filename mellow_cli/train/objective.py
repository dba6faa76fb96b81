"""The training objective (arXiv 2503.08540, reference soham97/mellow `models/decoder.py`):
next-token cross-entropy on the answer tokens only, fed after the 389-position prefix (clip 1 · sep
· clip 2 · sep · prompt padded with `!`). Logits are computed for the answer positions alone (the
vocabulary is 49152 wide).

Two text encodings (TrainOptions.text):
- mellow: the prompt as at inference; the answer is the tokenizer's ids without special tokens,
  then `<|endoftext|>`, so the model learns where to stop; padding is never a label.
- official: as the authors' training loader (data/audiotext_dataset.py `_tokenize_text`) and loss
  (training/trainer.py): prompt and answer each get ' <|endoftext|>' appended before tokenizing,
  the answer is cut to `max_answer_tokens` tokens (the end of text too, when it falls past the
  cut), and every `!` token (their pad token) is left out of the loss, real ones included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellow_cli.models.mellow.config import MellowConfig

IGNORE = -100  # label of a position that is not an answer token (cross_entropy's ignore_index)
OFFICIAL_END = " <|endoftext|>"  # what the authors append to prompts and answers


def encode_answers(tokenizer, answers: list[str], cfg: MellowConfig, max_tokens: int = 256, text: str = "mellow"):
    """Answers -> ids (B, A) and mask (B, A) of the tokens the loss covers, right-padded with
    `pad_token_id`."""
    if text == "official":
        rows = [tokenizer(a + OFFICIAL_END, add_special_tokens=True)["input_ids"][:max_tokens] for a in answers]
    else:
        rows = [(tokenizer(a, add_special_tokens=False)["input_ids"] + [cfg.eos_token_id])[:max_tokens]
                for a in answers]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    if text == "official":
        mask &= ids != cfg.pad_token_id  # ignore_index = the pad token's id
    return ids, mask


def encode_prompts(tokenizer, prompts: list[str], cfg: MellowConfig, text: str = "mellow") -> torch.Tensor:
    """Prompts -> (B, prompt_tokens) ids through the inference tokenization (tokenize_prompts)."""
    from mellow_cli.models.mellow.network import tokenize_prompts

    if text == "official":
        prompts = [p + OFFICIAL_END for p in prompts]
    return tokenize_prompts(tokenizer, prompts, cfg)


def answer_logits(lm, prefix: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: (B, A, vocab) logits predicting each answer token, from the last prefix
    position on. Right padding needs no attention mask: attention is causal, so padding only
    follows the tokens whose logits are read."""
    answer = lm.embed(answer_ids[:, :-1])  # the last token predicts nothing we train
    x = torch.cat([prefix, answer.to(prefix.dtype)], dim=1)
    return lm(inputs_embeds=x, logits_to_keep=answer_ids.shape[1]).logits


def token_loss(logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    labels = answer_ids.masked_fill(~answer_mask, IGNORE)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def answer_loss(net, wav1, wav2, prompt_ids, answer_ids, answer_mask, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the answer tokens (mask True) given two clips and the padded prompt."""
    logits = answer_logits(net.lm, net.prefix(wav1, wav2, prompt_ids), answer_ids)
    return token_loss(logits, answer_ids, answer_mask, reduction)


class TrainingView(nn.Module):
    """What DistributedDataParallel wraps: its forward is the loss (DDP hooks into forward)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, wav1, wav2, prompt_ids, answer_ids, answer_mask):
        return answer_loss(self.net, wav1, wav2, prompt_ids, answer_ids, answer_mask)
