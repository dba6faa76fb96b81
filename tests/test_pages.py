"""The pages: `-f html` for ask / caption (one recording, a batch, --output-dir), `mellow report` of
rows and of benchmark predictions, and the page of `mellow serve`. The tests named `browser` open
them in a real headless Chromium (tests/browser.py): no console error, no request leaving the page
(or the server), the windows, rows and answers the run wrote, clicks that play the right second;
each saves a screenshot beside its files and prints where."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import soundfile as sf
from browser import chromium, open_page, screenshot
from conftest import write_tone
from fakes import ScriptedModel, install
from test_cli_answers import mellow
from serving import DEADLINE, chat_body, post, running

pytest_plugins = ["serving"]  # the model and model_dir fixtures

from mellow_cli.io.spans import windows
from mellow_cli.serve.limits import ServeSettings

QUESTION = "is a bird singing?"


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def scripted(monkeypatch):
    return lambda **script: install(monkeypatch, ScriptedModel(**script))


def field_recording(path, seconds: float, sr: int = 16000, chirps_every: float = 7.0):
    """Quiet hiss with a 2 kHz chirp of a second every `chirps_every` seconds, written a minute at a
    time (a recording of hours never sits in memory whole)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", sr, 1, subtype="PCM_16") as f:
        for start in np.arange(0, seconds, 60.0):
            t = start + np.arange(int(min(60.0, seconds - start) * sr)) / sr
            chirp = (t % chirps_every) < 1.0
            f.write((0.02 * rng.standard_normal(len(t)) + 0.5 * chirp * np.sin(2 * np.pi * 2000 * t)).astype("float32"))
    return path


def embedded_rows(html: str) -> list[dict]:
    body = html.split('id="rows">', 1)[1].split("</script>", 1)[0]
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def no_trouble(seen) -> None:
    assert seen.errors == [], seen.errors
    assert seen.blocked == [], seen.blocked


# --- one recording, windowed ---------------------------------------------------------------------


def test_browser_windowed_page_shows_each_window_and_plays_it(browser, scripted, tmp_path):
    audio = field_recording(tmp_path / "field.wav", 21.0)
    spans = windows(21.0, 3.0, 3.0)
    picks = ["yes" if i % 3 == 0 else "no" for i in range(len(spans))]
    scripted(picks=picks)
    page = tmp_path / "field.html"
    out = mellow("ask", str(audio), QUESTION, "--window", "3", "--choices", "yes|no", "-f", "html", "-o", str(page),
                 "--model", "any", "-q")
    assert out.returncode == 0, out.stderr
    html = page.read_text()
    rows = embedded_rows(html)
    assert [r["answer"] for r in rows] == picks and [(r["start"], r["end"]) for r in rows] == spans
    assert '"src": "data:audio/wav;base64,' in html  # one small recording: its audio is in the page

    seen = open_page(browser, page.as_uri())
    p = seen.page
    no_trouble(seen)
    assert seen.requests == [page.as_uri()]
    assert p.locator(".win").count() == len(spans)
    assert p.locator(".win").all_inner_texts() == picks
    assert p.locator("tr.wrow").count() == len(spans)
    assert p.locator("canvas.picture").count() == 1 and p.locator("canvas.lines").count() == 1
    # each window's probability of its answer is in its list row (the scripted pick has 0.7)
    assert p.locator("tr.wrow td:last-child").all_inner_texts() == ["70%"] * len(spans)
    p.locator(".win").nth(4).click()
    at = p.evaluate("document.querySelector('audio').currentTime")
    assert spans[4][0] <= at < spans[4][0] + 0.5, at
    p.locator("tr.wrow").nth(2).click()
    assert spans[2][0] <= p.evaluate("document.querySelector('audio').currentTime") < spans[2][0] + 0.5
    screenshot(seen, tmp_path, "windowed")
    no_trouble(seen)


