"""`--scorer mellow` and `--prompt-style mellow` (bench/mellow.py) against the Mellow authors' own
code: their metrics/mmau.py and metrics/aqa.py score the same predictions file as our CLI, their
data/audiotext_eval_dataset.py builds the prompt ids we compare with ours. Their code is read
from a checkout of that training release named by MELLOW_TRAINING (the tests that need it are
skipped without it); the rules are also pinned by hand-written cases, which run without it."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
from test_bench_mmau import FIXTURE, FIXTURE_DIR, ITEMS, bench

from mellow_cli.bench import mellow, mmau, runner
from mellow_cli.bench.items import prompt as plain_prompt
from mellow_cli.bench.scoring import score

# Default: the release as a `reference/mellow-training` folder in a `shared/` checkout beside this one.
_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mellow-training"
REFERENCE = Path(os.environ.get("MELLOW_TRAINING", _BESIDE))
needs_reference = pytest.mark.skipif(not (REFERENCE / "metrics" / "mmau.py").is_file(),
                                     reason="the authors' training release is not on this machine")


# --- the rules, by hand ------------------------------------------------------------------------

TWO = ["Man", "Woman"]
FIVE = ["one", "two", "three", "four", "five"]


@pytest.mark.parametrize("output, answer, choices, right", [
    ("b) woman", "Woman", TWO, True),
    ("B) WOMAN", "Woman", TWO, True),  # case is ignored
    ("b) man", "Woman", TWO, True),  # only the letter counts, not the text after it
    ("B", "Woman", TWO, True),  # no ")": the whole output is compared with the letter
    ("b", "Woman", TWO, True),
    ("Woman", "Woman", TWO, False),  # the answer's text without its letter
    ("(b) woman", "Woman", TWO, False),  # "(b" is not "b"
    ("b woman", "Woman", TWO, False),  # no ")"
    (" b) woman", "Woman", TWO, False),  # a leading space stays
    ("a) woman", "Woman", TWO, False),
    ("", "Woman", TWO, False),
    ("e) five", "five", FIVE, True),  # any letter
    ("b) whatever", "b) Woman", TWO, True),  # an answer that is no choice is taken as lettered already
    ("woman", "woman", TWO, True),  # ... "woman" is no choice ("Woman" is): compared whole, as their split does
    ("a) woman", "woman", TWO, False),
    ("woman", "woman", ["woman", "man"], False),  # a choice: lettered "a) woman", so "woman" is wrong
])
def test_mmau_letter_rule(output, answer, choices, right):
    assert mellow.mmau_correct({"answer": answer, "choices": choices, "model_output": output}) is right


@pytest.mark.parametrize("output, answer, choices, right", [
    ("b) woman", "Woman", TWO, True),
    ("xyz", "Man", TWO, True),  # no letter: counted as "a"
    ("(b) woman", "Man", TWO, True),  # "(b" is no letter: "a"
    ("(b) woman", "Woman", TWO, False),
    ("e) five", "five", FIVE, False),  # only a-d are letters; "e" can never be right
    ("e) five", "one", FIVE, True),  # ... it counts as "a"
    ("B", "Woman", TWO, True),
])
def test_aqa_letter_rule_with_its_fallback(output, answer, choices, right):
    assert mellow.aqa_correct({"answer": answer, "choices": choices, "model_output": output}) is right


@pytest.mark.parametrize("output, answer, right", [
    ("Yes, it is", "yes", True),
    ("I don't know", "no", True),  # a substring, not a word
    ("maybe", "yes", False),
    ("YES", "Yes", True),
])
def test_binary_rule_is_a_substring(output, answer, right):
    assert mellow.binary_correct({"answer": answer, "choices": ["yes", "no"], "model_output": output}) is right


def test_every_item_counts_and_six_decimals():
    records = [
        {"task": "sound", "difficulty": "easy", "answer": "Man", "choices": TWO, "model_output": "a) man"},
        {"task": "sound", "difficulty": "hard", "answer": "Man", "choices": TWO, "error": "x.wav: no such file"},
        {"task": "music", "difficulty": "easy", "answer": "Man", "choices": TWO},  # never predicted
    ]
    s = score(records, mmau.GROUPS, mellow.MMAU)
    assert (s.overall.correct, s.overall.scored, s.overall.percent) == (1, 3, 33.333333)
    assert (s.answered, s.unanswered, s.skipped) == (1, 1, 1) and s.strict == s.overall
    assert s.flags == [True, False, False]
    assert dict(s.groups["task"])["sound"].percent == 50.0
    official = score(records, mmau.GROUPS)  # evaluation.py leaves both out
    assert (official.overall.correct, official.overall.scored) == (1, 1)


def test_prompt_and_second_clip_rule():
    assert mellow.prompt("What is the MAIN sound?", ["Dog barking", "Rain"]) == \
        "what is the main sound? a) dog barking b) rain <|endoftext|>"
    assert mellow.eval_input("caption first audio") == "caption the audio <|endoftext|>"
    items = mmau.read(str(FIXTURE), str(FIXTURE_DIR))
    paired = mellow.pair_clips(items)
    pool = {item.audio for item in items}
    assert all(p.audio2 in pool for p in paired) and len({p.audio2 for p in paired}) > 3  # drawn, not fixed
    assert paired == mellow.pair_clips(items)  # the same draw every run (resume, shards)
    kept = mellow.pair_clips([items[0].__class__(**{**items[0].__dict__, "audio2": "/x.wav"})])
    assert kept[0].audio2 == "/x.wav"  # an item's own second clip is kept


# --- a predictions file with every kind of answer ---------------------------------------------


def lettered_outputs(records: list[dict]) -> list[dict]:
    """The fixture's items with outputs on which the authors' metric and evaluation.py differ."""
    out = []
    for i, item in enumerate(records):
        letter = "abcdefgh"[item["choices"].index(item["answer"])]
        other = next(c for c in item["choices"] if c != item["answer"])
        kinds = [
            f"{letter}) {item['answer']}", item["answer"], f"({letter.upper()}) {item['answer']}",
            f"{letter.upper()}) {item['answer'].upper()}", letter.upper(), f"{letter} {item['answer']}",
            f"{'b' if letter == 'a' else 'a'}) {item['answer']}", f"{letter}) {other}", f" {letter}) {item['answer']}",
            "", None, None, f"{letter})", f"the answer is {letter}) {item['answer']}",
        ]
        output = kinds[i % len(kinds)]
        if output is not None:
            out.append({**item, "model_output": output, "mode": "generate"})
        elif i % len(kinds) == 10:
            out.append({**item, "mode": "generate", "error": "clip.wav: no such file"})
        else:
            out.append(dict(item))
    return out


@contextlib.contextmanager
def stubbed(**modules):
    """Stand-ins for packages their file imports but the scoring function never calls."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def their_module(relative: str, **stubs) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"reference_{relative.replace('/', '_')[:-3]}", REFERENCE / relative)
    module = importlib.util.module_from_spec(spec)
    with stubbed(**stubs):
        spec.loader.exec_module(module)
    return module


