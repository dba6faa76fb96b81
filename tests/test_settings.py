"""Standing defaults (flag > MELLOW_<KEY> > config file > built-in), `mellow env`, `mellow config`,
the model catalogue, shell completion, --version and a quiet stop on a closed pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import write_tone
from mellow_cli import settings


def run(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mellow_cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def test_lookup_order_flag_env_file_builtin(monkeypatch):
    assert settings.lookup("model") == settings.Value("model", "v0", "built-in")
    settings.write("model", "from-file")
    assert settings.lookup("model").value == "from-file"
    assert settings.lookup("model").source.startswith("config ")
    monkeypatch.setenv("MELLOW_MODEL", "from-env")
    assert settings.lookup("model") == settings.Value("model", "from-env", "env MELLOW_MODEL")
    assert settings.lookup("model", flag="from-flag").value == "from-flag"


def test_write_keeps_other_settings_and_unset_removes_one():
    settings.write("device", "cpu")
    settings.write("model", 'odd "name" \\ here')
    assert settings.read_file() == {"device": "cpu", "model": 'odd "name" \\ here'}
    settings.write("device", None)
    assert settings.read_file() == {"model": 'odd "name" \\ here'}


def test_config_set_get_unset_from_the_shell(tmp_path):
    birds = tmp_path / "birds"
    birds.mkdir()
    (birds / "model.safetensors").write_bytes(b"")
    assert run("config", "set", "model", "birds", cwd=tmp_path).returncode == 0
    assert run("config", "get", "model").stdout == f"{birds}\n"  # kept whole: it holds from any folder
    listing = run("config", "get").stdout
    assert f"model = {birds}  [config " in listing and "device = auto  [built-in]" in listing
    assert run("config", "get", "model", env={"MELLOW_MODEL": "v0_s"}).stdout == "v0_s\n"
    assert run("config", "unset", "model").returncode == 0
    assert run("config", "get", "model").stdout == "v0\n"


@pytest.mark.parametrize("args", [["set", "device", "gpu"], ["set", "colour", "red"], ["get", "colour"],
                                  ["set", "dtype", "float64"]])
def test_bad_setting_is_a_usage_error(args):
    out = run("config", *args)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("mellow: error: ")


def test_broken_config_file_names_the_file(isolated_home):
    path = isolated_home / "config.toml"
    for text in ("model = [1, 2]\n", "model = \n", "colour = \"red\"\n", "device = \"gpu\"\n"):
        path.write_text(text)
        out = run("config", "get", "model")
        assert out.returncode != 0, text
        assert out.stderr.count("\n") == 1 and str(path) in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_default_model_comes_from_env_then_config(tmp_path):
    """The model named by MELLOW_MODEL or the config file is the one `ask` tries to load."""
    clip = write_tone(tmp_path / "a.wav")
    missing_env, missing_file = tmp_path / "env-model.ckpt", tmp_path / "file-model.ckpt"
    settings.write("model", str(missing_file))  # since removed (an unplugged disk, say)
    out = run("ask", str(clip), "what is it?", "-q")
    assert out.returncode != 0 and str(missing_file) in out.stderr, out.stderr
    out = run("ask", str(clip), "what is it?", "-q", env={"MELLOW_MODEL": str(missing_env)})
    assert out.returncode != 0 and str(missing_env) in out.stderr, out.stderr
    out = run("ask", str(clip), "what is it?", "-q", "-m", str(tmp_path / "flag.ckpt"),
              env={"MELLOW_MODEL": str(missing_env)})
    assert "flag.ckpt" in out.stderr and str(missing_env) not in out.stderr


@pytest.mark.parametrize("name, problem", [("v9", "unknown model 'v9'"), ("./gone.ckpt", "no such file or folder"),
                                           (".", "holds no model.safetensors")])
def test_config_set_model_refuses_what_no_run_could_load(name, problem, tmp_path):
    out = run("config", "set", "model", name, cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and problem in out.stderr, out.stderr
    assert out.stderr.startswith(f"mellow: error: model {name!r} not saved: ")
    assert settings.read_file() == {}
    for name in ("tinymu", "someone/birds@v2"):  # a published name; a hub id (the hub is asked at the first run)
        assert run("config", "set", "model", name).returncode == 0
        assert run("config", "get", "model").stdout == f"{name}\n"


def test_help_shows_the_default_model_in_force():
    import re

    def shown(command: str, **env) -> str:
        text = " ".join(run(command, "--help", env=env).stdout.split())  # the help's lines wrap
        return re.search(r"--model <str> [^[]*(\[default: [^]]*\])", text).group(1)

    assert shown("ask") == "[default: v0]"
    settings.write("model", "tinymu")
    assert shown("ask").startswith("[default: tinymu (config ") and shown("serve").startswith("[default: tinymu (")
    assert shown("caption", MELLOW_MODEL="v0_s") == "[default: v0_s (env MELLOW_MODEL)]"


def test_default_device_from_env_is_checked_like_the_flag(tmp_path):
    clip = write_tone(tmp_path / "a.wav")
    out = run("ask", str(clip), "q", "-q", env={"MELLOW_DEVICE": "tpu"})
    assert out.returncode == 2 and "MELLOW_DEVICE" in out.stderr and "tpu" in out.stderr


def test_env_reports_versions_cpu_and_where_each_setting_came_from():
    out = run("env", "--json", env={"MELLOW_DEVICE": "cpu"})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    import torch

    assert info["torch"] == torch.__version__ and info["cpu"]["cores"] == os.cpu_count()
    assert info["settings"]["device"] == {"value": "cpu", "source": "env MELLOW_DEVICE"}
    assert info["settings"]["model"]["source"] == "built-in"
    assert info["offline"] is False
    assert run("env", env={"HF_HUB_OFFLINE": "1"}).stdout.count("offline") == 1
    assert "model" in run("env").stdout


def test_env_says_what_dtype_auto_runs_on_this_cpu(isolated_home):
    from mellow_cli.runtime import precision

    line = next(line for line in run("env").stdout.splitlines() if line.startswith("dtype auto"))
    assert "not timed on this CPU yet" in line
    chosen = precision.CANDIDATES[3]  # as a run would keep it (threads: what a new process has)
    key = subprocess.run([sys.executable, "-c", "from mellow_cli.runtime import precision; print(precision.machine_key())"],
                         capture_output=True, text=True, check=True).stdout.strip()
    (isolated_home / "precision.json").write_text(json.dumps({key: {
        "name": chosen.name, "store": chosen.store, "decode": chosen.decode, "prefill": chosen.prefill,
        "packed": chosen.packed}}))
    info = json.loads(run("env", "--json").stdout)["dtype_auto"]
    assert info["name"] == "bfloat16" and info["precision"] == chosen.describe() and "measured before" in info["how"]
    line = next(line for line in run("env").stdout.splitlines() if line.startswith("dtype auto"))
    assert line.split(None, 2)[2].startswith(f"{chosen.describe()} on this CPU (auto: measured before")


def test_models_list_available_works_offline_and_marks_nothing_cached():
    out = run("models", "list", "--available", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["v0", "v0_s", "tinymu", "samsone-99m", "samsone-134m", "samsone-356m"]
    assert [r["repo"] for r in rows[:2]] == ["soham97/mellow"] * 2 and not any(r["cached"] for r in rows)
    lines = [line for line in run("models", "list", "--available").stdout.splitlines() if line.strip()]
    cached = lines[0].index("CACHED")
    v0 = next(line for line in lines if line.split()[0] == "v0")
    assert v0.split()[:2] == ["v0", "Mellow"] and v0[cached:].split()[0] == "-"


def test_shell_completion_script_is_offered():
    # the shell named, not detected from the parent process (which under nohup or a service is none)
    out = run("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert out.returncode == 0, out.stderr
    assert "_MELLOW_COMPLETE" in out.stdout


def test_version_names_python_and_torch():
    import torch

    from mellow_cli import __version__

    out = run("--version").stdout
    assert out.startswith(f"mellow {__version__} (Python ") and f"torch {torch.__version__}" in out


def test_closed_pipe_stops_quietly(tiny_model_dir, tmp_path):
    for i in range(6):
        write_tone(tmp_path / f"{i}.wav", 200 + 100 * i, seconds=0.5)
    cmd = (f"{sys.executable} -m mellow_cli caption {tmp_path} -m {tiny_model_dir} --max-tokens 3 -b 1 -f jsonl"
           f" 2>{tmp_path / 'err'} | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert out.stdout.strip() == "141"
    assert "error" not in (tmp_path / "err").read_text()


@pytest.mark.parametrize("args", [("env",), ("env", "--json"), ("config", "get"), ("config", "path")])
def test_a_full_stdout_is_one_line_naming_it(args):
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "mellow_cli", *args], stdout=full, stderr=subprocess.PIPE,
                             text=True)
    assert out.returncode == 1
    assert out.stderr == "mellow: error: standard output: cannot write the output (No space left on device)\n"


def test_models_rm_of_a_local_file_says_only_its_cached_copy_went(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from test_cli_answers import mellow

    from mellow_cli.store import loading

    mine = tmp_path / "v0.ckpt"
    mine.write_bytes(b"the user's own weights")
    copy = tmp_path / "cache" / "models" / "v0-1234"
    monkeypatch.setattr(loading, "cached_models", lambda: [SimpleNamespace(name=str(mine), folder=copy)])
    monkeypatch.setattr(loading, "remove", lambda name: 673_600_000)
    out = mellow("models", "rm", str(mine))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"removed the cached copy of {mine} ({copy}), 673.6 MB; {mine} itself is untouched\n"
    assert mine.read_bytes() == b"the user's own weights"


def _bounded(limit: int):
    """For a subprocess: at most `limit` bytes of memory, so that a file read without end fails
    instead of filling the machine's."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _unusable(kind: str, path, tmp_path):
    """Put at `path` something no settings file may be read from."""
    if kind == "pipe":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "huge":  # valid TOML and JSON-less: one long comment
        path.write_text("# " + "x" * (2 << 20) + "\n")
    elif kind == "deep":
        path.write_text("model = " + "[" * 100_000 + "]" * 100_000 + "\n")
    elif kind == "deep-table":
        path.write_text("model = " + "{a = " * 100_000 + "1" + "}" * 100_000 + "\n")


