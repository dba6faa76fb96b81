"""`mellow env` (what this installation will do, and why) and `mellow config` (the user's defaults).

`env` is the first thing to run when something surprises: versions, the torch build, the device
and CPU features the dtype choice depends on, the cache and config paths, whether the hub may be
reached, and each setting with where its value came from. It imports torch (that is its job) but
never loads a model.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Annotated, Optional

import typer

from mellow_cli import settings
from mellow_cli.version import __version__

config_app = typer.Typer(
    help="Show or change the defaults for --model, --device and --dtype (flag > MELLOW_<KEY> > this file > built-in).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

KeyArg = Annotated[str, typer.Argument(metavar="KEY", help=f"One of: {', '.join(settings.SETTINGS)}.", show_default=False)]

# CPU flags (as /proc/cpuinfo names them) that decide which kernels are fast here.
_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def cpu_features() -> dict:
    """The CPU's model name and the flags above that it has (Linux: /proc/cpuinfo; elsewhere
    torch's own capability string only)."""
    import torch

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not flags:
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"name": name, "cores": os.cpu_count(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in _CPU_FLAGS if f in flags]}


def report() -> dict:
    """Everything `mellow env` prints, as one JSON-able dict."""
    import torch

    from mellow_cli.store import hub, loading
    from mellow_cli.runtime import fused, passes

    cuda = torch.cuda.is_available()
    return {
        "mellow": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_build": "cuda " + torch.version.cuda if torch.version.cuda else "cpu",
        "devices": ["cpu"] + (["cuda"] if cuda else []) + (["mps"] if torch.backends.mps.is_available() else []),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cpu": cpu_features(),
        "threads": torch.get_num_threads(),
        "decode_step": fused.status() + "; float32 runs torch's, the exact path",
        "prefill": passes.prefill_status(),
        "cache": str(loading.cache_dir()),
        "cached_models": [m.name for m in loading.cached_models()],
        "config_file": str(settings.config_path()),
        "settings": {k: _value_dict(settings.lookup(k)) for k in settings.SETTINGS},
        "dtype_auto": _auto_dtype(),
        "offline": hub.offline(),
        "hf_endpoint": os.environ.get("HF_ENDPOINT") or "https://huggingface.co",
    }


def _auto_dtype() -> dict:
    """What --dtype auto runs on this CPU, as kept from its timing (env never times it: that takes
    seconds and is the first model run's work)."""
    from mellow_cli.runtime import precision

    chosen = precision.known()
    if chosen is None:
        return {"precision": None, "how": "not timed on this CPU yet: the first run that loads a model times its "
                                          "kernels (a few seconds) and keeps the choice"}
    return {"precision": chosen.describe(), "name": chosen.name, "how": chosen.chosen_by}


def _value_dict(v: settings.Value) -> dict:
    return {"value": v.value, "source": v.source}


def env(as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of lines.")] = False) -> None:
    """Show versions, the torch build, device and CPU features, cache, config and settings.

    \b
    Examples:
      mellow env
      mellow env --json | jq .settings
    """
    from mellow_cli.cli.render import result_line

    info = report()
    if as_json:
        result_line(json.dumps(info, indent=2))
        return
    cpu = info["cpu"]
    lines = [
        ("mellow", info["mellow"]),
        ("python", f"{info['python']} ({info['platform']})"),
        ("torch", f"{info['torch']} ({info['torch_build']} build)"),
        ("devices", ", ".join(info["devices"]) + (f" ({info['cuda_device']})" if info["cuda_device"] else "")),
        ("cpu", f"{cpu['name']}, {cpu['cores']} cores, {info['threads']} threads; "
                f"kernels {cpu['torch_capability']}; {' '.join(cpu['flags']) or 'no avx2'}"),
        ("decode step", info["decode_step"]),
        ("prefill", info["prefill"]),
        ("cache", info["cache"] + (f" ({', '.join(info['cached_models'])})" if info["cached_models"] else " (empty)")),
        ("hub", "offline (HF_HUB_OFFLINE)" if info["offline"] else info["hf_endpoint"]),
        ("config", info["config_file"] + ("" if os.path.exists(info["config_file"]) else " (not created)")),
    ]
    lines += [(k, f"{v['value']}  [{v['source']}]") for k, v in info["settings"].items()]
    auto = info["dtype_auto"]
    lines.append(("dtype auto", f"{auto['precision']} on this CPU ({auto['how']})" if auto["precision"] else auto["how"]))
    width = max(len(k) for k, _ in lines)
    result_line("\n".join(f"{key.ljust(width)}  {value}" for key, value in lines))


@config_app.command("get")
def get(key: Annotated[Optional[str], typer.Argument(metavar="[KEY]", help="A setting; without it, all of them.", show_default=False)] = None) -> None:
    """Print a setting's value in force (all settings, with their sources, without KEY).

    \b
    Examples:
      mellow config get model
      mellow config get
    """
    from mellow_cli.cli.render import result_line

    if key is not None:
        result_line(settings.lookup(key).value)
        return
    result_line("\n".join(f"{k} = {v.value}  [{v.source}]" for k, v in ((k, settings.lookup(k)) for k in settings.SETTINGS)))


@config_app.command("set")
def set_(key: KeyArg, value: Annotated[str, typer.Argument(metavar="VALUE", show_default=False)]) -> None:
    """Store a default in the config file.

    A model must be a published name, a hub id user/repo, or a checkpoint file or model folder
    that exists (kept as its absolute path).

    \b
    Examples:
      mellow config set model ~/models/mellow-birds
      mellow config set model tinymu
      mellow config set device cpu
    """
    if key == "model":
        value = _model_name(value)
    path = settings.write(key, value)
    sys.stderr.write(f"{key} = {value} saved in {path}\n")
    shadow = os.environ.get(f"MELLOW_{key.upper()}", "").strip()
    if shadow:
        sys.stderr.write(f"mellow: warning: MELLOW_{key.upper()}={shadow} is set and takes precedence\n")


def _model_name(value: str) -> str:
    """What `config set model VALUE` stores: a published name or a hub id as written, a checkpoint
    or model folder that exists as its absolute path (so the default holds from any folder). A
    name that is none of these is refused now, not at the next run. A hub id is only checked for
    its form: the hub may be out of reach, and asking it is the first run's work."""
    from mellow_cli.errors import ModelError
    from mellow_cli.models.catalogue import resolve
    from mellow_cli.store.cache import WEIGHTS_FILE

    try:
        src = resolve(value)
    except ModelError as e:
        raise ModelError(f"model {value.strip()!r} not saved: {e}") from None
    if src.kind == "folder" and not (src.path / WEIGHTS_FILE).is_file():
        raise ModelError(f"model {value.strip()!r} not saved: {src.path} holds no {WEIGHTS_FILE} (a model folder "
                         "holds it; for a checkpoint file, name the file)")
    return str(src.path) if src.path is not None else src.name


@config_app.command("unset")
def unset(key: KeyArg) -> None:
    """Remove a default from the config file (the built-in value applies again)."""
    path = settings.write(key, None)
    sys.stderr.write(f"{key} removed from {path}\n")


@config_app.command("path")
def path() -> None:
    """Print where the config file is (or would be)."""
    from mellow_cli.cli.render import result_line

    result_line(str(settings.config_path()))
