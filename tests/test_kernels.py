"""The compiled step kept in the cache (runtime/kernels.py): nothing found there runs unless it is
the user's own library as it was built; anything else is removed and built again, or passed over
for torch's step, in one line on stderr, and never crashes a run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mellow_cli.files import sha256
from mellow_cli.runtime import fused, kernels, passes

COMPILER = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler")
# What a process that loads the step prints: the status `mellow env` shows.
STATUS = "from mellow_cli.runtime import fused; fused.library(); print(fused.status())"


@pytest.fixture(autouse=True)
def fresh_library(monkeypatch):
    monkeypatch.setattr(fused, "_library", [])
    monkeypatch.setattr(passes, "_checked", [])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(a compiler, a kernels folder holding the step it built), once for the module. The
    compiler refuses to build when REFUSE_TO_BUILD is set, so a test can tell what is loaded
    from what is built again (its path, part of the library's key, stays the same)."""
    root = tmp_path_factory.mktemp("built")
    cc = root / "cc"
    cc.write_text(f'#!/bin/sh\n[ -n "$REFUSE_TO_BUILD" ] && {{ echo "cc: not now" >&2; exit 1; }}\nexec {COMPILER} "$@"\n')
    cc.chmod(0o755)
    done = _status(root / "home", cc)
    assert done.returncode == 0 and done.stdout.startswith("one call into C"), done.stderr
    return cc, root / "home" / "kernels"


def _status(home: Path, cc: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MELLOW_HOME": str(home), "CC": str(cc), **env})


def _library(source: str, path: Path) -> Path:
    """A shared library of C `source` at `path`."""
    c = path.with_suffix(".c")
    c.write_text(source)
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(path), str(c)], check=True, capture_output=True)
    return path


def _foreign(path: Path, marker: Path) -> Path:
    """A library whose initialiser leaves `marker`: it ran the moment the library was loaded."""
    return _library(f'#include <stdio.h>\n__attribute__((constructor)) static void ran(void) '
                    f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n', path)


@pytest.mark.parametrize("damage", ["foreign code", "no step in it", "cut short"])
def test_a_library_whose_bytes_are_not_those_built_never_runs_nor_crashes(damage, built, isolated_home, tmp_path):
    cc, kernels_folder = built
    shutil.copytree(kernels_folder, isolated_home / "kernels")
    marker = tmp_path / "ran"
    for lib in (isolated_home / "kernels").glob("step-*.so"):
        if damage == "foreign code":
            lib.write_bytes(_foreign(tmp_path / "foreign.so", marker).read_bytes())
        elif damage == "no step in it":
            lib.write_bytes(_library("int mellow_nothing(void) { return 0; }\n", tmp_path / "empty.so").read_bytes())
        else:  # a full disk, a copy broken off
            lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    done = _status(isolated_home, cc, REFUSE_TO_BUILD="1")
    assert not marker.exists()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("torch's (") and "could not build" in done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("mellow: ") and "not those built" in done.stderr
    assert not list((isolated_home / "kernels").glob("step-*.so"))  # removed: the next run builds it


def test_a_damaged_library_is_built_again_and_runs(built, isolated_home):
    cc, kernels_folder = built
    shutil.copytree(kernels_folder, isolated_home / "kernels")
    (lib,) = (isolated_home / "kernels").glob("step-*.so")
    lib.write_bytes(lib.read_bytes()[:4096])
    done = _status(isolated_home, cc)
    assert done.returncode == 0 and done.stdout.startswith("one call into C"), done.stderr
    assert done.stderr.count("\n") == 1 and "built it again" in done.stderr, done.stderr
    (again,) = (isolated_home / "kernels").glob("step-*.so")
    assert again.name.endswith(f"-{sha256(again)}.so")


def test_only_a_file_of_the_users_that_no_one_else_may_write_is_taken(tmp_path):
    folder = tmp_path / "kernels"
    assert kernels.folder_problem(folder) == (None, None) and not os.stat(folder).st_mode & 0o022
    made = _foreign(tmp_path / "made.so", tmp_path / "ran")
    lib = folder / f"step-k-{sha256(made)}.so"
    shutil.copyfile(made, lib)
    lib.chmod(0o755)
    assert kernels.find(folder, "step-k") == (lib, [])
    assert kernels.find(folder, "step-other") == (None, [])

    lib.chmod(0o775)  # a group may change it between this check and the load
    assert kernels.file_problem(lib, sha256(made)) == "writable by others"
    lib.chmod(0o755)
    link = folder / f"step-l-{sha256(made)}.so"
    link.symlink_to(lib)
    assert kernels.file_problem(link, sha256(made)) == "a link or other, not a file"
    found, removed = kernels.find(folder, "step-l")
    assert found is None and removed and not link.is_symlink() and lib.exists()  # the link went, not the file

    folder.chmod(0o777)
    problem, changed = kernels.folder_problem(folder)
    assert problem is None and "now by its owner only" in changed and not os.stat(folder).st_mode & 0o022
    if os.geteuid() == 0:  # only root can give a file to another user
        os.chown(lib, 65534, 65534)
        assert kernels.file_problem(lib, sha256(made)) == "another user's"
        os.chown(folder, 65534, 65534)
        assert kernels.folder_problem(folder)[0] == f"{folder} belongs to another user"
    assert not (tmp_path / "ran").exists()


def test_a_folder_of_another_users_is_not_read(isolated_home, monkeypatch, capsys):
    folder = isolated_home / "kernels"
    folder.mkdir()
    monkeypatch.setattr(kernels, "_owner", lambda: os.stat(folder).st_uid + 1)
    assert fused.library() is None
    assert fused.status() == f"torch's ({folder} belongs to another user)"
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and said.startswith("mellow: the one-call step's library is not loaded: "), said
    assert not list(folder.iterdir())  # nothing built there either


def test_a_library_of_ours_that_will_not_load_falls_back_to_torch_in_one_line(isolated_home, tmp_path, monkeypatch,
                                                                              capsys):
    """Its bytes are those recorded, but it has not the step's functions: torch's step runs."""
    from mellow_cli.runtime.machine import cpu_key

    made = _library("int mellow_nothing(void) { return 0; }\n", tmp_path / "empty.so")
    folder = isolated_home / "kernels"
    folder.mkdir()
    shutil.copyfile(made, folder / f"{kernels.name(COMPILER, cpu_key())}-{sha256(made)}.so")
    monkeypatch.setenv("CC", COMPILER)
    assert fused.library() is None
    assert fused.status().startswith("torch's (the one-call step would not load: ") and "mellow_" in fused.status()
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and said.startswith("mellow: torch's (the one-call step would not load"), said