def test_browser_answers_are_text_not_markup(browser, scripted, tmp_path):
    audio = write_tone(tmp_path / "a.wav", seconds=2.0)
    sneaky = "</script><img src=x onerror=alert(1)> & <b>bold</b>"
    scripted(answers=[sneaky])
    page = tmp_path / "a.html"
    assert mellow("caption", str(audio), "-f", "html", "-o", str(page), "--model", "any", "-q").returncode == 0
    seen = open_page(browser, page.as_uri())
    no_trouble(seen)
    assert seen.page.locator(".answer").inner_text() == sneaky
    assert seen.page.locator("img").count() == 0 and seen.page.locator("b").count() == 0


def test_browser_compare_page_links_both_recordings(browser, scripted, tmp_path):
    first, second = write_tone(tmp_path / "before.wav", 300), write_tone(tmp_path / "after.wav", 900)
    scripted(answers=["the second is higher"])
    page = tmp_path / "compare.html"
    out = mellow("compare", str(first), str(second), "-f", "html", "-o", str(page), "--model", "any", "-q")
    assert out.returncode == 0, out.stderr
    seen = open_page(browser, page.as_uri())
    no_trouble(seen)
    p = seen.page
    assert p.locator(".answer").inner_text() == "the second is higher"
    assert [p.locator("audio").nth(i).get_attribute("src") for i in range(2)] == ["before.wav", "after.wav"]
    assert "the second recording, after.wav" in p.inner_text(".timeline")


# --- several recordings --------------------------------------------------------------------------


def test_browser_batch_page_sorts_filters_and_opens_each_timeline(browser, scripted, tmp_path):
    clips = [field_recording(tmp_path / f"{name}.wav", 6.0) for name in ("dawn", "noon", "dusk")]
    missing = tmp_path / "lost.wav"
    answers = [f"{name} answer {i}" for name in ("dawn", "noon", "dusk") for i in range(3)]
    scripted(answers=answers)
    page = tmp_path / "pages" / "batch.html"
    page.parent.mkdir()
    out = mellow("caption", *map(str, clips), str(missing), "--window", "2", "-f", "html", "-o", str(page),
                 "--model", "any", "-q")
    assert out.returncode == 1  # the missing recording failed; the others are on the page
    html = page.read_text()
    assert '"src": "../dawn.wav"' in html  # several recordings: referenced from where the page is

    seen = open_page(browser, page.as_uri())
    p = seen.page
    no_trouble(seen)
    items = p.locator("tr.item")
    assert items.count() == 4
    assert items.nth(3).locator(".error").inner_text() == "no such file"
    p.fill("input[type=search]", "noon answer 1")
    assert [items.nth(i).is_visible() for i in range(4)] == [False, True, False, False]
    p.fill("input[type=search]", "")
    p.locator("th", has_text="recording").click()
    assert [items.nth(i).locator("td").nth(1).inner_text() for i in range(4)] == ["dawn.wav", "dusk.wav", "lost.wav", "noon.wav"]
    items.nth(1).click()  # dusk
    detail = p.locator("tr.detail")
    assert detail.locator(".win").all_inner_texts() == answers[6:9]
    detail.locator(".win").nth(2).click()
    assert 4.0 <= detail.locator("audio").evaluate("a => a.currentTime") < 4.5
    screenshot(seen, tmp_path, "batch")
    no_trouble(seen)
    assert all(r.startswith("file:") for r in seen.requests)


def test_browser_output_dir_gives_a_page_per_recording_and_an_index(browser, scripted, tmp_path):
    clips = [field_recording(tmp_path / f"{name}.wav", 4.0) for name in ("dawn", "dusk")]
    scripted(answers=["a", "b", "c", "d"])
    out = mellow("caption", *map(str, clips), "--window", "2", "-f", "html", "-d", str(tmp_path / "out"),
                 "--model", "any", "-q")
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["dawn.html", "dusk.html", "index.html"]
    seen = open_page(browser, (tmp_path / "out" / "index.html").as_uri())
    no_trouble(seen)
    links = seen.page.locator("tr.item a")
    assert [links.nth(i).get_attribute("href") for i in range(2)] == ["dawn.html", "dusk.html"]
    links.nth(1).click()
    seen.page.wait_for_function("() => document.body.dataset.ready === '1'")
    assert seen.page.locator(".win").all_inner_texts() == ["c", "d"]
    no_trouble(seen)
    again = mellow("caption", *map(str, clips), "--window", "2", "-f", "html", "-d", str(tmp_path / "out"),
                   "--model", "any", "-q")
    assert again.returncode == 2 and "already exist" in again.stderr


