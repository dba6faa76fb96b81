"""`mellow bench mmau` and `mellow bench qa`: reading and checking the official file, the
predictions file a kill can cut short, and the command end to end on the shipped fixture
(tests/data/mmau-fixture) with the tiny random model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from test_cli_answers import mellow

from mellow_cli.bench import mmau, predictions, qa
from mellow_cli.bench.items import candidates, prompt
from mellow_cli.bench.scoring import is_correct
from mellow_cli.errors import UsageError

FIXTURE_DIR = Path(__file__).parent / "data" / "mmau-fixture"
FIXTURE = FIXTURE_DIR / "mmau-fixture.json"
ITEMS = json.loads(FIXTURE.read_text())


# --- the data file ---------------------------------------------------------------------------


def test_fixture_is_in_the_official_schema():
    keys = {"id", "audio_id", "question", "choices", "answer", "dataset", "task", "split", "category",
            "sub-category", "difficulty"}
    assert all(set(item) == keys for item in ITEMS) and len(ITEMS) == 24
    assert {i["task"] for i in ITEMS} == {"sound", "music", "speech"}
    assert {i["difficulty"] for i in ITEMS} == {"easy", "medium", "hard"}
    assert {len(i["choices"]) for i in ITEMS} == {2, 4, 5}
    assert any(len(set(i["choices"])) < len(i["choices"]) for i in ITEMS)  # a repeated choice
    assert any(isinstance(i["category"], list) for i in ITEMS)  # as 13 items of the real file
    assert all((FIXTURE_DIR / i["audio_id"]).is_file() for i in ITEMS)
    assert sum(p.stat().st_size for p in FIXTURE_DIR.rglob("*")) < 300_000


def test_read_resolves_audio_and_keeps_records():
    items = mmau.read(str(FIXTURE), str(FIXTURE_DIR))
    assert [i.key for i in items] == [r["id"] for r in ITEMS]
    assert all(Path(i.audio).is_file() and i.audio2 is None for i in items)
    assert items[0].record == ITEMS[0] and items[0].choices == tuple(ITEMS[0]["choices"])


def test_prompt_and_candidates_follow_the_reference_examples():
    assert prompt("what is the primary sound event present in the clip?", ["dog barking", "chirping birds"]) == \
        "what is the primary sound event present in the clip? a) dog barking b) chirping birds"
    assert candidates(["Man", "Woman", "Woman"]) == ["a) man", "b) woman", "c) woman"]


def write(tmp_path, data, name="data.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("data, message", [
    ({"items": ITEMS}, "expected a JSON list of items, found a JSON object"),
    ("[{\"id\": 1,", "not JSON"),
    ([], "holds no items"),
    ([ITEMS[0], "text"], "item [1] is a JSON string, expected an object"),
    ([ITEMS[0], {k: v for k, v in ITEMS[1].items() if k != "answer"}], f"item [1] (id {ITEMS[1]['id']}): missing key answer"),
    ([{k: v for k, v in ITEMS[0].items() if k not in ("task", "audio_id")}], "item [0] (id "),
    ([ITEMS[0], ITEMS[1], {**ITEMS[2], "id": ITEMS[0]["id"]}], f"item [2] repeats id {ITEMS[0]['id']} of item [0]"),
    ([{**ITEMS[0], "choices": "a|b"}], "\"choices\" must be a list of strings"),
    ([{**ITEMS[0], "choices": ["only"]}], "needs at least two choices"),
    ([{**ITEMS[0], "answer": 3}], "\"answer\" must be a string"),
])
def test_bad_data_files_get_one_clear_message(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(UsageError) as e:
        mmau.read(path, str(tmp_path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_missing_keys_are_all_named(tmp_path):
    path = write(tmp_path, [{k: v for k, v in ITEMS[0].items() if k not in ("task", "audio_id")}])
    with pytest.raises(UsageError, match="missing keys audio_id, task"):
        mmau.read(path, str(tmp_path))


def test_missing_data_file(tmp_path):
    with pytest.raises(UsageError, match="no such data file"):
        mmau.read(str(tmp_path / "nope.json"), str(tmp_path))


def test_category_list_and_repeated_choices_are_accepted(tmp_path):
    data = [{**ITEMS[0], "category": ["Reasoning"], "choices": ["four", "nine", "fourteen", "fourteen"],
             "answer": "fourteen"}]
    (item,) = mmau.read(write(tmp_path, data), str(tmp_path))
    assert item.choices == ("four", "nine", "fourteen", "fourteen")


# --- predictions files -----------------------------------------------------------------------


def test_predictions_round_trip_and_a_cut_short_list(tmp_path):
    path = str(tmp_path / "p.json")
    records = [{"id": str(i), "model_output": f"answer {i}", "note": "é\nx"} for i in range(5)]
    writer = predictions.Writer(path, records[:2])
    for r in records[2:]:
        writer.write(r)
    assert predictions.read(path) == (records, False)  # not closed yet: as after a kill
    writer.close()
    assert json.loads(Path(path).read_text()) == records  # closed: plain JSON, as evaluation.py reads it
    assert predictions.read(path) == (records, True)
    text = Path(path).read_text()
    cut = text[: text.index('"id": "3"') + 4]  # half of the fourth item
    Path(path).write_text(cut)
    assert predictions.read(path) == (records[:3], False)
    predictions.Writer(path, records[:3]).close()
    assert json.loads(Path(path).read_text()) == records[:3]
    Path(path).write_text(cut + "\n]\n")  # Ctrl-C in the middle of a write, then the list closed
    assert predictions.read(path) == (records[:3], False)


def test_predictions_that_are_not_a_list_are_refused(tmp_path):
    with pytest.raises(UsageError, match="not JSON"):
        predictions.read(write(tmp_path, "{\"id\": 1,\n"))
    with pytest.raises(UsageError, match="line 3 is not a JSON item"):
        predictions.read(write(tmp_path, "[\n{\"id\": 1},\n{oops\n{\"id\": 2}\n"))


# --- qa files --------------------------------------------------------------------------------


def test_qa_rows(tmp_path):
    rows = [{"audio": "a.wav", "question": "q?", "choices": "dog|cat", "answer": "dog"},
            {"audio": "b.wav", "audio2": "c.wav", "question": "q2?", "choices": ["x", "y"], "answer": "y", "id": 7}]
    path = write(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n\n", "q.jsonl")
    first, second = qa.read(path, str(tmp_path / "root"))
    assert first.key == "line 1" and first.choices == ("dog", "cat") and first.audio2 is None
    assert first.audio == str(tmp_path / "root" / "a.wav") and second.audio2 == str(tmp_path / "root" / "c.wav")
    assert second.key == "7" and first.record["line"] == 1


def test_qa_reads_the_training_format(tmp_path):
    """`mellow train`'s rows name the first clip audio1: the same file scores with bench qa."""
    row = {"audio1": "a.wav", "question": "q?", "choices": ["dog", "cat"], "answer": "cat", "task": "pets"}
    (item,) = qa.read(write(tmp_path, json.dumps(row) + "\n", "t.jsonl"), str(tmp_path))
    assert item.audio == str(tmp_path / "a.wav") and item.choices == ("dog", "cat")


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not JSON"),
    ('{"audio": "a.wav", "question": "q", "choices": ["a"], "answer": "a"}', "line 1: choices: needs at least two non-empty choices"),
    ('{"audio": "a.wav", "choices": ["a", "b"], "answer": "a"}', "line 1: needs a non-empty \"question\""),
    ('{"audio": "a.wav", "question": "q", "choices": ["a", "b"], "answer": "a", "id": 1}\n'
     '{"audio": "b.wav", "question": "q", "choices": ["a", "b"], "answer": "a", "id": 1}', "line 2 repeats id 1 of line 1"),
])
def test_bad_qa_files(tmp_path, line, message):
    path = write(tmp_path, line, "q.jsonl")
    with pytest.raises(UsageError, match=None) as e:
        qa.read(path, str(tmp_path))
    assert str(e.value).startswith(path) and message in str(e.value)


