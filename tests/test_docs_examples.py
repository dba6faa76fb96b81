"""The documentation's shell examples run as written: every ```bash, ```sh and ```console block of
README.md, docs/scripts.md and docs/cli.md is a test case named by its file and line. Each runs in
`bash -e -o pipefail` in a fresh folder holding the recordings and files the examples name, with
the tiny random model as the standing default (MELLOW_MODEL), offline, and must exit 0 with no
error on stderr. What a block shows is checked too: a line ending in `# N: ...` must exit with N
(and its error name the files the comment names), a `# NAME.jsonl: {...}` comment is the file the
block reads, and the files a comment lists as written (`# subs/dawn.srt, ...`) must exist after.

A block that cannot run here is named below by its first line with the reason, and so is a line
left out of a block that otherwise runs. Answers are cut to 8 tokens (SHORT_ANSWERS). Each block
pays for a few `mellow` starts: the whole file takes minutes, hence `slow`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import write_tone

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/scripts.md", "docs/cli.md")
SHELLS = {"bash", "sh", "shell", "console"}

SKIP = {  # a block's first line -> why it cannot run here
    'pip install -e ".[dev]" && python -m pytest': "runs the whole test suite, this test among it",
    "$ mellow models rm ~/weights/v0.ckpt": "needs the published 670 MB v0 checkpoint",
    'mellow ask --model tinymu song.wav "what genre is this?"':
        "needs the published TinyMU and Samsone weights (tests/test_families_cli.py runs these commands offline)",
    "mellow models pull v0 --from /media/usb/v0.ckpt":
        "needs the published v0 checkpoint, which is checked against its pinned sha256 (tests/test_catalogue.py "
        "runs --from on checkpoints of its own)",
}
LEFT_OUT = {  # a line left out of a block that runs -> why
    'MELLOW_MODEL=v0_s mellow ask dog.wav "is there a dog?"': "downloads the published v0_s weights",
    "mellow report mmau-test-mini-v0-choices.json mmau-test-mini-v0_s-choices.json -o models.html":
        "needs MMAU predictions of the published v0 and v0_s models",
}
REWRITES = {  # text replaced in every block -> (its replacement, why)
    "pip install . && ": ("", "the package under test is installed already (a new install needs the network)"),
    "/data/field": ("data/field", "a folder outside the test's own is read from inside it"),
    "--max-steps 200": ("--max-steps 2", "200 steps of the tiny model take half an hour on two busy cores"),
    "--offset 60 --duration 10": ("--offset 10 --duration 10", "the test's long recordings last 25 s, not minutes"),
    "--offset 3600 --window 10": ("--offset 10 --window 10", "the test's long recordings last 25 s, not hours"),
}
CONTINUES = {  # a block's first line -> the block (its first line) whose files it reads, run first
    "# captions of the files that worked, as path<TAB>caption":
        "# one batched run: loads the model once, decodes the next batch while the model works",
    "mellow report part1.jsonl part2.jsonl part3.jsonl part4.jsonl -o field.html":
        "mellow caption field/ -r -f jsonl -o captions.jsonl --resume      # run again after a stop",
}
PREPARE = {  # a block's first line -> shell run before it, for a state the block's comments assume
    "mellow config set model ~/models/mellow-birds   # stored in the config file, as an absolute path":
        'mkdir -p ~/models && cp -r "$MELLOW_MODEL" ~/models/mellow-birds',
    "mellow ask clip.wav                              # 2: the question is missing":
        "mkdir -p runs/mine/checkpoints/step-100 && echo '{}' > runs/mine/checkpoints/step-100/trainer.json",
}

EXPECTED_EXIT = re.compile(r"#\s*(\d+):(?!\d)(.*)$")  # "# 2: why", not a time such as "# 1:00 to 1:10"
FILE_COMMENT = re.compile(r"^#\s*([\w.-]+\.jsonl):\s*(\{.*\})\s*$")
WRITTEN = re.compile(r"(?<![\w/.])((?:[\w-]+/)+[\w.-]+\.(?:srt|vtt|txt|html|jsonl|json|csv|tsv))\b")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the block's first line in the doc, 1-based
    lang: str
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0]

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def shell_blocks(doc: str) -> list[Block]:
    """The fenced blocks of `doc` whose info string names a shell."""
    blocks, lang, start, body = [], None, 0, []
    for n, line in enumerate((REPO / doc).read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip() or "-", n + 1, []
            else:
                if lang in SHELLS:
                    blocks.append(Block(doc, start, lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


BLOCKS = [b for doc in DOCS for b in shell_blocks(doc)]
BY_FIRST = {b.first: b for b in BLOCKS}


def test_the_rules_name_blocks_and_lines_the_docs_hold():
    """A rule naming a block or line no doc holds any more would silently stop applying."""
    lines = {line for b in BLOCKS for line in b.text.splitlines()}
    assert len(BLOCKS) >= 20
    for first in (*SKIP, *CONTINUES, *CONTINUES.values(), *PREPARE):
        assert first in BY_FIRST, first
    for line in LEFT_OUT:
        assert line in lines, line
    for text in REWRITES:
        assert any(text in b.text for b in BLOCKS), text


def runnable(block: Block) -> str:
    text = "".join(line + "\n" for line in block.text.splitlines() if line not in LEFT_OUT)
    for old, (new, _) in REWRITES.items():
        text = text.replace(old, new)
    return text


# --- the folder the examples run in ------------------------------------------------------------

ROWS = {  # data files the examples read, in the shape the docs give them
    "questions.jsonl": [{"id": "r1", "audio": "a.wav", "question": "is there a dog?", "choices": ["yes", "no"]},
                        {"id": "r2", "audio": "b.wav", "question": "what is it?"}],
    "gold.jsonl": [{"audio": "a.wav", "question": "is it raining?", "choices": ["yes", "no"], "answer": "yes",
                    "site": "B"},
                   {"audio": "rain.wav", "question": "is it raining?", "choices": ["yes", "no"], "answer": "no",
                    "site": "A"}],
    "rows.jsonl": [{"audio1": "a.wav", "audio2": "b.wav", "question": "which is higher?", "answer": "the second"},
                   {"audio1": "dog.wav", "audio2": "dog.wav", "question": "is there a dog?", "answer": "yes"}],
    "taken.jsonl": [{"audio": "old.wav", "question": "caption the audio.", "answer": "rows of an earlier run"}],
}
SHORT = ("a.wav", "b.wav", "dog.wav", "clip.wav", "rain.wav", "owl.wav", "street.flac", "before.wav", "after.wav",
         "recordings/r1.wav", "recordings/r2.wav", "recordings/more/r3.flac", "clips/c1.wav", "clips/c2.wav",
         "archive/x1.wav", "archive/x2.wav", "archive/deeper/x3.wav", *(f"big/y{i}.wav" for i in range(1, 6)),
         "data/field/f1.flac", "data/field/f2.flac")
LONG = ("night.flac", "field.flac", "dawn.flac", "dawn-chorus.flac", "nights/dawn.flac", "nights/dusk.flac",
        "field/dawn.flac", "field/dusk.flac")  # walked in 10 s windows: three each


@pytest.fixture(scope="module")
def layout(tmp_path_factory, family_model_dir) -> Path:
    """The folder every block starts from: recordings, data files, a tokenizer folder and the
    repository's examples/ (the README runs from a clone)."""
    root = tmp_path_factory.mktemp("docs_layout")
    for i, name in enumerate(SHORT):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_tone(root / name, 220.0 * (1 + i % 5), seconds=1.0, sr=16000)
    for i, name in enumerate(LONG):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_tone(root / name, 330.0 + 50 * i, seconds=25.0, sr=8000)
    import soundfile as sf

    data, sr = sf.read(str(root / "a.wav"))
    sf.write(str(root / "clip.mp3"), data, sr, format="MP3")
    for name, rows in ROWS.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pairs.csv").write_text("audio1,audio2\na.wav,b.wav\nbefore.wav,after.wav\n")
    (root / "tok").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(family_model_dir("mellow") / f, root / "tok" / f)
    shutil.copytree(REPO / "examples", root / "examples")
    (root / "last-run").touch()
    os.utime(root / "last-run", (0, 0))  # older than every recording, for `find -newer last-run`
    return root


