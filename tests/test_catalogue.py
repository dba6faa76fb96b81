"""The model names beside Mellow's (`tinymu`, `samsone-99m/134m/356m`) and getting their weights:
TinyMU's `tinymu.pt` from the hub, Samsone's `*_bf16.ckpt` as GitHub release assets, both through
the fake servers on 127.0.0.1 (tests/fakehub.py), into the cache, converted once, loaded offline.

Each family's checkpoint is built by rule: the family's network at its `tiny` preset, written in
the published layout by the family's own `export`, served under a test-only catalogue name.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import pytest
import torch
from fakehub import FakeHub

from mellow_cli.errors import ModelError
from mellow_cli.models import catalogue
from mellow_cli.models.family import family
from mellow_cli.store import cache as model_cache
from mellow_cli.store import loading, release
from mellow_cli.store import tokenizers as tokenizer_files

SAMSONE_REPO, SAMSONE_TAG, SAMSONE_FILE = "test/samsone", "v9.9.9", "samsone_tiny_model_bf16.ckpt"
TINYMU_REPO, TINYMU_COMMIT = "test/tinymu", "2" * 40


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_tinymu():
    torch.manual_seed(0)
    return family("tinymu").build(family("tinymu").config("tiny"))


@pytest.fixture(scope="module")
def tiny_samsone():
    """As the published files hold them: bfloat16."""
    torch.manual_seed(0)
    return family("samsone").build(family("samsone").config("tiny")).to(torch.bfloat16)


@pytest.fixture(scope="module")
def tinymu_file(tiny_tinymu) -> bytes:
    from mellow_cli.models.tinymu.checkpoint import export

    return _save(export(tiny_tinymu.state_dict(), tiny_tinymu.cfg))


@pytest.fixture(scope="module")
def samsone_file(tiny_samsone) -> bytes:
    from mellow_cli.models.samsone.checkpoint import export

    return _save(export(tiny_samsone.state_dict(), tiny_samsone.cfg))


@pytest.fixture
def servers(smollm2_dir, tinymu_file, samsone_file, monkeypatch):
    """The fake hub (the tokenizer; `tiny-tinymu`) and release host (`tiny-samsone`), with the
    retries' waits cut to nothing."""
    monkeypatch.setattr(release, "RETRY_DELAYS", (0.0,) * len(release.RETRY_DELAYS))
    tokenizer = {f: (smollm2_dir / f).read_bytes() for f in tokenizer_files.TOKENIZER_FILES}
    with FakeHub() as fake:
        fake.add_repo(tokenizer_files.TOKENIZER_REPO, tokenizer, commit=tokenizer_files.TOKENIZER_REVISION)
        fake.add_repo(TINYMU_REPO, {"tinymu.pt": tinymu_file}, commit=TINYMU_COMMIT, lfs={"tinymu.pt"})
        url = fake.add_release(SAMSONE_REPO, SAMSONE_TAG, {SAMSONE_FILE: samsone_file})[SAMSONE_FILE]
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setitem(catalogue.PUBLISHED, "tiny-tinymu", catalogue.Published(
            TINYMU_REPO, "tinymu.pt", TINYMU_COMMIT, "tiny", family="tinymu"))
        monkeypatch.setitem(catalogue.PUBLISHED, "tiny-samsone", catalogue.Published(
            SAMSONE_REPO, SAMSONE_FILE, SAMSONE_TAG, "tiny", family="samsone", url=url))
        yield fake


def _asset(servers) -> str:
    return FakeHub.asset_path(servers.releases[f"/{SAMSONE_REPO}/releases/download/{SAMSONE_TAG}/{SAMSONE_FILE}"])


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _same_weights(model, net) -> None:
    ours, theirs = model.state_dict(), net.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k].float(), theirs[k].float()), k


def _nothing_left(home, name: str) -> None:
    """No partial download, and no model folder a later run could take for this model."""
    assert model_cache.partial_downloads() == []
    assert not (home / "models" / name).exists()


# --- the names --------------------------------------------------------------------------------------