# --- the command end to end ------------------------------------------------------------------


def bench(*args, model=None) -> tuple:
    """Run `mellow bench ...`; returns (CompletedProcess, parsed --json report or None)."""
    extra = ("--model", str(model)) if model else ()
    out = mellow("bench", *args, *extra)
    report = json.loads(out.stdout) if "--json" in args and out.stdout.strip() else None
    return out, report


def own_score(records: list[dict]) -> float:
    """The accuracy of a predictions file, counted here straight from the matcher."""
    scored = [r for r in records if "model_output" in r]
    return round(100 * sum(is_correct(r["answer"], r["model_output"], r["choices"]) for r in scored) / len(scored), 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["choices", "generate"])
def test_mmau_end_to_end_on_the_fixture(tiny_model_dir, tmp_path, mode):
    out_file = tmp_path / "p.json"
    out, report = bench("mmau", "--data", str(FIXTURE), "--mode", mode, "-o", str(out_file), "--json",
                        "--max-tokens", "6", "-q", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    records = json.loads(out_file.read_text())  # plain JSON: what evaluation.py reads
    assert [r["id"] for r in records] == [i["id"] for i in ITEMS]
    for record, item in zip(records, ITEMS):
        assert {k: record[k] for k in item} == item  # the official item, untouched
        assert isinstance(record["model_output"], str) and record["mode"] == mode
        if mode == "choices":
            assert record["model_output"] in item["choices"]
    assert report["data_sha256"] == hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
    assert report["model"] == str(tiny_model_dir) and "revision" in report and report["mode"] == mode
    assert report["score"]["counts"] == {"items": 24, "answered": 24, "unanswered": 0, "skipped": 0}
    assert report["score"]["overall"]["accuracy"] == own_score(records)
    assert sum(v["scored"] for v in report["score"]["task"].values()) == 24
    assert report["wall_seconds"] > 0 and report["predicted_now"] == 24
    print(f"fixture accuracy, tiny random model, {mode}: {report['score']['overall']['accuracy']}")  # noqa: T201


def test_the_table_names_every_group(tiny_model_dir, tmp_path):
    out, _ = bench("mmau", "--data", str(FIXTURE), "-o", str(tmp_path / "p.json"), "--limit", "6", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    for word in ("task", "difficulty", "sub-category", "overall", "sound", "answered 6, unanswered 0, skipped 0",
                 hashlib.sha256(FIXTURE.read_bytes()).hexdigest()):
        assert word in out.stdout


def test_resume_after_a_kill_predicts_only_the_rest(tiny_model_dir, tmp_path):
    out_file = tmp_path / "p.json"
    args = ("mmau", "--data", str(FIXTURE), "-o", str(out_file), "--limit", "12", "--json", "-q")
    first, _ = bench(*args, model=tiny_model_dir)
    assert first.returncode == 0, first.stderr
    full = out_file.read_text()
    lines = full.split("\n")
    cut = "\n".join(lines[:6]) + "\n" + lines[6][: len(lines[6]) // 2]  # 5 whole items, half the 6th
    out_file.write_text(cut)
    again, report = bench(*args, "--resume", model=tiny_model_dir)
    assert again.returncode == 0, again.stderr
    assert report["predicted_now"] == 12 - 5
    assert out_file.read_text() == full  # the kept items untouched, the rest predicted the same
    done, report = bench(*args, "--resume", model=tiny_model_dir)
    assert done.returncode == 0 and report["predicted_now"] == 0 and report["score"]["counts"]["answered"] == 12


def test_an_existing_file_needs_resume_and_the_same_mode(tiny_model_dir, tmp_path):
    out_file = tmp_path / "p.json"
    args = ("mmau", "--data", str(FIXTURE), "-o", str(out_file), "--limit", "2", "-q")
    assert bench(*args, model=tiny_model_dir)[0].returncode == 0
    refused, _ = bench(*args, model=tiny_model_dir)
    assert refused.returncode == 2 and "add --resume" in refused.stderr
    other_mode, _ = bench(*args, "--resume", "--mode", "generate", model=tiny_model_dir)
    assert other_mode.returncode == 2 and "--mode choices" in other_mode.stderr
    records = json.loads(out_file.read_text())
    out_file.write_text(json.dumps([{**r, "model": "someone-else"} for r in records]))
    other_model, _ = bench(*args[:-3], "--limit", "3", "-q", "--resume", model=tiny_model_dir)
    assert other_model.returncode == 2 and "predictions of model someone-else" in other_model.stderr


def test_limit_and_shard(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, report = bench("mmau", "--data", str(FIXTURE), "--shard", "2/3", "--json", "-q", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    default = tmp_path / f"mmau-fixture-{tiny_model_dir.name}-choices-shard2of3.json"
    assert report["predictions"] == default.name and default.exists()
    assert [r["id"] for r in json.loads(default.read_text())] == [i["id"] for i in ITEMS[1::3]]
    assert report["items_selected"] == 8 and report["shard"] == "2/3"
    out, report = bench("mmau", "--data", str(FIXTURE), "--shard", "2/3", "--limit", "3", "-o", "l.json", "--json",
                        "-q", model=tiny_model_dir)
    assert [r["id"] for r in json.loads((tmp_path / "l.json").read_text())] == [i["id"] for i in ITEMS[1::3][:3]]
    assert report["score"]["counts"]["items"] == 3


def test_a_missing_audio_file_is_counted_as_unanswered(tiny_model_dir, tmp_path):
    copy = tmp_path / "mmau"
    shutil.copytree(FIXTURE_DIR, copy)
    gone = copy / ITEMS[4]["audio_id"]
    saved = gone.read_bytes()
    gone.unlink()
    out_file = tmp_path / "p.json"
    args = ("mmau", "--data", str(copy / "mmau-fixture.json"), "-o", str(out_file), "--limit", "8", "--json")
    out, report = bench(*args, model=tiny_model_dir)
    assert out.returncode == 1  # reported, the run went on, and the exit code says so
    assert f"item {ITEMS[4]['id']}: " in out.stderr and "no such file" in out.stderr and "unanswered" in out.stderr
    assert report["score"]["counts"] == {"items": 8, "answered": 7, "unanswered": 1, "skipped": 0}
    records = json.loads(out_file.read_text())
    assert "model_output" not in records[4] and "no such file" in records[4]["error"]
    assert all("model_output" in r for i, r in enumerate(records) if i != 4)
    gone.write_bytes(saved)
    again, report = bench(*args, "--resume", model=tiny_model_dir)
    assert again.returncode == 0, again.stderr
    assert report["predicted_now"] == 1 and report["score"]["counts"]["answered"] == 8


HAND = [  # (answer, choices, model_output): official result in the comment
    ("Man", ["Man", "Woman"], "man"),  # right
    ("Woman", ["Man", "Woman"], "The answer is Woman"),  # right: no choice has "the", "answer", "is"
    ("two", ["one", "two", "three"], "B"),  # wrong: a bare letter
    ("two", ["one", "two", "three"], "one or two"),  # wrong: two choices
]


def hand_written(tmp_path) -> Path:
    records = [{**ITEMS[i], "answer": a, "choices": c, "model_output": o} for i, (a, c, o) in enumerate(HAND)]
    records.append(dict(ITEMS[5]))  # no model_output: skipped, out of the denominator
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def test_score_only_on_hand_written_predictions(tmp_path):
    out, report = bench("mmau", "--score-only", str(hand_written(tmp_path)), "--json")
    assert out.returncode == 0, out.stderr
    assert report["score"]["overall"] == {"accuracy": 50.0, "correct": 2, "scored": 4}
    assert report["score"]["counts"] == {"items": 5, "answered": 4, "unanswered": 0, "skipped": 1}
    assert report["data_sha256"] is None and report["model"] is None
    tasks = {i["task"] for i in ITEMS[:4]}
    assert set(report["score"]["task"]) == tasks


def test_min_accuracy_exit_codes(tmp_path):
    path = str(hand_written(tmp_path))
    assert bench("mmau", "--score-only", path, "--min-accuracy", "50")[0].returncode == 0
    low = bench("mmau", "--score-only", path, "--min-accuracy", "50.01", "--json")
    assert low[0].returncode == 1 and low[1]["passed"] is False and low[1]["min_accuracy"] == 50.01
    assert "below --min-accuracy 50.01" in low[0].stderr


def test_score_only_checks_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**ITEMS[0], "model_output": None}]))
    out, _ = bench("mmau", "--score-only", str(bad))
    assert out.returncode == 2 and "item [0]: \"model_output\" must be a string" in out.stderr
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps([{**ITEMS[0], "answer": ITEMS[0]["choices"][1], "model_output": "x"}]))
    out, _ = bench("mmau", "--score-only", str(edited), "--data", str(FIXTURE))
    assert out.returncode == 2 and "another file or revision" in out.stderr


