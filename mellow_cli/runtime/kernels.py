"""step.c's per-machine build (fused.py loads it), kept in the cache's `kernels/` folder,
and which of the libraries found there may be loaded.

A library is code: loading it runs its initialisers before any of its functions is called, so a
library someone else put in the cache would run as the user, and a damaged one (cut short by a
full disk, say) faults the process in the middle of a run. One is loaded only if it is ours as
it was built: its name records the sha256 of the bytes the compiler wrote
(`step-<key>-<sha256>.so`, given in one rename, so another process building the same library at
the same time never pairs a name with other bytes), its bytes still hash to that, and the file
and its folder belong to the user and are writable by nobody else. A library there that fails
this is removed and built again; a folder that is not the user's is not read at all.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
from pathlib import Path

from mellow_cli.files import sha256

SOURCE = Path(__file__).with_name("step.c")


def step_library(compiler: str, folder: Path, machine: str) -> tuple[Path | None, str | None, list[str]]:
    """(step.c's library for `machine` (machine.cpu_key) by `compiler`, ours as built:
    found in `folder`, or built there now; or None, and why not, as `mellow env` says it) and
    what to say once of what was found there and done about it."""
    stem = name(compiler, machine)
    problem, changed = folder_problem(folder)
    if problem is not None:
        return None, f"torch's ({problem})", [f"the one-call step's library is not loaded: {problem}"]
    found, removed = find(folder, stem)
    said = ([changed] if changed else []) + ([f"in {folder}: {'; '.join(removed)}"] if removed else [])
    if found is not None:
        return found, None, said
    try:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            compile_step(compiler, Path(tmp) / "step.so")
            return keep(Path(tmp) / "step.so", folder, stem), None, said + ["built it again"] * bool(removed)
    except subprocess.CalledProcessError as e:
        last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        how = f"torch's ({compiler} could not build the one-call step: {last[0]})"
    except (OSError, subprocess.SubprocessError) as e:
        how = f"torch's (building the one-call step failed: {e})"
    return None, how, said + [how] * bool(removed)


def name(compiler: str, machine: str) -> str:
    """What the libraries of step.c built by `compiler` for `machine` are named by: a new source,
    CPU or compiler is a library of its own."""
    return "step-" + hashlib.sha256(SOURCE.read_bytes() + machine.encode() + compiler.encode()).hexdigest()[:16]


def compile_step(compiler: str, target: Path, march: str = "native") -> None:
    """Build step.c into `target` for `march` (raises what the last compiler run raised).

    Compilers differ: clang before 15 refuses -march=native on ARM (Apple's among them), where
    -mcpu=native says the same; Apple's clang, and clang without libomp, have no OpenMP, and
    step.c then builds for one thread. Each is tried in turn, threads first."""
    arches = [f"-march={march}"] + (["-mcpu=native"] if march == "native" else [])
    attempts = [[arch, *threads] for threads in (["-fopenmp"], []) for arch in arches]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / "step.so"
        for i, flags in enumerate(attempts):
            # -fno-math-errno lets expf vectorize; the sums stay in source order except where
            # step.c marks a loop `omp simd` (reordered as torch's own kernels reorder them).
            command = [compiler, "-O3", *flags, "-shared", "-fPIC", "-std=gnu11", "-fno-math-errno", str(SOURCE),
                       "-o", str(built), "-lm"]
            try:
                subprocess.run(command, check=True, capture_output=True, timeout=120)
                break
            except subprocess.CalledProcessError:
                if i + 1 == len(attempts):
                    raise
        os.replace(built, target)  # whole or not at all, if another process builds it too


def folder_problem(folder: Path) -> tuple[str | None, str | None]:
    """(why no library in `folder` may be loaded, or None; what was changed to trust it, or None).
    The folder is made if missing; one of the user's that others may write to is closed to them
    (each file in it is still checked, as one of theirs may already be there)."""
    try:
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = os.stat(folder)
        if not stat.S_ISDIR(info.st_mode):
            return f"{folder} is not a folder", None
        if _owner() is not None and info.st_uid != _owner():
            return f"{folder} belongs to another user", None
        if info.st_mode & 0o022:
            os.chmod(folder, stat.S_IMODE(info.st_mode) & ~0o022)
            return None, f"{folder} was writable by others: now by its owner only"
    except OSError as e:
        return f"{folder} cannot be used ({e.strerror or e})", None
    return None, None


def find(folder: Path, stem: str) -> tuple[Path | None, list[str]]:
    """(a library of `stem` in `folder` that is ours as built, or None; what was wrong with the
    others, each removed)."""
    found, removed = None, []
    for path in sorted(folder.glob(f"{stem}-*.so")):
        problem = file_problem(path, path.name[len(stem) + 1:-3])
        if problem is None:
            found = found or path
            continue
        try:
            path.unlink()
            removed.append(f"removed {path.name} ({problem})")
        except OSError as e:
            removed.append(f"could not remove {path.name} ({problem}; {e.strerror or e})")
    return found, removed


def file_problem(path: Path, digest: str) -> str | None:
    """Why the file at `path` is not a library built here whose bytes hash to `digest`, or None."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return "a link or other, not a file"
        if _owner() is not None and info.st_uid != _owner():
            return "another user's"
        if info.st_mode & 0o022:
            return "writable by others"
        if sha256(path) != digest:
            return "its bytes are not those built: damaged or replaced"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return None


def keep(built: Path, folder: Path, stem: str) -> Path:
    """Move the library at `built` (on `folder`'s file system) into `folder`, named by its bytes."""
    os.chmod(built, 0o755)  # as compilers make it, less any write bit a loose umask gave others
    path = folder / f"{stem}-{sha256(built)}.so"
    os.replace(built, path)
    return path


def _owner() -> int | None:
    """The user whose files are trusted (None where the system has no such notion)."""
    return os.geteuid() if hasattr(os, "geteuid") else None
