"""--dtype auto's measured choice and its cache (precision.py)."""

from __future__ import annotations

import json

import pytest
import torch

from mellow_cli.store import loading
from mellow_cli.runtime import matrices, precision


def test_a_choice_made_among_other_candidates_is_measured_again(monkeypatch):
    """A cache written by a release that weighed other candidates must not decide for this one:
    its pick may be one this release would never make (or no longer offers)."""
    monkeypatch.setattr(precision, "_measured", {})
    calls = []
    monkeypatch.setattr(precision, "measure", lambda: calls.append(1) or (precision.EXACT, {}, 1.0))
    path = loading.cache_dir() / "precision.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = {"name": "bfloat16", "store": "bfloat16", "decode": "bfloat16", "prefill": "bfloat16", "packed": False}
    path.write_text(json.dumps({precision.machine_key(): stale}))
    assert precision.named("auto", torch.device("cpu")).name == "bfloat16" and calls == []  # same candidates

    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.setattr(precision, "CANDIDATES", precision.CANDIDATES[:2])  # another release's list
    chosen = precision.named("auto", torch.device("cpu"))
    assert calls == [1] and chosen.name == "float32"


def test_a_half_precision_copy_takes_every_product_of_several_rows():
    """float16 weights with a bfloat16 copy: one row (a decode step) reads the float16 weights;
    several rows, whether positions of a prefill or the rows of a batch of decode steps, take the
    bfloat16 copy (the float16 product costs about 6x at 8 rows on CPUs where this pays)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=g)
    dense = matrices.Dense(weight, torch.float16, torch.float16, torch.bfloat16)
    assert dense.copy is not None and dense.weight.dtype == torch.float16

    def by_float16(x):
        return F.linear(x.half(), weight.half()).float()

    def by_bfloat16(x):
        return F.linear(x.bfloat16(), weight.bfloat16()).float()

    one = torch.randn(1, 1, 32, generator=g)
    assert torch.equal(dense(one), by_float16(one))
    for several in (torch.randn(1, 5, 32, generator=g), torch.randn(4, 1, 32, generator=g)):
        got = dense(several)
        assert got.dtype == torch.float32 and got.shape == (*several.shape[:-1], 48)
        assert torch.allclose(got, by_bfloat16(several), atol=1e-2, rtol=1e-2)
        assert not torch.allclose(got, by_float16(several), atol=1e-4, rtol=0)  # not the float16 weights


def test_a_float32_prefill_widens_per_call_and_keeps_no_copy():
    weight = torch.randn(16, 8)
    dense = matrices.Dense(weight, torch.float16, torch.float16, torch.float32)
    assert dense.copy is None
    batch_of_steps = torch.randn(3, 1, 8)  # several rows, one position each: the stored kernel
    assert torch.equal(dense(batch_of_steps), torch.nn.functional.linear(batch_of_steps.half(), weight.half()).float())


def test_the_head_keeps_no_bfloat16_copy():
    """The head's products are the logits: with a bfloat16 copy for several rows, a batch's
    choice picks parted from float32's at near ties (21 of 400 on a trained tiny model). The head
    stays on float16 for a few rows of one position and multiplies several positions in float32:
    a few widened per call, a batch's (HEAD_WIDE_FROM rows or more) by a float32 copy kept."""
    from mellow_cli.models.mellow.config import MellowConfig
    from mellow_cli.runtime.llama import LlamaForCausalLM

    candidate = precision.Precision("float16", "float16", "float16", "bfloat16")
    lm = LlamaForCausalLM(MellowConfig.tiny()).eval()
    table = lm.lm_head.weight.detach().clone()
    precision.apply(lm, candidate)
    assert lm.model.layers[0].mlp.gate_up.copy is not None  # the layers keep their copy
    head = lm.head_matrix
    assert head.copy is None and head.weight.dtype == torch.float16
    rows = torch.randn(4, 1, table.shape[1])  # a batch's last positions
    assert torch.equal(head(rows), torch.nn.functional.linear(rows.half(), table.half()).float())
    positions = torch.randn(2, 3, table.shape[1])  # one question's choice tokens
    assert torch.allclose(head(positions), positions @ table.half().float().T, atol=1e-5)
    assert head.wide is None  # no float32 copy held for a few rows
    kept = []
    for batch in (torch.randn(2, matrices.HEAD_WIDE_FROM // 2, table.shape[1]),  # a batch's choice tokens
                  torch.randn(matrices.HEAD_WIDE_FROM, 1, table.shape[1])):  # rows of one position
        assert torch.allclose(head(batch), batch @ table.half().float().T, atol=1e-5)
        kept.append(head.wide)
    assert kept[0] is not None and kept[1] is kept[0]  # made once, then kept


def test_a_bfloat16_prefill_takes_the_encoder_linears_and_float32_or_float16_leave_them():
    from mellow_cli.models.mellow.config import MellowConfig
    from mellow_cli.models.mellow.htsat import pack_linears
    from mellow_cli.models.mellow.network import Mellow

    torch.manual_seed(0)
    cfg = MellowConfig.tiny()
    wav = torch.randn(2, cfg.clip_samples) * 0.1
    nets = {}
    for name in ("float32", "float16", "bfloat16"):
        torch.manual_seed(1)
        nets[name] = Mellow.from_config(cfg, device="cpu").eval()
        changed = pack_linears(nets[name].audio_encoder.base.htsat, precision.named(name, torch.device("cpu")))
        linears = [m for m in nets[name].audio_encoder.base.htsat.modules() if isinstance(m, torch.nn.Linear)]
        packed = [m for m in nets[name].audio_encoder.base.htsat.modules() if isinstance(m, matrices.PackedLinear)]
        if name == "bfloat16" and matrices.packed_available(torch.bfloat16):
            assert changed and packed and not linears
            # every MLP's GELU runs inside its first product, whose output stays bfloat16
            assert sum(m.post == "gelu" and m.keep for m in packed) == sum(cfg.depths)
            # and every window attention's q, k, v stay bfloat16 into its attention
            from mellow_cli.models.mellow.htsat import WindowAttention

            attentions = [m for m in nets[name].modules() if isinstance(m, WindowAttention)]
            assert len(attentions) == sum(cfg.depths) and all(a.qkv.keep and not a.proj.keep for a in attentions)
        else:
            assert not changed and linears and not packed
    with torch.inference_mode():
        exact = nets["float32"].encode_audio(wav)
        assert torch.equal(nets["float16"].encode_audio(wav), exact)
        rounded = nets["bfloat16"].encode_audio(wav)
    error = float((rounded - exact).norm() / exact.norm())
    assert error < 0.01  # bfloat16's 8-bit mantissa, through a few layers
    if matrices.packed_available(torch.bfloat16):
        assert error > 0  # it did run in bfloat16


def test_auto_counts_the_one_call_step_where_it_runs_a_candidate(monkeypatch):
    from mellow_cli.runtime import fused

    monkeypatch.setattr(precision, "_time", lambda fn, repeat, clock: 1.0)  # every torch kernel alike
    readable = []

    def instant(stack, head, *args):  # the one-call step, where it can run the matrices
        ok = fused._stored(head) is not None
        readable.append(ok)
        return 0.0 if ok else None

    monkeypatch.setattr(fused, "decode_seconds", instant)
    shapes = dict(hidden=64, intermediate=80, kv=32, vocab=120, layers=4, heads=4, timed_layers=2, rounds=1)
    choice, timings, _ = precision.measure(**shapes)
    # float32 first, then float16 (plain float16 matrices): a free decode step makes it the first win
    assert choice.name == "float16" and choice.prefill == "float32" and not choice.packed
    assert readable[:2] == [False, True]
    without, _, _ = precision.measure(**shapes, fused=False)
    assert without.name == "float32"  # all alike: nothing beats the exact path by 10%


def test_an_int8_matrix_in_memory_torchs_kernel_cannot_read_is_copied_for_it():
    """A matrix read from the int8 copy lies where the file puts it; torch's int8 kernel faulted on
    weights not 32-byte aligned, from 4 rows on. In a child process, as a fault ends it."""
    import subprocess
    import sys

    code = """
import pytest
import torch
from mellow_cli.runtime import matrices
buf = torch.randint(-127, 128, (48 * 64 + 128,), dtype=torch.int8)
start = (64 - buf.data_ptr() % 64) % 64 + 8  # 8 bytes past a 64-byte boundary
q = buf[start:start + 48 * 64].view(48, 64)
scale = torch.rand(48) + 0.5
matrix = matrices.Int8Matrix.stored(q, scale)
x = torch.randn(8, 1, 64)
got = matrix(x)
assert matrix.q is q  # what step.c reads stays where it was
expected = x.bfloat16().float() @ (q.float() * scale.bfloat16().float()[:, None]).T
print(float((got - expected).abs().max() / expected.abs().max()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 1e-2


GOOD = {"name": "float16", "store": "float16", "decode": "float16", "prefill": "float32", "packed": False}


def _entry(**change) -> str:
    return json.dumps({precision.machine_key(): {**GOOD, **change}})


BAD = {"unknown store": _entry(store="nope"), "store a list": _entry(store=["float16"]),
       "packed a string": _entry(packed="yes"), "int8 of float16": _entry(name="int8"),
       "packed int8": _entry(name="int8", store="int8", decode="int8", prefill="int8", packed=True),
       "a list": "[1, 2]", "deep": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not JSON": "{" * 50,
       "not UTF-8": "\xff not text", "huge": json.dumps({"": "x" * (2 << 20)})}


@pytest.mark.parametrize("text", BAD.values(), ids=BAD.keys())
def test_a_bad_precision_json_is_said_once_and_measured_again(text, monkeypatch, capsys):
    monkeypatch.setattr(precision, "_measured", {})
    calls = []
    monkeypatch.setattr(precision, "measure", lambda: calls.append(1) or (precision.EXACT, {}, 1.0))
    path = loading.cache_dir() / "precision.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("latin-1" if text.startswith("\xff") else "utf-8"))
    assert precision.named("auto", torch.device("cpu")).name == "float32" and calls == [1]
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and said.startswith(f"mellow: {path}: ") and "measuring again" in said, said
    assert json.loads(path.read_text())[precision.machine_key()]["name"] == "float32"  # measured anew, kept


@pytest.mark.parametrize("kind", ["pipe", "device", "folder"])
def test_a_precision_json_that_is_no_file_is_said_once_and_measured_again(kind, isolated_home, tmp_path):
    """Never waited on (a pipe) nor read without end (/dev/zero): a subprocess, as the read would
    block or fill its memory."""
    import subprocess
    import sys

    from test_settings import _bounded, _unusable

    path = isolated_home / "precision.json"
    _unusable(kind, path, tmp_path)
    code = ("import torch; from mellow_cli.runtime import precision; precision.measure = lambda: (precision.EXACT, {}, 1.0);"
            "print(precision.named('auto', torch.device('cpu')).name)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=_bounded(4 << 30))
    assert done.returncode == 0 and done.stdout == "float32\n", done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"mellow: {path}: "), done.stderr


# --- timed once per machine, and only when the CPU was ours ------------------------------------


def _timings(monkeypatch, spread: float, load: float):
    """auto's timing replaced by a record of calls returning float32 with `spread`, under `load`."""
    import os

    calls = []
    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.setattr(precision, "measure", lambda: calls.append(1) or (precision.EXACT, {"x": 1.0}, spread))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    return calls


def _later(monkeypatch, seconds: float) -> None:
    """A new process, `seconds` from now."""
    import time

    now = time.time()
    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.setattr(time, "time", lambda: now + seconds)


@pytest.mark.parametrize("spread, load", [(1.0, 64.0), (3.0, 0.0)])  # STEADY is 1.5
def test_a_timing_taken_on_a_busy_cpu_serves_a_while_then_is_taken_again(monkeypatch, spread, load):
    """Busy: a high load average before timing, or rounds that disagree (work that came and went)."""
    calls = _timings(monkeypatch, spread, load)
    chosen = precision.auto()
    assert calls == [1] and "on a busy CPU" in chosen.chosen_by
    saved = json.loads((loading.cache_dir() / "precision.json").read_text())[precision.machine_key()]
    assert saved["busy"] and saved["retime_after"] > 0
    _later(monkeypatch, precision.RETIME_AFTER / 2)  # processes started with it use it
    assert precision.auto().chosen_by.startswith("auto: measured before") and calls == [1]
    _later(monkeypatch, precision.RETIME_AFTER + 1)
    precision.auto()
    assert calls == [1, 1]


def test_a_timing_taken_on_a_quiet_cpu_is_kept_for_good(monkeypatch):
    calls = _timings(monkeypatch, 1.2, 0.3)
    assert "busy" not in precision.auto().chosen_by
    saved = json.loads((loading.cache_dir() / "precision.json").read_text())[precision.machine_key()]
    assert "retime_after" not in saved and "busy" not in saved
    _later(monkeypatch, 365 * 86400.0)
    precision.auto()
    assert calls == [1]


def test_rounds_that_disagree_are_reported_as_unsteady():
    """The clock is injected: every timed call takes as long (steady), or each takes longer than
    the one before (the CPU taken away as the rounds go on)."""
    shapes = dict(hidden=32, intermediate=64, kv=16, vocab=64, layers=2, heads=2, timed_layers=1, rounds=3, fused=False)

    def clock(step):
        ticks = iter(range(10**6))
        return lambda: step(next(ticks))

    _, _, steady = precision.measure(**shapes, clock=clock(lambda t: t))  # each call: one tick
    assert steady == 1.0
    _, _, unsteady = precision.measure(**shapes, clock=clock(lambda t: t * t))  # each call slower
    assert unsteady > precision.STEADY


def test_one_process_times_the_kernels_while_the_others_wait_for_its_choice(monkeypatch):
    """Several processes started together (`--shard`): the ones that find the lock taken wait,
    then use the choice the first one kept, instead of timing on cores it is using."""
    import threading

    from mellow_cli import events
    from mellow_cli.files import cache_lock

    calls = _timings(monkeypatch, 1.0, 0.0)
    waiting = threading.Event()

    class Listener(events.Reporter):
        def note(self, message: str) -> None:
            if "waiting for another mellow process timing" in message:
                waiting.set()

    monkeypatch.setattr(events, "_reporter", Listener())
    chosen = []
    with cache_lock("precision", lambda: None):  # the first process, timing
        other = threading.Thread(target=lambda: chosen.append(precision.auto(progress=True)))
        other.start()
        assert waiting.wait(30)
        bf16 = precision.CANDIDATES[3]
        precision._write(precision._cache_file(), {precision.machine_key(): {
            "name": bf16.name, "store": bf16.store, "decode": bf16.decode, "prefill": bf16.prefill, "packed": False}})
    other.join(30)
    assert calls == [] and chosen[0].name == "bfloat16" and chosen[0].chosen_by.startswith("auto: measured before")