def test_bad_data_through_the_cli_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, [ITEMS[0], ITEMS[0]])
    out, _ = bench("mmau", "--data", path)
    assert out.returncode == 2
    assert out.stderr == f"mellow: error: {path}: item [1] repeats id {ITEMS[0]['id']} of item [0]\n"
    out, _ = bench("mmau")
    assert out.returncode == 2 and "--data FILE" in out.stderr


def test_bench_qa_end_to_end(tiny_model_dir, tmp_path):
    rows = [{"audio": i["audio_id"], "question": i["question"], "choices": i["choices"], "answer": i["answer"],
             "task": i["task"]} for i in ITEMS[:5]]
    rows[1]["id"] = "second"
    rows[2]["audio2"] = ITEMS[3]["audio_id"]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_file = tmp_path / "answers.json"
    out, report = bench("qa", str(data), "--audio-root", str(FIXTURE_DIR), "-o", str(out_file), "--json", "-q",
                        model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    records = json.loads(out_file.read_text())
    assert [r.get("id", r["line"]) for r in records] == [1, "second", 3, 4, 5]
    assert all(r["model_output"] in r["choices"] for r in records)
    assert report["benchmark"] == "qa" and report["score"]["counts"]["answered"] == 5
    assert report["score"]["overall"]["accuracy"] == own_score(records)
    again, report = bench("qa", "--score-only", str(out_file), "--json")
    assert again.returncode == 0 and report["score"]["overall"]["accuracy"] == own_score(records)


def test_several_models_side_by_side(tiny_model_dir, family_model_dir, tmp_path, monkeypatch):
    """`--model a,b,c`: each model over the same items, its own predictions file, one table with
    a column per model (each family answering in its own way)."""
    monkeypatch.chdir(tmp_path)
    names = [str(tiny_model_dir), str(family_model_dir("samsone")), str(family_model_dir("tinymu"))]
    out, _ = bench("mmau", "--data", str(FIXTURE), "--limit", "24", model=",".join(names))
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if "table" in line and "row" in line)
    assert [Path(n).name in header for n in names] == [True] * 3, out.stdout
    overall = next(line for line in out.stdout.splitlines() if line.strip().startswith("overall"))
    assert len(overall.split()) == 1 + 3  # "overall", then a figure for each model
    files = sorted(p.name for p in tmp_path.glob("mmau-fixture-*-choices.json"))
    assert len(files) == 3 and all(len(json.loads((tmp_path / f).read_text())) == 24 for f in files)
    # a second run finds each model's file done
    again, _ = bench("mmau", "--data", str(FIXTURE), "--limit", "24", "--resume", model=",".join(names))
    assert again.returncode == 0 and again.stderr.count("nothing left to predict") == 3, again.stderr