def their_inputs(path: Path) -> tuple[list[str], list[str], list[dict]]:
    """A predictions file as their trainer hands it to the metric (training/trainer.py,
    evaluate_checkpoint): the generations, the answers as their loader returns them (the
    lettered answer of their data file, lower-cased: data/audiotext_eval_dataset.py
    `_create_answer_input`), and the benchmark items as metadata. An item we could not answer
    gives an empty generation. Written apart from bench/mellow.py on purpose."""
    records = json.loads(path.read_text())
    answers = []
    for r in records:
        if r["answer"] in r["choices"]:
            answers.append((chr(ord("a") + r["choices"].index(r["answer"])) + ") " + r["answer"]).lower())
        else:
            answers.append(r["answer"].lower())
    return [r.get("model_output", "") for r in records], answers, records


def aqa_stubs() -> dict:
    metrics = types.ModuleType("sklearn.metrics")
    for name in ("accuracy_score", "f1_score", "precision_score", "recall_score"):
        setattr(metrics, name, None)  # only evaluate_entail_metric, not compared here, uses them
    sklearn = types.ModuleType("sklearn")
    sklearn.metrics = metrics
    return {"pandas": types.ModuleType("pandas"), "sklearn": sklearn, "sklearn.metrics": metrics}


def printed(value: float) -> str:
    return f"{value:f}"  # training/trainer.py: logger.info("%s: %f", key, score)


@needs_reference
def test_mmau_scorer_gives_the_figures_of_their_metrics_mmau_py(tmp_path):
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(lettered_outputs(ITEMS), indent=1))
    theirs = their_module("metrics/mmau.py").evaluate_metric(*their_inputs(path))

    out, report = bench("mmau", "--score-only", str(path), "--scorer", "mellow", "--json")
    assert out.returncode == 1, out.stderr  # scored; 1 as always when an item is unanswered
    ours = report["score"]
    rows = {**ours["task"], **ours["difficulty"], "total": ours["overall"]}
    for key in ("sound", "music", "speech", "easy", "medium", "hard", "total"):
        assert printed(theirs[key]["score"]) == printed(rows[key]["accuracy"]), key
        assert rows[key]["accuracy"] == round(theirs[key]["score"], 6)
    assert ours["overall"]["scored"] == len(ITEMS)  # every item, the unanswered and skipped too
    assert report["scorer"] == "mellow" and "metrics/mmau.py" in report["scored_with"]
    print("their metrics/mmau.py and ours:", {k: printed(theirs[k]["score"]) for k in theirs})  # noqa: T201

    # The same file under evaluation.py: other figures, so the test above can tell them apart.
    _, official = bench("mmau", "--score-only", str(path), "--json")
    assert official["score"]["overall"]["accuracy"] != round(theirs["total"]["score"], 2)
    assert official["scorer"] == "mmau"