# `mellow` with answers of at most 8 tokens unless --max-tokens says otherwise: the random model
# never ends an answer, and its 300-token default would make each command take most of a minute.
SHORT_ANSWERS = ("import sys; from mellow_cli.models.mellow.config import MellowConfig; "
                 "MellowConfig.default_max_tokens = 8; sys.argv[0] = \"mellow\"; "
                 "from mellow_cli.cli import main; main()")


@pytest.fixture(scope="module")
def environment(tmp_path_factory, family_model_dir) -> dict:
    """`mellow` on PATH running this checkout with short answers, the tiny model as the default,
    one model cache for the module, and no network."""
    bin_dir = tmp_path_factory.mktemp("docs_bin")
    shim = bin_dir / "mellow"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c \'{SHORT_ANSWERS}\' "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MELLOW_CONFIG", "XDG_CONFIG_HOME", "MELLOW_DEVICE")}
    home = tmp_path_factory.mktemp("docs_mellow_home")
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(REPO),
            "MELLOW_HOME": str(home), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
            # float32: `auto` would first time this CPU's kernels, minutes on a busy machine
            "MELLOW_MODEL": str(family_model_dir("mellow")), "MELLOW_DTYPE": "float32"}


def bash(script: str, cwd: Path, env: dict, strict: bool = True) -> subprocess.CompletedProcess:
    flags = ["-e", "-o", "pipefail"] if strict else ["-o", "pipefail"]
    return subprocess.run(["bash", *flags, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def commands(block: Block) -> str:
    """A block as a script: a console block's `$ ` lines (the rest is what they print)."""
    text = runnable(block)
    if block.lang == "console":
        return "".join(line[2:] + "\n" for line in text.splitlines() if line.startswith("$ "))
    return text


# --- the test ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_example_runs_as_written(block, layout, environment, tmp_path):
    if block.first in SKIP:
        pytest.skip(SKIP[block.first])
    work = tmp_path / "work"
    shutil.copytree(layout, work, symlinks=True)
    env = {**environment, "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    if block.first in CONTINUES:
        before = bash(commands(BY_FIRST[CONTINUES[block.first]]), work, env)
        assert before.returncode == 0, before.stderr
    if block.first in PREPARE:
        subprocess.run(["bash", "-e", "-c", PREPARE[block.first]], cwd=work, env=env, check=True)
    for line in block.text.splitlines():
        if m := FILE_COMMENT.match(line):  # the doc shows the file the block reads: use that line
            json.loads(m.group(2))
            (work / m.group(1)).write_text(m.group(2) + "\n")

    script = commands(block)
    if any(EXPECTED_EXIT.search(line) for line in script.splitlines()):
        for line in filter(str.strip, script.splitlines()):
            expect = EXPECTED_EXIT.search(line)
            code = int(expect.group(1)) if expect else 0
            done = bash(line, work, env, strict=False)
            assert done.returncode == code, f"{line}\nexit {done.returncode}, not {code}\n{done.stderr}"
            if code:
                said = done.stderr.strip().splitlines()
                assert len(said) == 1 and said[0].startswith("mellow: error: "), done.stderr
                for word in set(re.findall(r"[\w-]*[./][\w./-]+", expect.group(2))) & set(line.split()):
                    assert word in said[0], f"{line}: the error does not name {word}: {said[0]}"
            else:
                assert "Traceback" not in done.stderr and "mellow: error" not in done.stderr, f"{line}\n{done.stderr}"
        return

    done = bash(script, work, env)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr and "mellow: error" not in done.stderr, done.stderr[-3000:]
    for line in script.splitlines():
        comment = line.partition("#")[2]
        for path in WRITTEN.findall(comment):
            assert (work / path).is_file(), f"{path}, which the block's comment names, was not written"
