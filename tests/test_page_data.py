"""What the pages are made of, without a browser: the picture of a recording (picture.py), rows read
back from the files a run wrote (readback.py), the page's embedded data, and the html format's
place among the output rules (no --resume, the index's name, report's refusals, Ctrl-C)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import write_tone
from fakes import ScriptedModel, install
from test_cli_answers import mellow

from mellow_cli.errors import AudioError, UsageError
from mellow_cli.io import html, picture, readback
from mellow_cli.io.formats import RowWriter
from mellow_cli.io.jobs import Job, row


def levels(p: picture.Picture) -> np.ndarray:
    return np.frombuffer(p.spectrogram, np.uint8).reshape(p.columns, picture.BANDS)


def peaks(p: picture.Picture) -> np.ndarray:
    return np.frombuffer(p.peaks, np.uint8).reshape(p.columns, 2)


def band_of(hz: float) -> int:
    """The spectrogram row whose band holds `hz` (the band matrix's own edges)."""
    return int(np.argmax(picture._band_matrix()[round(hz * picture.FRAME / picture.RATE)]))


def two_tones(path, sr=16000, seconds=4.0, first=500.0, second=4000.0, amplitude=0.5):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (amplitude * np.sin(2 * np.pi * np.where(t < seconds / 2, first, second) * t)).astype("float32"), sr)
    return path


# --- the picture ---------------------------------------------------------------------------------


def test_picture_puts_each_tone_in_its_band_at_its_time_and_keeps_the_peaks(tmp_path):
    p = picture.picture(str(two_tones(tmp_path / "tones.wav", sr=44100)), max_columns=40)
    assert p.columns == 40 and p.duration == pytest.approx(4.0)
    loud = levels(p).argmax(axis=1)
    assert set(loud[2:18]) == {band_of(500)} and set(loud[22:38]) == {band_of(4000)}
    assert levels(p).max() == 255
    assert np.abs(peaks(p)[2:38].astype(int) - [64, 191]).max() <= 2  # +-0.5 mapped onto 0..255


def test_picture_of_hours_is_decoded_a_chunk_at_a_time_and_stays_the_same(tmp_path, monkeypatch):
    path = str(two_tones(tmp_path / "tones.flac", seconds=9.0))
    whole = picture.picture(path, max_columns=50)
    from mellow_cli.io.audio import load_audio

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["duration"])
        return load_audio(*args, **kwargs)

    monkeypatch.setattr("mellow_cli.io.audio.load_audio", counted)
    monkeypatch.setattr(picture, "CHUNK_FRAMES", 40)  # 1.28 s at a time
    chunked = picture.picture(path, max_columns=50)
    assert len(calls) == 8 and max(calls) <= 40 * picture.FRAME / picture.RATE + 1e-9
    assert np.abs(levels(chunked).astype(int) - levels(whole)).max() <= 1
    assert peaks(chunked).tolist() == peaks(whole).tolist()


def test_one_short_sound_in_a_long_quiet_recording_is_the_brightest_thing(tmp_path):
    # 8 kHz: the bands above 4 kHz hold nothing, and must not be taken for the hiss's level
    sr = 8000
    rng = np.random.default_rng(0)
    audio = 0.01 * rng.standard_normal(120 * sr)
    audio[70 * sr : int(70.3 * sr)] += 0.5 * np.sin(2 * np.pi * 1000 * np.arange(int(0.3 * sr)) / sr)
    sf.write(str(tmp_path / "night.wav"), audio.astype("float32"), sr)
    p = picture.picture(str(tmp_path / "night.wav"), max_columns=400)
    grid = levels(p)
    column = int(70.1 / p.duration * p.columns)
    assert grid[column, band_of(1000)] == 255
    assert (grid >= 200).sum() <= 4  # only the sound is bright ...
    assert np.median(grid[:, : band_of(3500)]) < 40  # ... and the hiss below 4 kHz stays dark


def test_picture_of_a_clip_shorter_than_a_frame_and_of_a_broken_file(tmp_path):
    tiny = write_tone(tmp_path / "tiny.wav", seconds=0.01)
    p = picture.picture(str(tiny))
    assert p.columns == 1 and len(p.spectrogram) == picture.BANDS
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(AudioError):
        picture.picture(str(broken))


