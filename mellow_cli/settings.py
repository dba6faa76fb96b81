"""The user's standing choices: default model, device and dtype, so offline work needs no `-m`;
and which device a device setting names (`pick_device`).

Each setting is looked up in this order, first found wins:

    the command-line flag  >  MELLOW_<KEY> in the environment  >  the config file  >  built in

The config file is TOML, `config.toml` in the platform's user config folder (`~/.config/mellow`
on Linux) or the file MELLOW_CONFIG names. `mellow config set/get/unset` edit it, `mellow env`
shows every value with where it came from. Only flat `key = "value"` lines are written, so the
file stays readable and hand-editable. Nothing heavy is imported here: the CLI reads these before
it decides whether torch is needed at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mellow_cli.errors import MellowError, ModelError, UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    choices: tuple[str, ...] | None  # None: any non-empty text (model names, paths)
    help: str


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("model", "v0", None, "model every command runs: v0, v0_s, a checkpoint file or folder, user/repo"),
    Setting("device", "auto", ("auto", "cpu", "cuda", "mps"), "where the model runs"),
    Setting("dtype", "auto", ("auto", "float32", "float16", "bfloat16", "int8"), "precision of the weights"),
)}


@dataclass(frozen=True)
class Value:
    key: str
    value: str
    source: str  # "flag", "env MELLOW_MODEL", "config <path>" or "built-in"


def config_path() -> Path:
    """MELLOW_CONFIG if set, else config.toml in the platform's user config folder."""
    named = os.environ.get("MELLOW_CONFIG")
    if named:
        return Path(named).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("mellow", appauthor=False)) / "config.toml"


def _setting(key: str) -> Setting:
    if key not in SETTINGS:
        raise UsageError(f"unknown setting {key!r}: known settings are {', '.join(SETTINGS)}")
    return SETTINGS[key]


def _checked(key: str, value: str, where: str) -> str:
    s = _setting(key)
    value = value.strip()
    if not value:
        raise UsageError(f"{where}: {key} is empty")
    if s.choices is not None and value not in s.choices:
        raise UsageError(f"{where}: {key} = {value!r} is not one of {', '.join(s.choices)}")
    return value


def read_file(path: Path | None = None) -> dict[str, str]:
    """The settings stored in the config file (none if it does not exist); a broken file is a
    one-line error naming it, never ignored, so a typo cannot silently change which model runs."""
    from mellow_cli.files import read_table

    path = path or config_path()
    try:
        table = read_table(path, "toml")
    except MellowError as e:
        raise MellowError(f"{e}; fix it or delete it") from None
    if table is None:
        return {}
    out = {}
    for key, value in table.items():
        if key not in SETTINGS:
            raise UsageError(f"{path}: unknown setting {key!r} (known: {', '.join(SETTINGS)})")
        if not isinstance(value, str):
            raise UsageError(f"{path}: {key} must be a string, e.g. {key} = \"{SETTINGS[key].default}\"")
        out[key] = _checked(key, value, str(path))
    return out


def lookup(key: str, flag: str | None = None) -> Value:
    """The value in force for `key` and where it came from."""
    _setting(key)
    if flag is not None:
        return Value(key, flag, "flag")
    env = f"MELLOW_{key.upper()}"
    if os.environ.get(env, "").strip():
        return Value(key, _checked(key, os.environ[env], env), f"env {env}")
    stored = read_file()
    if key in stored:
        return Value(key, stored[key], f"config {config_path()}")
    return Value(key, SETTINGS[key].default, "built-in")


def write(key: str, value: str | None) -> Path:
    """Set (or with None, remove) one setting in the config file; the others are kept as they are.
    Only a file read as a config file (read_file) is replaced, and where the path is a link, the
    file it names (the link stays). It is written whole (files.write_text_atomic), so never left
    half-written."""
    from mellow_cli.files import write_text_atomic

    path = config_path()
    stored = read_file(path)
    if value is None:
        stored.pop(_setting(key).key, None)
    else:
        stored[key] = _checked(key, value, "mellow config set")
    text = "".join(f"{k} = {_toml_string(v)}\n" for k, v in sorted(stored.items()))
    target = Path(os.path.realpath(path))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, "# mellow settings: `mellow config set KEY VALUE` edits this file\n" + text)
    except OSError as e:
        raise MellowError(f"{path}: cannot write the config file ({e.strerror or e})") from None
    return path


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def pick_device(device: str = "auto") -> "torch.device":
    """The torch device a `device` setting names: auto -> cuda, then mps, then cpu. Asking for a
    device that is absent is a one-line error (torch is imported here, not when settings are read)."""
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if device == "cuda" and not cuda:
        raise ModelError(f"--device cuda: no CUDA device is available (torch {torch.__version__}); "
                         "use --device cpu, or install a CUDA build of torch (see README)")
    if device == "mps" and not mps:
        raise ModelError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    if device not in SETTINGS["device"].choices:
        raise UsageError(f"unknown device {device!r}: use {', '.join(SETTINGS['device'].choices)}")
    return torch.device(device)