# --- mellow report -------------------------------------------------------------------------------


def test_browser_report_of_rows_is_the_page_of_the_run(browser, scripted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    field_recording(tmp_path / "field.wav", 9.0)
    scripted(picks=["no", "yes", "no"] * 2)
    base = ("ask", "field.wav", QUESTION, "--window", "3", "--choices", "yes|no", "--model", "any", "-q")
    assert mellow(*base, "-f", "jsonl", "-o", "run.jsonl").returncode == 0
    assert mellow(*base, "-f", "csv", "-o", "run.csv").returncode == 0
    rows = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the rows' paths are relative to the run's folder
    for source in ("run.jsonl", "run.csv"):
        out = mellow("report", f"../{source}", "-o", f"{source}.html", "-q")
        assert out.returncode == 0, out.stderr
        html = (tmp_path / "elsewhere" / f"{source}.html").read_text()
        got = embedded_rows(html)
        for row, want in zip(got, rows):
            assert {k: row[k] for k in ("audio", "start", "end", "answer", "choices")} == \
                   {k: want[k] for k in ("audio", "start", "end", "answer", "choices")}
            assert row["scores"] == pytest.approx(want["scores"], abs=1e-4)
        assert '"src": "data:audio/wav;base64,' in html and '"picture": {' in html  # found beside the rows
        seen = open_page(browser, (tmp_path / "elsewhere" / f"{source}.html").as_uri())
        no_trouble(seen)
        assert seen.page.locator(".win").all_inner_texts() == ["no", "yes", "no"]
    again = mellow("report", "../run.jsonl", "-o", "run.jsonl.html", "-q")
    assert again.returncode == 2 and "already holds" in again.stderr


def _predictions(path, name: str, right: list[bool], groups=("sound", "music")):
    items = []
    for i, ok in enumerate(right):
        record = {"id": f"q{i}", "audio_id": f"./a/{i}.wav", "question": f"what is heard {i}?",
                  "choices": ["a dog", "a cat", "rain"], "answer": "a dog", "task": groups[i % 2],
                  "difficulty": ["easy", "hard"][i // 2 % 2], "sub-category": "animals"}
        record.update(model_output="a dog" if ok else "rain", mode="choices", prompt_style="plain", model=name)
        items.append(record)
    path.write_text("[" + ",\n".join(json.dumps(r) for r in items) + "\n]\n")
    return path


def test_browser_bench_report_sets_models_side_by_side(browser, tmp_path):
    first = _predictions(tmp_path / "mmau-v0.json", "v0", [True, True, False, True, False, True])
    second = _predictions(tmp_path / "mmau-v0_s.json", "v0_s", [True, False, False, False, True, True])
    page = tmp_path / "models.html"
    out = mellow("report", str(first), str(second), "-o", str(page), "-q")
    assert out.returncode == 0, out.stderr
    seen = open_page(browser, page.as_uri())
    p = seen.page
    no_trouble(seen)
    assert p.locator(".card .big").all_inner_texts() == ["66.67%", "50.00%"]  # 4 of 6, 3 of 6
    # task sound holds items 0, 2, 4: v0 got 1 of 3 right, v0_s 2 of 3
    sound = p.locator("svg.chart rect title", has_text="· sound:").all_text_contents()
    assert sound == ["v0 · sound: 33.33% (1 of 3)", "v0_s · sound: 66.67% (2 of 3)"]
    assert p.locator("section h2").all_inner_texts()[:3] == ["accuracy by task", "accuracy by difficulty", "accuracy by sub-category"]
    rows = p.locator("tbody tr")
    assert rows.count() == 6
    p.select_option("select", "the models disagree")
    assert [rows.nth(i).is_visible() for i in range(6)] == [False, True, False, True, True, False]
    screenshot(seen, tmp_path, "bench")
    no_trouble(seen)


# --- mellow serve's page -------------------------------------------------------------------------


def test_browser_serve_page_streams_an_answer_end_to_end(browser, model, tmp_path):  # noqa: F811
    clip = write_tone(tmp_path / "tone.wav", 660)
    key = "sesame"
    with running(model, ServeSettings(api_key=key)) as url:
        status, expected = post(url, chat_body(clip, question="what do you hear?", max_tokens=12),
                                {"Authorization": f"Bearer {key}"})
        assert status == 200
        want = expected["choices"][0]["message"]["content"]
        assert want

        seen = open_page(browser, f"{url}/", allowed=(url, "data:", "blob:"))
        p = seen.page
        no_trouble(seen)
        p.set_input_files("#file1", str(clip))
        p.wait_for_selector(".slot canvas:visible")
        p.fill("#question", "what do you hear?")
        p.fill("#max-tokens", "12")
        assert '"text": "what do you hear?"' in p.inner_text("#curl")
        p.click("#ask")
        p.wait_for_selector("#key-form:visible")  # the server refused: the page asks for the key
        p.fill("#api-key", key)
        p.click("#use-key")
        p.wait_for_function("() => document.body.dataset.answered === '1'", timeout=DEADLINE * 1000)
        assert p.inner_text("#answer") == want
        assert 'Authorization: Bearer $MELLOW_API_KEY' in p.inner_text("#curl")

        p.fill("#choices", "a tone | a dog")
        p.click("#ask")  # the key is asked once
        p.wait_for_function("() => document.body.dataset.answered === '2'", timeout=DEADLINE * 1000)
        assert p.locator("#key-form").is_hidden()
        assert p.inner_text("#answer") in ("a tone", "a dog")
        assert p.locator("#probabilities .bar").count() == 2
        assert '"mellow": {"choices": ["a tone","a dog"]}' in p.inner_text("#curl")

        second = p.locator(".slot").nth(1)  # the fake microphone Chromium was started with
        second.locator("button", has_text="record").click()
        p.wait_for_timeout(1200)
        second.locator("button", has_text="stop").click()
        second.locator("canvas").wait_for(state="visible")
        assert second.locator(".muted").first.inner_text().startswith("recording-2.wav · 0:01")
        p.fill("#choices", "")
        p.click("#ask")
        p.wait_for_function("() => document.body.dataset.answered === '3'", timeout=DEADLINE * 1000)
        assert p.inner_text("#answer") and p.inner_text("#curl").count('"type": "input_audio"') == 2
        screenshot(seen, tmp_path, "serve")
    # one refusal, the browser's own line for the 401 the page answered by asking for the key
    assert [e for e in seen.errors if "status of 401" not in e] == [] and len(seen.errors) == 1
    assert seen.blocked == [] and all(r.startswith((url, "data:", "blob:")) for r in seen.requests)


# --- size and speed ------------------------------------------------------------------------------


@pytest.mark.slow
def test_browser_three_hour_recording_gives_a_small_page_that_opens_fast(browser, scripted, tmp_path):
    hours = 3
    audio = field_recording(tmp_path / "night.wav", hours * 3600.0, sr=8000, chirps_every=600.0)
    count = len(windows(hours * 3600.0, 10.0, 10.0))
    scripted(answers=[f"window {i}: {'a bird sings' if i % 60 == 0 else 'quiet night'}" for i in range(count)])
    page = tmp_path / "night.html"
    started = time.perf_counter()
    out = mellow("caption", str(audio), "--window", "10", "-f", "html", "-o", str(page), "--model", "any", "-q",
                 "--batch-size", "32")
    made = time.perf_counter() - started
    assert out.returncode == 0, out.stderr
    size = page.stat().st_size
    assert size < 5_000_000, size
    opened = time.perf_counter()
    seen = open_page(browser, page.as_uri())
    seconds = time.perf_counter() - opened
    no_trouble(seen)
    assert seen.page.locator(".win").count() == count == 1080
    loaded = seen.page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd") / 1000
    print(f"3-hour page: {size / 1e6:.2f} MB, {count} windows, made in {made:.1f} s, opened in {seconds:.2f} s "
          f"(load event at {loaded:.2f} s)")
    screenshot(seen, tmp_path, "three-hours")
