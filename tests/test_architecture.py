"""The package's shape holds: imports run only down the layers pyproject.toml names (checked by
import-linter), no import anywhere (inside functions included) closes a cycle, the layers' folders
say what they own, and no model family's specifics leak out of its folder."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mellow_cli"


def test_imports_run_only_down_the_layers():
    # import-linter of this interpreter (a dev dependency), never another one found on PATH
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    out = subprocess.run([sys.executable, "-c", lint], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in imports.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_closes_a_cycle():
    import grimp

    graph = grimp.build_graph("mellow_cli", cache_dir=None)  # every import, inside functions too
    imports = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert cycles(imports) == []


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_a_few_modules_at_the_top_and_each_folder_says_what_it_owns():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= 12, top
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 8, f"{init}: say in its docstring what the folder owns"


def test_modules_stay_short():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_no_family_is_named_outside_its_folder():
    """An encoder, a sample rate or a checkpoint key of a family appears only in models/<family>/
    (docstrings and comments may cite them; code may not)."""
    names = re.compile(r"htsat|HTSAT|caption_decoder|audio_encoder\.|matpac|MATPAC|whisper|Whisper|audio_lm\.")
    leaks = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "models" and len(rel.parts) > 2:
            continue  # a family's own folder
        for node in ast.walk(ast.parse(path.read_text())):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if (name and names.search(name)) or (text and names.search(text) and not _is_docstring(text)):
                leaks.append(f"{rel}:{getattr(node, 'lineno', '?')}: {name or text[:60]!r}")
    assert leaks == []


def _is_docstring(text: str) -> bool:
    # Long prose (a docstring, a help text) may say which family it is about; a key or a name
    # the code uses is short.
    return " " in text.strip() and len(text.split()) > 3


def test_heavy_modules_stay_out_of_help():
    code = "import sys; sys.argv=['mellow','--help']\nfrom mellow_cli.cli import main\ntry: main()\nexcept SystemExit: pass"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert not loaded & {"torch", "transformers", "numpy", "soundfile"}