def test_columns_are_shared_out_of_one_budget(tmp_path):
    assert picture.columns_for(1, 1_500_000) == picture.MAX_COLUMNS
    assert picture.columns_for(100, 1_500_000) == 1_500_000 // 100 // picture.BANDS
    assert picture.columns_for(100_000, 1_500_000) == 0  # thumbnails of 100,000 recordings: none
    clips = [write_tone(tmp_path / f"{i}.wav", seconds=0.5) for i in range(3)]
    rows = [row(Job(str(c), str(c), "q"), answer="x") for c in clips]
    small = html.rows_page(rows, folder=str(tmp_path), budget=2 * 32 * picture.BANDS)
    assert '"picture": {' not in small and "a page of 3 recordings draws none" in small
    assert html.rows_page(rows, folder=str(tmp_path), budget=3 * 32 * picture.BANDS).count('"picture": {') == 3


# --- the page's data -----------------------------------------------------------------------------


def test_rows_page_embeds_the_rows_as_json_lines_and_says_what_it_could_not_draw(tmp_path):
    clip = write_tone(tmp_path / "a.wav", seconds=1.0)
    rows = [row(Job(str(clip), str(clip), "q"), answer="</script><!-- x"),
            row(Job(str(tmp_path / "gone.wav"), str(tmp_path / "gone.wav"), "q"), error="no such file")]
    page = html.rows_page(rows, folder=str(tmp_path))
    assert page.count("</script>") == 3 and "<!--" not in page  # data, rows, code: nothing inside closes early
    body = page.split('id="rows">', 1)[1].split("</script>", 1)[0]
    assert [json.loads(line) for line in body.split("\n") if line] == rows
    data = json.loads(page.split('id="page-data">', 1)[1].split("</script>", 1)[0])
    assert data["recordings"][str(clip)]["src"] == "a.wav"  # two recordings: linked, not embedded
    assert set(data["recordings"][str(clip)]["picture"]) >= {"spectrogram", "peaks", "duration"}
    assert data["recordings"][str(tmp_path / "gone.wav")] == {"problem": "not found beside the page's rows"}
    assert "default-src 'none'" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_audio_is_embedded_only_for_one_small_recording(tmp_path, monkeypatch):
    clip = write_tone(tmp_path / "a.wav", seconds=1.0)
    one = [row(Job(str(clip), str(clip), "q"), answer="x")]
    assert html.recording(str(clip), str(tmp_path), embed=True)["src"].startswith("data:audio/wav;base64,")
    monkeypatch.setattr(html, "EMBED_LIMIT", clip.stat().st_size - 1)
    assert html.recording(str(clip), str(tmp_path), embed=True)["src"] == "a.wav"
    sub = tmp_path / "pages"
    assert html.recording(str(clip), str(sub), embed=False)["src"] == "../a.wav"
    spaced = write_tone(tmp_path / "a b#1.wav", seconds=1.0)
    assert html.recording(str(spaced), str(tmp_path))["src"] == "a%20b%231.wav"
    assert '"src": "data:' not in html.rows_page(one, folder=str(tmp_path))


# --- rows read back ------------------------------------------------------------------------------


def _rows():
    job = Job("a.wav", "a.wav", "is it a dog?", ("yes", "no"), start=0.0, end=10.0)
    scores = {"yes": 0.25, "no": 0.75}
    return [row(job, answer="no", scores=scores, model="v0"),
            row(Job("b.wav", "b.wav", "is it a dog?", ("yes", "no"), start=10.0, end=12.5), error="no such file", model="v0")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_rows_read_back_as_they_were_written(tmp_path, fmt):
    fields = ("audio", "audio2", "start", "end", "question", "choices", "answer", "scores", "model", "revision", "error")
    out = io.StringIO()
    writer = RowWriter(fmt, out, fields=fields)
    for r in _rows():
        writer.write(r)
    writer.close()
    path = tmp_path / f"run.{fmt}"
    path.write_text(out.getvalue())
    got = readback.read_rows(str(path), fmt)
    for back, want in zip(got, _rows()):
        for key in fields:
            assert back[key] == want[key], key
    # a run still writing (or killed) leaves half a row: it is left out, as --resume leaves it
    path.write_text(out.getvalue() + out.getvalue().splitlines()[-1][:25])
    assert len(readback.read_rows(str(path), fmt)) == 2


def test_what_is_not_a_row_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"audio": "a.wav"}\nnot json\n{"x": 1}\n')
    with pytest.raises(UsageError, match="line 2 is not JSON"):
        readback.read_rows(str(path), "jsonl")
    path.write_text('{"audio": "a.wav"}\n{"x": 1}\n')
    with pytest.raises(UsageError, match="row 2: not a result row"):
        readback.read_rows(str(path), "jsonl")


