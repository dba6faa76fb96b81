"""TinyMU against the authors' own code's outputs (the golden set: rule-made encoder and projector
weights, the real SmolLM2 weights), stage by stage at float32: front end from the stored 16 kHz
waveforms, encoder, projector, prefix, first logits and 40 greedy tokens. Tolerances are the golden
set's: about 1e-4 up to the prefix, 1e-3 on logits, identical tokens.

The golden batch holds a 10 s clip and a 7 s clip, which the authors zero-pad to 10 s to batch
them; that row is reproduced by padding the clip the same way here. Alone, the clip gives 44
tokens, not 63: what the model gives for it in our hands."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import decode_row
from mellow_cli.runtime.tokenizer import Tokenizer
from mellow_cli.models.tinymu.checkpoint import ALIAS, EMBED, HEAD, export, read_published
from mellow_cli.models.tinymu.clip import fit_clip
from mellow_cli.models.tinymu.config import TinyMUConfig
from mellow_cli.models.tinymu.frontend import LogMel
from mellow_cli.models.tinymu.prompt import prompt_ids

TINYMU = TinyMUConfig.tinymu()
PREFIX_TOL = 1e-4
LOGIT_TOL = 1e-3


def batch_rows(golden) -> list[torch.Tensor]:
    """The two clips as the authors' batch holds them: the 7 s one zero-padded to 10 s."""
    a, b = torch.from_numpy(golden["loaded_a"]), torch.from_numpy(golden["loaded_b"])
    return [a, F.pad(b, (0, len(a) - len(b)))]


def max_diff(a: torch.Tensor, b) -> float:
    return (a - torch.as_tensor(b)).abs().max().item()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer(smollm2_dir)


# --- fast: no checkpoint ---------------------------------------------------------------------------


@torch.inference_mode()
def test_log_mel_of_a_fresh_front_end(tinymu_golden):
    """Computed window and mel matrix (not the checkpoint's), from the stored waveforms."""
    log_mel = LogMel(TINYMU)(torch.stack(batch_rows(tinymu_golden)))
    assert log_mel.shape == tinymu_golden["logmel"].shape == (2, 80, 998)
    assert max_diff(log_mel, tinymu_golden["logmel"]) < PREFIX_TOL


def test_the_stored_loads_are_the_first_channel(tinymu_golden):
    """Our clip rule on the golden loader inputs already at 16 kHz: the authors' loader output for
    clip A, and for the 1000-frame clip its sound, where the authors' loader gives 10 s of zeros."""
    wav_a = tinymu_golden["wav_a"] / np.float32(32768)
    assert torch.equal(fit_clip(wav_a, TINYMU), torch.from_numpy(tinymu_golden["loaded_a"]))
    wav1 = tinymu_golden["extra1_wav"] / np.float32(32768)
    assert not tinymu_golden["extra1_loaded"].any() and tinymu_golden["extra1_loaded"].shape == (160000,)
    ours = fit_clip(wav1, TINYMU)
    assert ours.shape == (1000,) and torch.equal(ours, torch.from_numpy(wav1[0].astype(np.float32)))


def test_prompt_ids_are_the_golden_prompts_unpadded(tinymu_golden, tokenizer):
    for text, ids, mask in zip(tinymu_golden["prompts"], tinymu_golden["input_ids"], tinymu_golden["attention_mask"]):
        real = ids[mask == 1].tolist()
        assert prompt_ids(tokenizer, str(text)) == real
        assert ids[mask == 0].tolist() == [TINYMU.pad_token_id] * (129 - len(real))


# --- slow: the golden checkpoint ---------------------------------------------------------------


@pytest.mark.slow
def test_buffers_we_compute_are_the_checkpoints(tinymu_golden_model):
    """The file's buffers are the ones used (the strict load overwrites them); a fresh build
    computes the same window bit for bit and the same mel matrix to float32 rounding."""
    stored = tinymu_golden_model.audio_encoder.enc.log_mel.MelSpectrogram
    fresh = LogMel(TINYMU).MelSpectrogram
    assert torch.equal(fresh.spectrogram.window, stored.spectrogram.window)
    assert torch.equal(fresh.mel_scale.fb == 0, stored.mel_scale.fb == 0)
    assert max_diff(fresh.mel_scale.fb, stored.mel_scale.fb) <= 2e-7