@needs_reference
def test_qa_scorers_give_the_figures_of_their_metrics_aqa_py(tmp_path):
    aqa = their_module("metrics/aqa.py", **aqa_stubs())
    rows = [
        ("b) woman", "Woman", TWO), ("xyz", "Man", TWO), ("(b) woman", "Woman", TWO), ("e) five", "five", FIVE),
        ("e) five", "one", FIVE), ("B", "Woman", TWO), ("c) three", "three", FIVE), ("a", "two", FIVE),
        ("d) four or e) five", "four", FIVE),
    ]
    records = [{"id": f"q{i}", "question": "?", "answer": a, "choices": c, "model_output": o}
               for i, (o, a, c) in enumerate(rows)]
    path = tmp_path / "letters.json"
    path.write_text(json.dumps(records))
    preds, answers, _ = their_inputs(path)
    theirs = aqa.evaluate_metric(preds, answers)
    out, report = bench("qa", "--score-only", str(path), "--scorer", "mellow", "--json")
    assert out.returncode == 0, out.stderr
    assert printed(theirs["ACC"]["score"]) == printed(report["score"]["overall"]["accuracy"])
    assert report["score"]["overall"]["correct"] == 6

    yes_no = [("Yes, it is", "yes"), ("I don't know", "no"), ("maybe", "yes"), ("YES", "Yes"), ("no", "yes"),
              ("not at all", "no")]
    records = [{"id": f"b{i}", "question": "?", "answer": a, "choices": ["yes", "no"], "model_output": o}
               for i, (o, a) in enumerate(yes_no)]
    path.write_text(json.dumps(records))
    theirs = aqa.evaluate_metric_binary([r["model_output"] for r in records], [r["answer"].lower() for r in records])
    out, report = bench("qa", "--score-only", str(path), "--scorer", "mellow-binary", "--json")
    assert out.returncode == 0, out.stderr
    assert printed(theirs["ACC"]["score"]) == printed(report["score"]["overall"]["accuracy"]) == "66.666667"


# --- the prompt, against their data loader -----------------------------------------------------