# --- html among the output rules -----------------------------------------------------------------


@pytest.fixture
def scripted(monkeypatch):
    return lambda **script: install(monkeypatch, ScriptedModel(**script))


def test_html_is_written_whole_at_the_end_so_resume_needs_a_row_format(scripted, tmp_path):
    clip = write_tone(tmp_path / "a.wav", seconds=3.0)
    scripted(answers=["x"] * 3)
    out = mellow("caption", str(clip), "--window", "1", "-f", "html", "-o", str(tmp_path / "a.html"), "--resume",
                 "--model", "any", "-q")
    assert out.returncode == 2 and "--resume needs rows a later run can read back, and html cannot be" in out.stderr
    assert not (tmp_path / "a.html").exists()


def test_the_index_of_an_output_dir_cannot_be_a_recordings_page(scripted, tmp_path):
    clips = [write_tone(tmp_path / "index.wav"), write_tone(tmp_path / "other.wav")]
    scripted(answers=["x", "y"])
    out = mellow("caption", *map(str, clips), "-f", "html", "-d", str(tmp_path / "out"), "--model", "any", "-q")
    assert out.returncode == 2 and "the index and" in out.stderr and "index.html" in out.stderr
    assert mellow("caption", *map(str, clips), "-f", "text", "-d", str(tmp_path / "out"),
                  "--model", "any", "-q").returncode == 0  # only html writes an index


def test_ctrl_c_leaves_a_page_of_the_rows_done(tmp_path, monkeypatch):
    class Interrupted(ScriptedModel):
        def ask_batch(self, questions, options=None):
            if self.asked:
                raise KeyboardInterrupt
            return super().ask_batch(questions)

    install(monkeypatch, Interrupted(answers=["the first", "the second"]))
    clips = [write_tone(tmp_path / f"{n}.wav") for n in ("a", "b", "c")]
    out = mellow("caption", *map(str, clips), "-f", "html", "-o", str(tmp_path / "page.html"), "-b", "1",
                 "--model", "any", "-q")
    assert out.returncode == 130
    page = (tmp_path / "page.html").read_text()
    body = page.split('id="rows">', 1)[1].split("</script>", 1)[0]
    assert [json.loads(line)["answer"] for line in body.split("\n") if line.strip()] == ["the first"]


def test_report_refusals(tmp_path):
    rows = tmp_path / "run.jsonl"
    rows.write_text(json.dumps(row(Job("a.wav", "a.wav", "q"), answer="x")) + "\n")
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps([{"id": "1", "question": "q", "choices": ["a", "b"], "answer": "a",
                                        "model_output": "a", "mode": "choices", "model": "v0"}]))
    mixed = mellow("report", str(rows), str(predictions), "-o", str(tmp_path / "r.html"))
    assert mixed.returncode == 2 and "not both" in mixed.stderr
    same = mellow("report", str(rows), "-o", str(rows), "--overwrite")
    assert same.returncode == 2 and "is one of the files read" in same.stderr
    assert rows.read_text().startswith("{")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = mellow("report", str(empty))
    assert out.returncode == 2 and "holds no rows" in out.stderr
    scorer = mellow("report", str(predictions), "--scorer", "mellow-binary", "-o", str(tmp_path / "p.html"))
    assert scorer.returncode == 0, scorer.stderr  # qa-shaped predictions take the yes/no scorer
    help_text = mellow("report", "--help").stdout
    assert "Example" in help_text and "mellow report night.jsonl -o night.html" in help_text


def test_serve_gives_its_page_without_the_key(tmp_path):
    from serving import running

    from mellow_cli.serve.limits import ServeSettings

    with running(ScriptedModel(), ServeSettings(api_key="k")) as url:
        from serving import request

        page = request(url, "GET", "/")
        assert page.status == 200 and page.getheader("content-type").startswith("text/html")
        text = page.read().decode()
        assert "connect-src 'self'" in text and "/v1/chat/completions" in text
        assert request(url, "GET", "/v1/models").status == 401  # the key still guards the model
