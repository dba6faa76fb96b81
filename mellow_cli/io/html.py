"""Self-contained HTML pages: the page of a run's result rows (`-f html`, `mellow report`), the
index of an `--output-dir`, and the shell every page of the project is built on (the benchmark
report and `mellow serve`'s page use it too).

A page needs no network: its styles, scripts and data are inline (the assets in page/, our own,
no library), and a Content-Security-Policy forbids it to fetch anything else. The rows are
embedded as JSON lines, exactly as `-f jsonl` writes them, so nothing is lost and a page can be
read back; the script groups them into recordings, timelines and tables. Each recording gets a
picture computed here from its audio (picture.py), shared out from one budget so that the page
stays small; its audio is embedded when the page holds one small recording, else referenced by a
path relative to the page.

Knows no model: it takes rows (the dicts of jobs.row) and the paths of their audio.
"""

from __future__ import annotations

import base64
import html
import json
import os
import urllib.parse
from pathlib import Path
from typing import IO, Sequence

from mellow_cli.errors import MellowError
from mellow_cli.version import __version__

ASSETS = Path(__file__).parent / "page"
EMBED_LIMIT = 3_000_000  # bytes of audio embedded in a one-recording page (4/3 of it in base64)
PAGE_CELLS = 1_500_000  # spectrogram cells per page, shared by its recordings (about 2 MB in base64)
# What a browser plays, by extension; other files are still linked (the browser may manage).
MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
               ".oga": "audio/ogg", ".opus": "audio/ogg", ".m4a": "audio/mp4", ".webm": "audio/webm"}
# A saved page fetches nothing: inline code and styles, its own data, and audio beside it.
OFFLINE = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
           "media-src 'self' data: blob: file:; base-uri 'none'; form-action 'none'")


def asset(name: str) -> str:
    """A file of page/ (a script or the style sheet), as text."""
    return (ASSETS / name).read_text(encoding="utf-8")


def script_json(obj) -> str:
    """JSON that can sit inside a <script> element: `<` is escaped, so no text in it can close
    the element or open a comment."""
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c")


def shell(kind: str, title: str, data: dict, scripts: Sequence[str], *, rows: Sequence[str] = (),
          policy: str = OFFLINE) -> str:
    """A whole page: the shared style sheet and drawing code, then `scripts` (texts), with `data`
    as JSON and `rows` (JSON texts, one a line) in script elements the code reads by id."""
    body = "\n".join(line.replace("<", "\\u003c") for line in rows)
    code = "\n".join([asset("draw.js"), *scripts])
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">\n"
            f"<meta name=\"generator\" content=\"mellow-cli {__version__}\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{asset('style.css')}</style>\n</head>\n"
            f"<body data-kind=\"{kind}\"><main id=\"app\"></main>\n"
            f"<script type=\"application/json\" id=\"page-data\">{script_json(data)}</script>\n"
            f"<script type=\"application/x-ndjson\" id=\"rows\">\n{body}\n</script>\n"
            f"<script>\n\"use strict\";\n{code}\n</script>\n</body></html>\n")


# --- the page of result rows ----------------------------------------------------------------------


class PageWriter:
    """The html "format" of a run: keeps each row (the run's `fields` of it) and writes the page
    of them all on `close()`, which a run calls after Ctrl-C too, so the page then holds the rows
    done so far. Its paths to the audio start at `folder`, where the page goes."""

    def __init__(self, stream: IO[str], fields: Sequence[str], folder: str = "."):
        self.stream, self.fields, self.folder = stream, tuple(fields), folder
        self.rows: list[dict] = []

    def write(self, r: dict) -> None:
        self.rows.append({k: r.get(k) for k in self.fields})

    def close(self) -> None:
        if self.rows:
            self.stream.write(rows_page(self.rows, folder=self.folder))
        self.stream.flush()



def rows_page(rows: Sequence[dict], *, folder: str = ".", title: str | None = None,
              pages: dict[str, str] | None = None, located: dict[str, str] | None = None,
              budget: int = PAGE_CELLS) -> str:
    """The page of `rows`: one recording's timeline, or a table of recordings each opening to its
    timeline. `folder` is where the page will be, for paths to the audio; `located` names the
    file of a recording the rows name otherwise (rows read back elsewhere than they were made).
    `pages` makes it an index: each recording links to its own page (recording -> path relative
    to `folder`) and no picture is drawn here."""
    from mellow_cli.io.formats import json_text
    from mellow_cli.io.picture import columns_for

    firsts = list(dict.fromkeys(r["audio"] for r in rows if r.get("audio")))
    seconds = [r["audio2"] for r in rows if r.get("audio2") and r["audio2"] != r.get("audio")]
    columns = columns_for(len(firsts), budget)
    embed = len(firsts) == 1 and not seconds and pages is None
    recordings = {}
    for path in dict.fromkeys(firsts + seconds):
        recordings[path] = recording((located or {}).get(path, path), folder,
                                     columns=columns if pages is None and path in firsts else 0, embed=embed)
        if pages and path in pages:
            recordings[path]["page"] = _url(pages[path])
        elif not columns and "problem" not in recordings[path]:
            recordings[path]["problem"] = (f"a page of {len(firsts)} recordings draws none (--output-dir makes a "
                                           "page for each)")
    data = {"title": title or _title(rows, firsts), "recordings": recordings, "index": pages is not None}
    return shell("rows", data["title"], data, [asset("rows.js")], rows=[json_text(r) for r in rows])


def recording(path: str, folder: str, *, columns: int = 0, embed: bool = False) -> dict:
    """What the page knows of one recording: where its audio is (`src`: a data URL when embedded,
    else a path from `folder`), and its picture when `columns` > 0; or why not (`problem`)."""
    if path == "-":
        return {"problem": "audio from standard input is not kept"}
    if not os.path.isfile(path):
        return {"problem": "not found beside the page's rows"}
    kind = MEDIA_TYPES.get(os.path.splitext(path)[1].lower())
    out: dict = {}
    if embed and kind and os.path.getsize(path) <= EMBED_LIMIT:
        with open(path, "rb") as f:
            out["src"] = f"data:{kind};base64,{base64.b64encode(f.read()).decode()}"
    else:
        out["src"] = _url(os.path.relpath(os.path.abspath(path), os.path.abspath(folder or ".")))
    if columns:
        from mellow_cli.io.picture import picture

        try:
            out["picture"] = picture(path, columns).as_dict()
        except MellowError as e:
            out["problem"] = getattr(e, "problem", None) or str(e)
    return out


def _url(relative: str) -> str:
    return urllib.parse.quote(relative.replace(os.sep, "/"))


def _title(rows: Sequence[dict], firsts: Sequence[str]) -> str:
    if len(firsts) == 1:
        questions = {r.get("question") for r in rows}
        name = os.path.basename(firsts[0])
        return f"{name} · {questions.pop()}" if len(questions) == 1 else name
    return f"{len(firsts)} recordings · {len(rows)} rows"