@pytest.mark.parametrize("kind", ["pipe", "device", "folder", "huge", "deep", "deep-table"])
def test_a_config_file_that_is_no_small_regular_file_is_one_line_naming_it_and_left_alone(kind, isolated_home,
                                                                                       tmp_path):
    path = isolated_home / "config.toml"
    _unusable(kind, path, tmp_path)
    before = os.lstat(path)
    for args in (("get", "model"), ("set", "device", "cpu")):
        out = run("config", *args, timeout=60, preexec_fn=_bounded(1 << 30))
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"mellow: error: {path}: "), out.stderr
        assert "unexpected" not in out.stderr
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_size) == (before.st_ino, before.st_mode, before.st_size)


def test_config_set_writes_only_its_own_file(isolated_home, tmp_path):
    """Not through a name left beside the file (a link to another file), and where the config file
    is a link, into the file it names, the link kept."""
    path = isolated_home / "config.toml"
    victim = tmp_path / "victim"
    victim.write_text("someone else's\n")
    for name in (f"{path.name}.tmp", f".{path.name}.tmp-{os.getpid()}"):  # names a write might use
        (path.parent / name).symlink_to(victim)
    settings.write("device", "cpu")
    assert victim.read_text() == "someone else's\n"
    assert settings.read_file() == {"device": "cpu"}

    real = tmp_path / "dotfiles" / "mellow.toml"
    real.parent.mkdir()
    real.write_text('model = "birds"\n')
    path.unlink()
    path.symlink_to(real)
    settings.write("device", "cpu")
    assert path.is_symlink() and settings.read_file(real) == {"device": "cpu", "model": "birds"}
    assert victim.read_text() == "someone else's\n"
