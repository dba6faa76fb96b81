"""`mellow models`: what is cached, fetch a model ahead of time, remove one, say where one lives,
write one as the authors' checkpoint (export.py does that).

cli.py mounts it with `app.add_typer(models_app, name="models")`. Results go to stdout (one line
per model, or JSON lines with --json), progress and errors to stderr; every failure is a ModelError
(exit 1), or a UsageError (exit 2) for a name that cannot be meant, that `mellow`'s main prints as
one line. loading.py does the work and is imported inside each
command, so `mellow --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

models_app = typer.Typer(
    help="List, fetch, remove and locate the models in the cache (MELLOW_HOME moves it).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="A published model (v0, tinymu, samsone-134m, ...: `mellow models list --available`), a hub id user/repo, or a local checkpoint file.", show_default=False)]


@models_app.command("list")
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per model instead of columns.")] = False,
    available: Annotated[bool, typer.Option("--available", help="The models one can pull by name, with their size, what each is good at, where the weights come from and under what terms, marking those cached (no network needed).")] = False,
) -> None:
    """Show the cached models: name, size on disk, hub revision, where each came from.

    \b
    Examples:
      mellow models list
      mellow models list --available
    """
    from mellow_cli import files
    from mellow_cli.store import loading
    from mellow_cli.cli import render

    if available:
        return _catalogue(as_json)
    entries = loading.cached_models()
    if as_json:
        for e in entries:
            sys.stdout.write(json.dumps({"name": e.name, "path": str(e.folder), "bytes": e.size,
                                         "revision": e.revision, "source": e.origin, "created": e.created}) + "\n")
    elif entries:
        rows = [("NAME", "SIZE", "REVISION", "SOURCE")]
        rows += [(e.name, files.megabytes(e.size), (e.revision or "-")[:12], e.origin) for e in entries]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] + "\n")
    else:
        render.info(f"no models in {loading.cache_dir()}: `mellow models pull v0` fetches the published one")
    partial = loading.partial_downloads()
    if partial:
        render.info(f"{files.megabytes(sum(size for _, size in partial))} of unfinished downloads in "
                    f"{loading.cache_dir() / 'downloads'}: the next pull uses those that finished (the others start over), `mellow models rm NAME` deletes them")


def _catalogue(as_json: bool) -> None:
    from mellow_cli.cli import render
    from mellow_cli.models.family import family
    from mellow_cli.store import loading

    cached = {e.name for e in loading.cached_models()}
    if as_json:
        for name, p in loading.PUBLISHED.items():
            sys.stdout.write(json.dumps({"name": name, "family": p.family, "preset": p.preset, "repo": p.repo,
                                         "filename": p.filename, "revision": p.revision, "url": p.url,
                                         "sha256": p.sha256, "parameters": p.parameters,
                                         "download_mb": p.download_mb, "cached": name in cached,
                                         "about": p.about, "terms": p.terms}) + "\n")
        return
    rows = [(name, family(p.family).title, _size(p), "yes" if name in cached else "-", p.about, _source(p), p.terms)
            for name, p in loading.PUBLISHED.items()]
    render.table(("NAME", "FAMILY", "SIZE", "CACHED", "GOOD AT", "SOURCE", "TERMS"), rows, whole=(0, 1, 2, 3),
                 footnote="The weights are their authors' (docs/models.md says where each comes from and its "
                          "pin). Also usable as --model: a hub folder of ours, user/repo[@revision], or a local "
                          ".ckpt/.safetensors file or model folder.")


def _size(p) -> str:
    """Parameters and about how much one downloads: `229M, 920 MB`."""
    params = f"{p.parameters // 1_000_000}M" if p.parameters else "?"
    return f"{params}, {p.download_mb} MB" if p.download_mb else params


def _source(p) -> str:
    """Where the weights come from: a hub repo (pinned to a commit: --json names it), or a release."""
    if p.url:
        return f"GitHub {p.repo} release {p.revision}"
    return f"hub {p.repo}"


@models_app.command("pull")
def pull(
    name: NameArg = "v0",
    force: Annotated[bool, typer.Option("--force", help="Discard the cached copy and fetch it again.")] = False,
    from_file: Annotated[Optional[str], typer.Option("--from", metavar="FILE", help="Take the published model's file from disk instead of downloading it (a machine without network): checked against the sha256 pinned in the catalogue, recorded at an earlier download, or announced by the hub (asked unless HF_HUB_OFFLINE), then converted as a download is. The file itself is only read.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; print only the path.")] = False,
) -> None:
    """Download a model into the cache and convert it, without running it; print its folder.

    A pull of a cached model re-checks every byte (sha256) and repairs what is damaged.
    A dropped connection resumes where it stopped, within the run; a download that fails for
    good starts over the next time.

    \b
    Examples:
      mellow models pull v0
      mellow models pull samsone-134m
      mellow models pull someone/mellow-birds
      mellow models pull v0 --from /media/usb/v0.ckpt
      HF_ENDPOINT=https://hf-mirror.com mellow models pull v0
    """
    from mellow_cli.store import loading

    if from_file is not None:
        from mellow_cli.store.adopt import adopt

        pulled = adopt(loading.resolve(name), from_file, force=force, progress=not quiet)
    else:
        pulled = loading.pull(name, force=force, progress=not quiet)
    sys.stdout.write(f"{pulled.folder or pulled.weights}\n")


@models_app.command("rm")
def rm(name: NameArg) -> None:
    """Delete a cached model and its unfinished downloads.

    \b
    Example:
      mellow models rm v0_s
    """
    import os

    from mellow_cli import files
    from mellow_cli.store import loading
    from mellow_cli.cli.render import result_line

    where = _cached_copy(name) if os.path.exists(name) else None  # named before it goes
    freed = files.megabytes(loading.remove(name))
    if os.path.exists(name):  # a file of the user's: only the converted copy in the cache went
        place = f" ({where})" if where else ""
        result_line(f"removed the cached copy of {name}{place}, {freed}; {name} itself is untouched")
    else:
        result_line(f"removed {name} ({freed})")


def _cached_copy(name: str):
    """The cache folder `models rm NAME` deletes, or None if it cannot be told."""
    import contextlib

    from mellow_cli.store import loading
    from mellow_cli.errors import MellowError

    for entry in loading.cached_models():
        if name in (entry.name, entry.folder.name):
            return entry.folder
    with contextlib.suppress(MellowError):
        return loading.model_path(name)
    return None


@models_app.command("path")
def path(name: Annotated[Optional[str], typer.Argument(metavar="[NAME]", help="A model; without it, the cache folder itself.", show_default=False)] = None) -> None:
    """Print where a cached model lives (a folder usable as --model), or the cache folder.

    \b
    Examples:
      mellow models path
      mellow models path v0
    """
    from mellow_cli.store import loading

    sys.stdout.write(f"{loading.cache_dir() if name is None else loading.model_path(name)}\n")


@models_app.command("export")
def export(
    name: Annotated[str, typer.Argument(metavar="MODEL", help="v0, v0_s, a hub id, a .ckpt/.safetensors file, or a model folder (a run's checkpoints/step-N or best).", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE.ckpt", help="The checkpoint to write (.ckpt, .pt or .pth).", show_default=False)],
    wrap: Annotated[Optional[str], typer.Option("--wrap", metavar="state_dict", help="Save {\"state_dict\": ...}, the form the authors' resume_checkpoint reads; without it, the bare state dict their evaluation loads.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace FILE.ckpt if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; print only the path.")] = False,
) -> None:
    """Write a model as the authors' plain torch.save state dict (every official key, the
    tied lm_head.weight too), which their Mellow class loads with strict=True; print its path.

    Only the v0 architecture has an official layout (v0, v0_s and fine-tunes of them).

    \b
    Examples:
      mellow models export v0 -o mellow-v0.ckpt
      mellow models export runs/birds/checkpoints/best -o birds.ckpt
      mellow models export runs/birds/checkpoints/best -o birds-resume.ckpt --wrap state_dict
    """
    from mellow_cli.store import export as exporting
    from mellow_cli import files
    from mellow_cli.cli import render

    done = exporting.export(name, output, exporting.ExportOptions(wrap=wrap, overwrite=overwrite, progress=not quiet))
    if not quiet:
        render.info(f"{name}: {done.keys} tensors, {files.megabytes(done.bytes)}"
                    + (" wrapped as {'state_dict': ...}" if done.wrap else ""))
    sys.stdout.write(f"{done.path}\n")