@pytest.mark.slow
@torch.inference_mode()
def test_golden_log_mel_encoder_and_projector(tinymu_golden_model, tinymu_golden):
    enc = tinymu_golden_model.audio_encoder.enc
    for i, wave in enumerate(batch_rows(tinymu_golden)):
        assert max_diff(enc.log_mel(wave[None])[0], tinymu_golden["logmel"][i]) < PREFIX_TOL
        encoded = tinymu_golden_model.audio_encoder(wave[None])[0]
        assert encoded.shape == (63, 3840)
        assert max_diff(encoded, tinymu_golden["encoder_out"][i]) < PREFIX_TOL
        projected = tinymu_golden_model.projector(torch.from_numpy(tinymu_golden["encoder_out"][i]))
        assert max_diff(projected, tinymu_golden["projector_out"][i]) < PREFIX_TOL
        (tokens,) = tinymu_golden_model.encode_clips([wave])
        assert max_diff(tokens, tinymu_golden["projector_out"][i]) < PREFIX_TOL


@pytest.fixture(scope="module")
def golden_rows(tinymu_golden_model, tinymu_golden, tokenizer):
    with torch.inference_mode():
        audio = tinymu_golden_model.encode_clips(batch_rows(tinymu_golden))
        return [tinymu_golden_model.prefix_row([a], prompt_ids(tokenizer, str(p)))
                for a, p in zip(audio, tinymu_golden["prompts"])]


@pytest.mark.slow
def test_golden_prefix(golden_rows, tinymu_golden):
    """Our embeds are the reference prefix's unpadded part; our query is its last `!` pad."""
    for i, row in enumerate(golden_rows):
        prefix, mask = tinymu_golden["prefix"][i], tinymu_golden["prefix_mask"][i]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and row.embeds.shape == (n, 576)
        assert max_diff(row.embeds, prefix[:n]) < PREFIX_TOL
        assert torch.equal(row.query, torch.from_numpy(prefix[-1]))
        assert (row.query_position, row.next_position) == (192, 193)


@pytest.mark.slow
def test_golden_first_logits_and_greedy_tokens(tinymu_golden_model, golden_rows, tinymu_golden):
    """Our language model decoding each row by its rules (query at 192 seeing the real prefix,
    answer from 193 on) gives the reference's first logits and its 40 greedy tokens."""
    for i, row in enumerate(golden_rows):
        first, ids = decode_row(tinymu_golden_model.lm, row, steps=40)
        assert max_diff(first, tinymu_golden["first_logits"][i]) < LOGIT_TOL
        assert ids == tinymu_golden["greedy_ids"][i].tolist()


@pytest.mark.slow
def test_golden_first_logits_by_transformers(tinymu_golden_model, golden_rows, tinymu_golden):
    """transformers' Llama, given our row with explicit positions and a mask that hides the
    query from itself, agrees: the row is the authors' padded prefix without its dead pads."""
    from mellow_cli.runtime.llama import transformers_twin

    twin = transformers_twin(tinymu_golden_model.lm)
    for i, row in enumerate(golden_rows):
        n = row.embeds.shape[0]
        with torch.inference_mode():
            logits = twin(inputs_embeds=torch.cat([row.embeds, row.query[None]])[None],
                          position_ids=torch.tensor([[*range(n), row.query_position]]),
                          attention_mask=torch.tensor([[1] * n + [0]])).logits[0, -1]
        assert max_diff(logits, tinymu_golden["first_logits"][i]) < LOGIT_TOL


@pytest.mark.slow
@torch.inference_mode()
def test_the_short_clip_alone_gives_its_own_44_tokens(tinymu_golden_model, tinymu_golden):
    alone = tinymu_golden_model.encode_clips([torch.from_numpy(tinymu_golden["loaded_b"])])[0]
    assert alone.shape == (44, 576)
    # what zero-padding in the authors' batch changed: not only more tokens, other values
    assert max_diff(alone, tinymu_golden["projector_out"][1][:44]) > 1e-2


@pytest.mark.slow
def test_golden_checkpoint_reads_and_exports_to_itself(tinymu_golden_checkpoint):
    obj = torch.load(tinymu_golden_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    state = read_published(obj)
    assert len(state) == 429 and ALIAS not in state
    again = export(state, TINYMU)["model"]
    assert list(again) == list(obj["model"])
    for key, value in obj["model"].items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key
    assert again[EMBED] is again[HEAD] is again[ALIAS]