class _EncodePlus:
    """Their loader calls `tokenizer.encode_plus(..., pad_to_max_length=True)`, which the
    installed transformers no longer has; `padding="max_length"` is what that flag meant."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_plus(self, text, pad_to_max_length=False, **kwargs):
        return self.tokenizer(text, padding="max_length" if pad_to_max_length else False, **kwargs)


def their_eval_dataset(tokenizer_dir: Path):
    import transformers  # noqa: F401  (imported before the torchaudio stand-in, which it would probe)

    data = types.ModuleType("data")
    data.__path__ = [str(REFERENCE / "data")]
    template = their_module("data/template.py")
    module = their_module("data/audiotext_eval_dataset.py", torchaudio=types.ModuleType("torchaudio"), data=data,
                          **{"data.template": template})
    dataset = module.AudioTextEvalDataset.__new__(module.AudioTextEvalDataset)  # no audio, no files
    dataset.tokenizer = _EncodePlus(dataset._create_tokenizer(str(tokenizer_dir)))
    dataset.ip_text_len, dataset.op_text_len = 129, 250  # config/eval_1gpu.yaml
    return module, dataset


@needs_reference
def test_prompt_ids_equal_their_eval_dataset(smollm2_dir, tmp_path):
    from mellow_cli.models.mellow.config import MellowConfig
    from mellow_cli.models.mellow.network import tokenize_prompts
    from mellow_cli.runtime.tokenizer import Tokenizer

    _, dataset = their_eval_dataset(smollm2_dir)
    # Their data file's input is the question with its options inline; long choices test the cut at 129.
    items = ITEMS[:6] + [{**ITEMS[6], "choices": ["A very long option, " * 12, "Short"]}]
    dataset.all_data_json = [{"filepath1": "x.wav", "filepath2": "", "caption1": "", "answer": i["answer"],
                              "input": plain_prompt(i["question"], i["choices"])} for i in items]
    for rewritten in ("caption first audio", "explain the difference in detail"):
        dataset.all_data_json.append({"filepath1": "x.wav", "filepath2": "", "caption1": "c", "answer": "a",
                                      "input": rewritten})
    ours_text = [mellow.prompt(i["question"], i["choices"]) for i in items]
    ours_text += [mellow.eval_input(row["input"]) for row in dataset.all_data_json[len(items):]]
    ours = tokenize_prompts(Tokenizer(smollm2_dir), ours_text, MellowConfig())
    for index, text in enumerate(ours_text):
        _, tok_input, _, input_text = dataset._read_text(index)
        assert text == input_text + " <|endoftext|>"
        assert ours[index].tolist() == tok_input["input_ids"][0].tolist(), text
    assert ours[-3][-1] == 17 and 0 in ours[0].tolist()  # padded with "!"; the end of text is a token


@needs_reference
def test_second_clip_pool_is_theirs(smollm2_dir, tmp_path):
    module, dataset = their_eval_dataset(smollm2_dir)
    rows = [{"filepath1": i["audio_id"], "filepath2": "", "input": "?", "answer": i["answer"]} for i in ITEMS]
    rows[0]["filepath2"] = ITEMS[1]["audio_id"]
    data = tmp_path / "their.json"
    data.write_text(json.dumps(rows))
    dataset.collect_data_jsons(str(FIXTURE_DIR), [str(data)])
    loaded = []
    module.torchaudio = types.SimpleNamespace(load=lambda path, channels_first: loaded.append(path) or (None, 32000))
    dataset._read_audio(0)
    dataset._read_audio(1)
    assert Path(loaded[1]) == FIXTURE_DIR / ITEMS[1]["audio_id"]  # a row's own second clip is kept
    assert Path(loaded[3]).resolve() in {(FIXTURE_DIR / p).resolve() for p in dataset.exists_filepaths1}
    items = mmau.read(str(FIXTURE), str(FIXTURE_DIR))
    ours = {Path(p).resolve() for p in {i.audio for i in items}}
    assert ours == {(FIXTURE_DIR / p).resolve() for p in dataset.exists_filepaths1}
    assert {Path(i.audio2).resolve() for i in mellow.pair_clips(items)} <= ours


# --- through the runner and the command --------------------------------------------------------


class _Recorder:
    """A model that answers "a) ..." and remembers what it was asked."""

    name, revision = "recorder", None

    def __init__(self):
        from mellow_cli.models.mellow.config import MellowConfig

        from mellow_cli.api import ClipReader
        from mellow_cli.models.family import family_of

        self.cfg = MellowConfig.tiny()
        self.read_clip = ClipReader(family_of(self.cfg), self.cfg)
        self.asked = []

    def ask_batch(self, questions, options):
        self.asked += questions
        return ["a) first"] * len(questions)


def test_the_mellow_prompt_reaches_the_model(tmp_path):
    model = _Recorder()
    settings = runner.Settings(mode="generate", prompt_style="mellow", limit=4, max_tokens=4)
    report = runner.run(mmau, str(FIXTURE), str(FIXTURE_DIR), str(tmp_path / "p.json"), settings, lambda: model,
                        mellow.MMAU)
    assert [q for _, _, q in model.asked] == [mellow.prompt(i["question"], i["choices"]) for i in ITEMS[:4]]
    assert all(second is not None for _, second, _ in model.asked)  # paired with a drawn clip, not itself
    records = json.loads((tmp_path / "p.json").read_text())
    assert {r["prompt_style"] for r in records} == {"mellow"}
    right = sum(i["choices"].index(i["answer"]) == 0 for i in ITEMS[:4])
    assert report.score.overall.correct == right and report.meta["prompt_style"] == "mellow"


def test_the_command_with_the_mellow_protocol(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("mmau", "--data", str(FIXTURE), "--mode", "generate", "--limit", "3", "--max-tokens", "3", "-q")
    out, report = bench(*args, "--prompt-style", "mellow", "--scorer", "mellow", "--json", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    default = tmp_path / f"mmau-fixture-{tiny_model_dir.name}-generate-mellow.json"
    assert report["predictions"] == default.name and report["scorer"] == "mellow"
    assert report["score"]["overall"]["scored"] == 3
    table, _ = bench(*args, "--prompt-style", "mellow", "--scorer", "mellow", "--resume", model=tiny_model_dir)
    assert table.returncode == 0 and "metrics/mmau.py" in table.stdout
    plain, _ = bench(*args, "-o", default.name, "--resume", model=tiny_model_dir)
    assert plain.returncode == 2 and "--prompt-style mellow" in plain.stderr


def test_letter_scorers_refuse_choices_mode(tmp_path):
    out, _ = bench("mmau", "--data", str(FIXTURE), "--scorer", "mellow", "-o", str(tmp_path / "p.json"))
    assert out.returncode == 2 and "use --mode generate" in out.stderr and "\n" not in out.stderr.rstrip("\n")
    out, _ = bench("mmau", "--score-only", str(FIXTURE), "--prompt-style", "mellow")
    assert out.returncode == 2 and "--prompt-style" in out.stderr
    out, _ = bench("mmau", "--score-only", str(FIXTURE), "--scorer", "mellow-binary")
    assert out.returncode == 2  # a yes/no scorer is for bench qa