def test_the_new_names_resolve_to_their_families_and_pinned_sources():
    tinymu = loading.resolve("tinymu")
    assert (tinymu.kind, tinymu.family, tinymu.preset, tinymu.repo, tinymu.filename, tinymu.url) == (
        "published", "tinymu", "tinymu", "AndreasXi/TinyMU", "tinymu.pt", None)
    assert tinymu.revision == "0735fc50bc8b881d687dedccdd48b742927611b3"
    for size in ("99m", "134m", "356m"):
        src = loading.resolve(f"samsone-{size}")
        assert (src.family, src.preset, src.revision) == ("samsone", f"samsone-{size}", "v1.0.0")
        assert src.url == f"https://github.com/SamsungLabs/samsone/releases/download/v1.0.0/samsone_{size}_model_bf16.ckpt"
    for name, p in catalogue.PUBLISHED.items():  # each builds its family's config, and says what it is
        cfg = family(p.family).config(p.preset)
        assert cfg.family == p.family and p.about and p.terms and p.parameters and p.download_mb, name
    from mellow_cli.settings import SETTINGS

    assert SETTINGS["model"].default == "v0"


def test_samsone_356m_uses_the_pinned_tokenizer_of_135m(servers, isolated_home):
    cfg = family("samsone").config("samsone-356m")
    assert cfg.tokenizer == "HuggingFaceTB/SmolLM2-360M"
    folder = tokenizer_files.tokenizer_folder(cfg, "samsone-356m", progress=False)
    assert folder == tokenizer_files.tokenizer_folder(family("samsone").config("samsone-134m"), "x", progress=False)
    assert folder.parent.name == "HuggingFaceTB--SmolLM2-135M" and folder.name == tokenizer_files.TOKENIZER_REVISION
    asked = {r.path for r in servers.seen(server="hub")}
    assert asked and all(f"/resolve/{tokenizer_files.TOKENIZER_REVISION}/" in p and "135M" in p for p in asked)


# --- pulled, converted once, loaded offline ---------------------------------------------------------


def test_tinymu_from_the_hub_converts_once_then_loads_offline(servers, tiny_tinymu, tinymu_file, isolated_home, monkeypatch):
    files = loading.pull("tiny-tinymu", progress=False)
    record = json.loads((files.folder / "source.json").read_text())
    assert record["source"]["commit"] == TINYMU_COMMIT
    assert record["source"]["sha256"] == hashlib.sha256(tinymu_file).hexdigest()
    assert json.loads((files.folder / "config.json").read_text())["family"] == "tinymu"
    assert not list((isolated_home / "downloads").rglob("tinymu.pt*"))  # the .pt is gone once converted

    count, written = len(servers.requests), files.weights.stat().st_mtime_ns
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, again = loading.load("tiny-tinymu", progress=False)
    _same_weights(model, tiny_tinymu)
    assert len(servers.requests) == count and again.weights.stat().st_mtime_ns == written  # not converted again


def test_samsone_from_a_release_records_its_sha256_then_loads_offline(servers, tiny_samsone, samsone_file, isolated_home, monkeypatch):
    files = loading.pull("tiny-samsone", progress=False)
    source = json.loads((files.folder / "source.json").read_text())["source"]
    assert source["url"] == servers.url + f"/{SAMSONE_REPO}/releases/download/{SAMSONE_TAG}/{SAMSONE_FILE}"
    assert source["sha256"] == hashlib.sha256(samsone_file).hexdigest() and source["size"] == len(samsone_file)
    assert source["revision"] == SAMSONE_TAG and files.revision == SAMSONE_TAG
    assert servers.seen("GET", "/releases/download/", server="hub") and servers.seen("GET", "/assets/", server="cdn")
    assert model_cache.partial_downloads() == []  # the .ckpt and its record went once converted

    count = len(servers.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = loading.load("tiny-samsone", progress=False)
    _same_weights(model, tiny_samsone)
    assert len(servers.requests) == count
    assert [e.revision for e in loading.cached_models()] == [SAMSONE_TAG]


def test_a_tampered_cache_is_refused_and_a_changed_release_file_is_not_adopted(servers, samsone_file, isolated_home, monkeypatch):
    files = loading.pull("tiny-samsone", progress=False)
    data = bytearray(files.weights.read_bytes())
    data[-10] ^= 0xFF
    files.weights.write_bytes(bytes(data))
    with monkeypatch.context() as m:
        m.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ModelError) as e:
            loading.load("tiny-samsone", progress=False)
        assert "the cached copy is damaged" in _one_line(e) and "sha256" in str(e.value)

    # Online it is fetched again, and must be the file first downloaded: the same address now
    # serving other bytes (here: the file without its last 100) is refused, and nothing kept.
    servers.truncate(_asset(servers), 100, times=10)
    with pytest.raises(ModelError) as e:
        loading.pull("tiny-samsone", progress=False)
    message = _one_line(e)
    assert f"{len(samsone_file) - 100} bytes, not the {len(samsone_file)} recorded at its first download" in message
    assert "mellow models rm tiny-samsone" in message
    assert model_cache.partial_downloads() == []
    servers.clear_faults()
    loading.pull("tiny-samsone", progress=False)  # the same file again: repaired


