"""Every model family through the same runtime: a question's answer and its choices' scores do
not depend on the other questions of its batch (rows of other lengths, other clips, a TinyMU
query), in torch's float32 forward and in the one-call C step, and each family's own rules for a
question (how many clips it takes) are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mellow_cli.api import Model, Question
from mellow_cli.errors import UsageError
from mellow_cli.models.family import family
from mellow_cli.runtime import precision
from mellow_cli.runtime.options import DecodingOptions

FAMILIES = ("mellow", "tinymu", "samsone")
CHOICES = [["a dog", "rain"], ["music", "a car horn", "birds"], ["yes", "no"]]


def tiny_model(name: str, tokenizer_dir, dtype: str | None = None) -> Model:
    fam = family(name)
    cfg = fam.config("tiny")
    torch.manual_seed(0)
    net = fam.build(cfg).eval()
    chosen = None
    if dtype is not None:
        chosen = precision.Precision(dtype, dtype, dtype, "float32")
        precision.apply(net.lm, chosen)
    return Model(net, fam.tokenizer(tokenizer_dir, cfg), name=name, precision=chosen)


def questions(model: Model) -> list[Question]:
    rate = model.family.sample_rate(model.cfg)
    rng = np.random.default_rng(0)
    short = (0.1 * np.sin(np.arange(rate * 3) / 7)).astype(np.float32)
    long = (0.1 * rng.standard_normal(rate * 9)).astype(np.float32)
    return [Question(short, None, "what is this?"), Question(long, None, "Describe it! now, please"),
            Question(short, None, "is it loud?")]


@pytest.mark.parametrize("dtype", [None, "float16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_answers_as_each_question_alone(name, dtype, smollm2_dir):
    model = tiny_model(name, smollm2_dir, dtype)
    if dtype is not None:
        assert model.net.lm.fused is not None  # the C step runs these rows
    asked = questions(model)
    options = DecodingOptions(max_tokens=8)
    assert model.ask_batch(asked, options) == [model.ask_batch([q], options)[0] for q in asked]
    together = model.choose_batch(asked, CHOICES)
    for q, c, got in zip(asked, CHOICES, together):
        alone = model.choose_batch([q], [c])[0]
        # float32 sums in one order whatever the batch; half precision's products may round a
        # batch's rows apart from a row's own
        assert np.allclose(got.probabilities, alone.probabilities, atol=1e-5 if dtype is None else 2e-3), (got, alone)
        assert got.choice == alone.choice


@pytest.mark.parametrize("name", FAMILIES)
def test_rows_of_other_lengths_really_differ(name, smollm2_dir):
    """The test above would pass trivially if every row had one length: they do not."""
    model = tiny_model(name, smollm2_dir)
    lengths = set(model.prefix(questions(model)).lengths)
    assert len(lengths) == (1 if name == "mellow" else 2)


def test_a_clip_too_many_is_refused_in_one_line(smollm2_dir):
    model = tiny_model("tinymu", smollm2_dir)
    clip = questions(model)[0].audio1
    with pytest.raises(UsageError, match="^tinymu: TinyMU takes 1 clip a question, not more$"):
        model.ask(clip, "which is louder?", audio2=clip)