# --- a second run on the same predictions file; where a row's audio is found -----------------------


def test_a_second_run_names_every_way_on_and_overwrite_replaces_only_its_own_file(tiny_model_dir, tmp_path):
    rows = [{"audio": i["audio_id"], "question": i["question"], "choices": i["choices"], "answer": i["answer"]}
            for i in ITEMS[:2]]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_file = tmp_path / "answers.json"
    args = ("qa", str(data), "--audio-root", str(FIXTURE_DIR), "-o", str(out_file), "-q")
    assert bench(*args, model=tiny_model_dir)[0].returncode == 0
    first = out_file.read_text()

    again, _ = bench(*args, model=tiny_model_dir)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    for way in ("--resume", "--overwrite", f"--score-only {out_file}"):
        assert way in again.stderr, way
    records = json.loads(first)
    out_file.write_text(json.dumps([{**r, "model": "earlier"} for r in records]))  # ours, by another model
    redone, _ = bench(*args, "--overwrite", model=tiny_model_dir)
    assert redone.returncode == 0, redone.stderr
    assert [r["model"] for r in json.loads(out_file.read_text())] == [str(tiny_model_dir)] * 2

    foreign = [json.dumps([{k: v for k, v in r.items() if k not in ("mode", "model")} for r in records]),  # another tool's
               json.dumps([{**records[0], "line": 99}]),  # not an item of this data file
               "audio,question\n"]  # not predictions at all
    for text in foreign:
        out_file.write_text(text)
        refused, _ = bench(*args, "--overwrite", model=tiny_model_dir)
        assert refused.returncode == 2 and "not replaced" in refused.stderr and refused.stderr.count("\n") == 1
        assert out_file.read_text() == text  # untouched