def test_a_pinned_sha256_is_checked_before_the_file_is_kept(servers, samsone_file, isolated_home, monkeypatch):
    wrong = catalogue.PUBLISHED["tiny-samsone"]
    monkeypatch.setitem(catalogue.PUBLISHED, "tiny-samsone", catalogue.Published(
        wrong.repo, wrong.filename, wrong.revision, "tiny", family="samsone", url=wrong.url, sha256="0" * 64))
    with pytest.raises(ModelError) as e:
        loading.pull("tiny-samsone", progress=False)
    assert f"{wrong.url} arrived with sha256 " in _one_line(e) and "not the 000000000000… pinned in the catalogue" in str(e.value)
    _nothing_left(isolated_home, "tiny-samsone")

    right = hashlib.sha256(samsone_file).hexdigest()
    monkeypatch.setitem(catalogue.PUBLISHED, "tiny-samsone", catalogue.Published(
        wrong.repo, wrong.filename, wrong.revision, "tiny", family="samsone", url=wrong.url, sha256=right))
    assert json.loads((loading.pull("tiny-samsone", progress=False).folder / "source.json").read_text())["source"]["sha256"] == right


def test_a_verified_download_awaiting_conversion_is_rehashed_before_use(servers, samsone_file, isolated_home, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the conversion fails: the checked download stays
        m.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(ModelError, match="not enough disk space"):
            loading.pull("tiny-samsone", progress=False)
    waiting = isolated_home / "downloads" / "test--samsone" / SAMSONE_FILE
    assert waiting.is_file() and json.loads(waiting.with_name(SAMSONE_FILE + ".json").read_text())["sha256"] == \
        hashlib.sha256(samsone_file).hexdigest()
    gets = len(servers.seen("GET", "/assets/"))
    data = bytearray(waiting.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    waiting.write_bytes(bytes(data))
    loading.pull("tiny-samsone", progress=False)
    assert len(servers.seen("GET", "/assets/")) == gets + 1  # not trusted: downloaded again


@pytest.mark.parametrize("name, other, wrong", [("tiny-tinymu", "samsone", "a Samsone checkpoint, not a TinyMU one"),
                                                ("tiny-samsone", "tinymu", "a TinyMU checkpoint, not a Samsone one")])
def test_a_checkpoint_of_another_family_is_named(servers, tinymu_file, samsone_file, isolated_home, name, other, wrong):
    if other == "samsone":
        servers.repos[TINYMU_REPO].files["tinymu.pt"] = samsone_file
    else:
        servers.releases[f"/{SAMSONE_REPO}/releases/download/{SAMSONE_TAG}/{SAMSONE_FILE}"] = tinymu_file
    with pytest.raises(ModelError) as e:
        loading.pull(name, progress=False)
    assert wrong in _one_line(e)
    assert not (isolated_home / "models" / name).exists()


# --- failures: one line, nothing a later run would trust --------------------------------------------


def test_a_dropped_connection_resumes_within_the_call(servers, tiny_samsone, samsone_file):
    servers.drop_after(_asset(servers), len(samsone_file) // 3)
    model, _ = loading.load("tiny-samsone", progress=False)
    _same_weights(model, tiny_samsone)
    first, second = servers.seen("GET", "/assets/")
    assert first.headers.get("range") is None
    assert second.headers["range"] == f"bytes={len(samsone_file) // 3}-" and second.headers["if-range"]


@pytest.mark.parametrize("fault, said", [
    ("reset", "stopped (connection dropped after "),
    ("404", ": HTTP 404 (not found): the release has no such file"),
    ("short", "stopped (short read: "),
])
def test_failed_downloads_say_one_line_and_keep_nothing(servers, samsone_file, isolated_home, fault, said):
    url = catalogue.PUBLISHED["tiny-samsone"].url
    if fault == "reset":
        servers.reset_after(_asset(servers), 1000, times=100)
    elif fault == "404":
        servers.fail("/releases/download/", 404)
    else:  # every attempt's body ends 1000 bytes in, before the length its headers announce
        servers.drop_after(_asset(servers), 1000, times=100)
    with pytest.raises(ModelError) as e:
        loading.pull("tiny-samsone", progress=False)
    message = _one_line(e)
    assert url in message and said in message, message
    if fault != "404":
        assert f"of {len(samsone_file)} bytes" in message and "run `mellow models pull tiny-samsone` again" in message
    _nothing_left(isolated_home, "tiny-samsone")

    servers.clear_faults()
    del servers.requests[:]
    loading.pull("tiny-samsone", progress=False)
    assert [r.headers.get("range") for r in servers.seen("GET", "/assets/")] == [None]  # started afresh


def test_no_network_and_offline_are_one_line(servers, isolated_home, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ModelError) as e:
            loading.pull("tiny-samsone", progress=False)
        assert "HF_HUB_OFFLINE" in _one_line(e) and "mellow models pull tiny-samsone" in str(e.value)
        assert servers.requests == []
    loading.pull("tiny-tinymu", progress=False)  # the tokenizer is cached: only the release host is missing
    monkeypatch.setitem(catalogue.PUBLISHED, "tiny-samsone", catalogue.Published(
        SAMSONE_REPO, SAMSONE_FILE, SAMSONE_TAG, "tiny", family="samsone", url="http://127.0.0.1:9/x.ckpt"))
    with pytest.raises(ModelError) as e:
        loading.pull("tiny-samsone", progress=False)
    assert _one_line(e).startswith("cannot reach http://127.0.0.1:9/x.ckpt to download tiny-samsone (")
    _nothing_left(isolated_home, "tiny-samsone")


def test_not_enough_disk_space_before_downloading(servers, isolated_home, monkeypatch):
    loading.pull("tiny-tinymu", progress=False)  # the tokenizer first, while there is room
    free = shutil.disk_usage(isolated_home)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free._replace(free=1000))
    with pytest.raises(ModelError) as e:
        loading.pull("tiny-samsone", progress=False)
    assert _one_line(e).startswith("not enough disk space in ") and "tiny-samsone" in str(e.value)
    _nothing_left(isolated_home, "tiny-samsone")


# --- `mellow models` -------------------------------------------------------------------------------


def _app():
    import typer

    from mellow_cli.cli.models import models_app

    app = typer.Typer()
    app.add_typer(models_app, name="models")
    return app


def test_models_list_available_is_a_table_of_every_name(monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setenv("COLUMNS", "200")
    out = CliRunner().invoke(_app(), ["models", "list", "--available"])
    assert out.exit_code == 0, out.output
    lines = [line.rstrip() for line in out.stdout.splitlines() if line.strip()]
    header = lines[0]
    assert header.split() == ["NAME", "FAMILY", "SIZE", "CACHED", "GOOD", "AT", "SOURCE", "TERMS"]
    rows = {line.split()[0]: line for line in lines[2:2 + len(catalogue.PUBLISHED)]}
    assert list(rows) == list(catalogue.PUBLISHED)
    columns = [header.index(c) for c in ("FAMILY", "SIZE", "GOOD AT", "SOURCE", "TERMS")]
    for name, family_title, source, terms in [
        ("v0", "Mellow", "hub soham97/mellow", "code MIT"),
        ("tinymu", "TinyMU", "hub AndreasXi/TinyMU", "no licence stated"),
        ("samsone-356m", "Samsone", "GitHub SamsungLabs/samsone release v1.0.0", "no licence stated"),
    ]:
        row = rows[name]
        assert [row[c:].split("  ")[0] for c in (columns[0], columns[3], columns[4])] == [family_title, source, terms]
    assert rows["samsone-134m"][columns[1]:].startswith("134M, 270 MB")
    assert "MMAU 61.3" in rows["samsone-134m"][columns[2]:]
    assert "their authors'" in out.stdout
    entries = [json.loads(line) for line in CliRunner().invoke(_app(), ["models", "list", "--available", "--json"]).stdout.splitlines()]
    assert [e["name"] for e in entries] == list(catalogue.PUBLISHED)
    assert entries[-1]["url"].endswith("/v1.0.0/samsone_356m_model_bf16.ckpt") and entries[-1]["terms"] == "no licence stated"


def test_models_pull_path_list_rm_for_a_release_name(servers, isolated_home):
    from typer.testing import CliRunner

    runner, app = CliRunner(), _app()
    pulled = runner.invoke(app, ["models", "pull", "tiny-samsone", "-q"])
    assert pulled.exit_code == 0, pulled.output
    folder = isolated_home / "models" / "tiny-samsone"
    assert pulled.stdout.strip() == str(folder)
    assert runner.invoke(app, ["models", "path", "tiny-samsone"]).stdout.strip() == str(folder)
    header, row = runner.invoke(app, ["models", "list"]).stdout.splitlines()
    assert row.split() == ["tiny-samsone", *row.split()[1:3], SAMSONE_TAG, catalogue.PUBLISHED["tiny-samsone"].url]
    removed = runner.invoke(app, ["models", "rm", "tiny-samsone"])
    assert removed.exit_code == 0 and removed.stdout.startswith("removed tiny-samsone (")
    assert not folder.exists()


# --- a published model's file brought from disk: `mellow models pull NAME --from FILE` -------------------


def _brought(tmp_path, data: bytes, name: str, smollm2_dir=None):
    """The file as a user brings it on a stick, with SmolLM2's tokenizer beside it if given."""
    folder = tmp_path / "usb"
    folder.mkdir(exist_ok=True)
    for f in tokenizer_files.TOKENIZER_FILES if smollm2_dir else ():
        shutil.copyfile(smollm2_dir / f, folder / f)
    (folder / name).write_bytes(data)
    return folder / name


def _pinned(monkeypatch, name: str, sha256: str) -> None:
    p = catalogue.PUBLISHED[name]
    monkeypatch.setitem(catalogue.PUBLISHED, name, catalogue.Published(
        p.repo, p.filename, p.revision, p.preset, family=p.family, url=p.url, sha256=sha256))


def test_a_file_from_disk_is_checked_against_the_hubs_sha256_then_is_the_model_offline(
        servers, tiny_tinymu, tinymu_file, isolated_home, tmp_path, monkeypatch):
    from mellow_cli.store.adopt import adopt

    brought = _brought(tmp_path, tinymu_file, "tinymu.pt")
    files = adopt(loading.resolve("tiny-tinymu"), brought, progress=False)
    assert not servers.seen("GET", "tinymu.pt")  # asked for its sha256 only, never downloaded
    source = json.loads((files.folder / "source.json").read_text())["source"]
    assert source["sha256"] == hashlib.sha256(tinymu_file).hexdigest() and source["from"] == str(brought)
    assert source["checked"] == f"announced by the hub at {TINYMU_COMMIT[:8]}" and source["commit"] == TINYMU_COMMIT
    assert brought.read_bytes() == tinymu_file  # the user's file, only read

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # then as if downloaded: named, found, loaded
    assert model_cache.model_path("tiny-tinymu") == files.folder == isolated_home / "models" / "tiny-tinymu"
    assert [(e.name, e.revision) for e in loading.cached_models()] == [("tiny-tinymu", TINYMU_COMMIT)]
    model, again = loading.load("tiny-tinymu", progress=False)
    _same_weights(model, tiny_tinymu)
    assert again.weights == files.weights


def test_a_file_from_disk_that_is_not_the_published_one_is_refused(servers, samsone_file, tinymu_file, isolated_home, tmp_path):
    from mellow_cli.store.adopt import adopt

    wrong = _brought(tmp_path, samsone_file, "tinymu.pt")
    with pytest.raises(ModelError) as e:
        adopt(loading.resolve("tiny-tinymu"), wrong, progress=False)
    message = _one_line(e)
    assert message.startswith(f"{wrong}: ") and f"test/tinymu/tinymu.pt announced by the hub at {TINYMU_COMMIT[:8]}" in message
    assert "not the file of tiny-tinymu; nothing is kept" in message
    _nothing_left(isolated_home, "tiny-tinymu")


def test_offline_a_file_from_disk_is_checked_against_the_catalogues_pin(
        servers, smollm2_dir, samsone_file, isolated_home, tmp_path, monkeypatch):
    from mellow_cli.store.adopt import adopt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    brought = _brought(tmp_path, samsone_file, SAMSONE_FILE, smollm2_dir)
    _pinned(monkeypatch, "tiny-samsone", "0" * 64)
    with pytest.raises(ModelError) as e:
        adopt(loading.resolve("tiny-samsone"), brought, progress=False)
    assert "not the 000000000000… of " in _one_line(e) and "pinned in the catalogue" in str(e.value)
    _nothing_left(isolated_home, "tiny-samsone")

    _pinned(monkeypatch, "tiny-samsone", hashlib.sha256(samsone_file).hexdigest())
    files = adopt(loading.resolve("tiny-samsone"), brought, progress=False)
    assert json.loads((files.folder / "source.json").read_text())["source"]["checked"] == "pinned in the catalogue"
    assert not servers.requests  # offline: nothing asked of anyone


def test_offline_without_a_known_sha256_it_says_so_and_records_the_files(
        servers, smollm2_dir, samsone_file, isolated_home, tmp_path, monkeypatch, capsys):
    from mellow_cli.store.adopt import adopt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    brought = _brought(tmp_path, samsone_file, SAMSONE_FILE, smollm2_dir)
    files = adopt(loading.resolve("tiny-samsone"), brought, progress=False)
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and f"{brought}: not checked against a known sha256" in said
    assert hashlib.sha256(samsone_file).hexdigest() in said
    source = json.loads((files.folder / "source.json").read_text())["source"]
    assert source["checked"] is None and source["sha256"] == hashlib.sha256(samsone_file).hexdigest()


def test_a_file_from_disk_must_match_what_an_earlier_download_recorded(servers, samsone_file, isolated_home, tmp_path):
    from mellow_cli.store.adopt import adopt

    loading.pull("tiny-samsone", progress=False)
    data = bytearray(samsone_file)
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(ModelError) as e:
        adopt(loading.resolve("tiny-samsone"), _brought(tmp_path, bytes(data), SAMSONE_FILE), force=True, progress=False)
    assert "recorded when it was first downloaded" in _one_line(e)
    loading.pull("tiny-samsone", progress=False)  # the cached copy is still whole


def test_models_pull_from_a_file_then_list_path_and_the_name_as_model(servers, smollm2_dir, samsone_file, isolated_home, tmp_path,
                                                                     monkeypatch, capsys):
    from typer.testing import CliRunner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    brought = _brought(tmp_path, samsone_file, SAMSONE_FILE, smollm2_dir)
    runner, app = CliRunner(), _app()
    pulled = runner.invoke(app, ["models", "pull", "tiny-samsone", "--from", str(brought), "-q"])
    assert pulled.exit_code == 0, pulled.output
    folder = isolated_home / "models" / "tiny-samsone"
    assert pulled.stdout.strip() == str(folder)
    assert runner.invoke(app, ["models", "path", "tiny-samsone"]).stdout.strip() == str(folder)
    header, row = runner.invoke(app, ["models", "list"]).stdout.splitlines()
    assert row.split()[0] == "tiny-samsone" and row.endswith(f"(from {brought})")
    again = runner.invoke(app, ["models", "pull", "tiny-samsone", "--from", str(brought)])
    assert again.exit_code == 0 and "already in the cache" in again.stderr
    from mellow_cli.cli import main

    for name in ("someone/model", str(brought)):  # --from brings the file of a published name only
        with pytest.raises(SystemExit) as e:
            main(["models", "pull", name, "--from", str(brought)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "--from brings the file of a published model" in err
