"""The public Python API over a tiny random model: the wiring from audio to answer."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_tone

from mellow_cli import load_model
from mellow_cli.api import Question
from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.errors import ModelError

SHORT = DecodingOptions(max_tokens=6)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", progress=False)


def tone(freq: float, seconds: float = 10.0) -> np.ndarray:
    t = np.arange(int(seconds * 32000)) / 32000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32")


def test_loads_with_its_config_and_name(model, tiny_model_dir):
    assert model.cfg.name == "tiny"
    assert model.name == str(tiny_model_dir)
    assert model.device.type == "cpu"


def test_ask_answers_text_within_the_token_budget(model):
    answer = model.ask(tone(440), "what do you hear?", options=SHORT)
    assert isinstance(answer, str)
    assert len(model.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= SHORT.max_tokens


def test_one_clip_is_paired_with_itself(model):
    a = tone(440)
    assert model.ask(a, "what do you hear?", options=SHORT) == model.ask(a, "what do you hear?", audio2=a, options=SHORT)


def test_paths_and_arrays_give_the_same_answer(model, tmp_path):
    path = write_tone(tmp_path / "a.wav", 440, seconds=10.0, sr=32000)
    assert model.ask(str(path), "q", options=SHORT) == model.ask(tone(440), "q", options=SHORT)


def test_stream_pieces_join_to_the_answer(model):
    a, b = tone(440), tone(880)
    pieces = list(model.stream(a, "which is higher?", audio2=b, options=SHORT))
    assert "".join(pieces) == model.ask(a, "which is higher?", audio2=b, options=SHORT)


def test_batch_equals_one_by_one(model):
    rows = [Question(tone(440), None, "what is it?"), Question(tone(880), tone(220), "compare them."),
            (tone(330), None, "caption the audio.")]  # a plain tuple is a question too
    one_by_one = [model.ask(audio1, prompt, audio2=audio2, options=SHORT) for audio1, audio2, prompt in rows]
    assert model.ask_batch(rows, SHORT) == one_by_one
    assert one_by_one[0] == model.caption(tone(440), "what is it?", options=SHORT)
    assert one_by_one[1] == model.compare(tone(880), tone(220), "compare them.", options=SHORT)


def test_a_question_is_a_named_triple_and_the_second_clip_a_keyword(model):
    q = Question(tone(440), None, "what is it?")
    audio1, audio2, prompt = q
    assert (q.audio1 is audio1, q.audio2, q.prompt) == (True, None, "what is it?")
    with pytest.raises(TypeError):  # a third positional argument could be taken for the second clip
        model.ask(tone(440), "what is it?", tone(880))


def test_prefix_depends_on_the_audio(model):
    p1 = model.prefix([Question(tone(440), None, "q")]).embeds
    p2 = model.prefix([Question(tone(880), None, "q")]).embeds
    assert p1.shape == (1, model.cfg.prefix_len, model.cfg.hidden_size)
    assert not np.allclose(p1.numpy(), p2.numpy())
    # the prompt part is the same text, so those positions agree
    assert np.allclose(p1[0, -model.cfg.prompt_tokens :].numpy(), p2[0, -model.cfg.prompt_tokens :].numpy())


def test_each_clip_is_encoded_once(model, monkeypatch):
    calls = []
    encode = model.net.encode_audio
    monkeypatch.setattr(model.net, "encode_audio", lambda wav: calls.append(len(wav)) or encode(wav))
    a, b = tone(123), tone(321)
    model.ask(a, "q1", audio2=b, options=SHORT)
    model.ask(a, "q2", audio2=b, options=SHORT)
    model.ask(b, "q3", options=SHORT)
    assert sum(calls) == 2


def test_choose_names_exactly_one_choice_with_probabilities(model):
    result = model.choose(tone(440), "what is it?", ["a dog", "a cat", "a car engine"])
    assert result.choice in ("a dog", "a cat", "a car engine")
    assert sum(result.probabilities) == pytest.approx(1.0)
    best = max(range(3), key=lambda i: result.probabilities[i])
    assert result.scores[best].text == result.choice
    assert [d["choice"] for d in result.as_dict()] == ["a dog", "a cat", "a car engine"]


def test_missing_cuda_is_a_clear_error(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="no CUDA device"):
        load_model(str(tiny_model_dir), device="cuda")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_smaller_dtypes_on_cpu_change_only_the_lm_matrices(tiny_model_dir, model, dtype):
    import torch

    fast = load_model(str(tiny_model_dir), device="cpu", dtype=dtype, progress=False)
    lm = fast.net.lm
    assert fast.precision.name == dtype and lm.prepared
    if dtype != "int8":
        assert lm.model.layers[0].self_attn.qkv.weight.dtype == getattr(torch, dtype)
    assert lm.model.embed_tokens.weight.dtype == torch.float32  # the activations' dtype
    ids = torch.tensor([[0, 5, 17]])
    looked_up = lm.embed(ids)
    assert looked_up.dtype == torch.float32 and looked_up.shape == (1, 3, model.cfg.hidden_size)
    exact = load_model(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
    table = exact.net.lm.model.embed_tokens.weight[ids]  # float32 keeps its table
    if dtype == "int8":  # its head holds no plain copy of the table: the float32 table stays
        assert torch.equal(looked_up, table)
    else:  # the tied table is read from the head's half-precision matrix, and the float32 one is gone
        assert lm.model.embed_tokens.weight.numel() == 0
        assert torch.equal(looked_up, table.to(getattr(torch, dtype)).float())
    assert fast.net.audio_encoder.projection.linear1.weight.dtype == torch.float32
    assert fast.net.audio_encoder.base.c2l.weight.dtype == torch.float32
    a = tone(440)
    # tiny random weights have no near ties to speak of: the answer matches float32's
    assert fast.ask(a, "q", options=SHORT) == model.ask(a, "q", options=SHORT)


def test_auto_is_measured_once_and_kept_in_the_cache(tiny_model_dir, monkeypatch):
    import torch

    from mellow_cli.store import loading
    from mellow_cli.runtime import precision

    monkeypatch.setattr(precision, "_measured", {})
    calls = []
    real = precision.measure
    monkeypatch.setattr(precision, "measure", lambda: calls.append(1) or real(hidden=32, intermediate=64, kv=16, vocab=128, layers=2, timed_layers=1))
    first = load_model(str(tiny_model_dir), device="cpu", progress=False)  # dtype None: auto
    assert first.precision.chosen_by.startswith("auto: measured now") and calls == [1]
    assert first.precision.store in precision.DTYPES and first.net.lm.prepared
    saved = (loading.cache_dir() / "precision.json").read_text()
    assert precision.machine_key() in saved and "timings_ms" in saved
    monkeypatch.setattr(precision, "_measured", {})  # a new process: the file answers
    again = precision.named("auto", torch.device("cpu"))
    assert calls == [1] and again.chosen_by.startswith("auto: measured before")
    assert (again.store, again.decode, again.prefill) == (first.precision.store, first.precision.decode,
                                                          first.precision.prefill)


def test_a_broken_precision_cache_is_measured_again(monkeypatch):
    import torch

    from mellow_cli.store import loading
    from mellow_cli.runtime import precision

    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.setattr(precision, "measure", lambda: (precision.EXACT, {}, 1.0))
    path = loading.cache_dir() / "precision.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"%s": {"name": "gibberish"}}' % precision.machine_key())
    assert precision.named("auto", torch.device("cpu")).name == "float32"


def test_a_batch_larger_than_the_clip_cache(tiny_model_dir):
    small = load_model(str(tiny_model_dir), device="cpu", progress=False)
    small._clip_cache = 2  # fewer entries than distinct clips in one call
    clips = [tone(f) for f in (200, 300, 400, 500)]
    embedded = small.embed_clips(clips)
    assert len(embedded) == 4
    assert len(small._clips) == 2
    one = small.embed_clips([clips[0]])[0]
    assert np.allclose(embedded[0].numpy(), one.numpy(), atol=1e-6)


def test_unknown_dtype_is_a_usage_error_before_loading(tmp_path):
    from mellow_cli.errors import UsageError

    with pytest.raises(UsageError, match="unknown dtype 'fp16'"):
        load_model(str(tmp_path / "not-even-there"), device="cpu", dtype="fp16")


def test_converted_weights_release_their_file_pages_and_nothing_else(tiny_model_dir, tmp_path):
    """The pages dropped after conversion are the file's own: reading them again gives the file's
    bytes, and a tensor in our own memory is left alone."""
    import torch
    from safetensors.torch import load_file, save_file

    from mellow_cli.files import FilePages

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(8192, dtype=torch.float32), "b": torch.ones(8192)}, str(path))
    mapped = load_file(str(path))
    ours = mapped["a"].clone()
    drop = FilePages(path)
    assert drop([mapped["a"]]) > 0
    assert torch.equal(mapped["a"], ours) and torch.equal(mapped["b"], torch.ones(8192))
    assert drop([ours]) == 0 and torch.equal(ours, torch.arange(8192, dtype=torch.float32))
    assert FilePages(tmp_path / "elsewhere")([mapped["b"]]) == 0  # mapped, but from another file