def test_rows_audio_is_found_beside_the_data_file_then_in_the_current_folder(tmp_path, monkeypatch):
    """bench qa (no --audio-root) and ask --input follow one rule, and files written for either
    earlier rule still work."""
    from mellow_cli.io.jobs import read_questions

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sets" / "clips").mkdir(parents=True)
    (tmp_path / "sets" / "clips" / "beside.wav").write_bytes(b"")
    (tmp_path / "here.wav").write_bytes(b"")
    rows = [{"audio": "clips/beside.wav", "question": "q", "choices": ["a", "b"], "answer": "a"},
            {"audio": "here.wav", "audio2": "clips/beside.wav", "question": "q", "choices": ["a", "b"], "answer": "b"},
            {"audio": "missing.wav", "question": "q", "choices": ["a", "b"], "answer": "a"}]
    (tmp_path / "sets" / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    beside, here, missing = "sets/clips/beside.wav", "here.wav", "sets/missing.wav"
    jobs = read_questions("sets/q.jsonl")
    assert [(j.audio, j.audio2) for j in jobs] == [(beside, beside), (here, beside), (missing, missing)]
    items = qa.read("sets/q.jsonl", "sets")  # bench qa's default root: the file's folder
    assert [(i.audio, i.audio2) for i in items] == [(beside, None), (here, beside), (missing, None)]
    assert [j.audio for j in read_questions(str(tmp_path / "sets" / "q.jsonl"))][:2] == [str(tmp_path / beside), here]
    monkeypatch.chdir(tmp_path / "sets")  # a file in the current folder: its paths as written, however it is named
    assert [j.audio for j in read_questions(str(tmp_path / "sets" / "q.jsonl"))][:2] == ["clips/beside.wav", "here.wav"]
