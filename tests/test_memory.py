"""Freed tensor memory is kept for the next tensor (memory.py), so that a batched prefill does
not fault every large block's pages in again."""

import platform
import subprocess
import sys

import pytest

from mellow_cli.runtime import memory

# A fresh process, as a command is (this one's heap is laid out by every test before it): a
# batched prefill (8 prefixes of 389 positions, two of v0's layers, prepared as auto prepares them
# here), run once, then the page faults of three more. One thread and no transparent huge pages
# (prctl PR_SET_THP_DISABLE), so that what is counted is 4 KiB pages, the same from run to run:
# not which thread's arena took a block, nor how many huge pages the kernel had free.
PREFILL_FAULTS = """
import ctypes, resource, sys, torch
assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0
torch.set_num_threads(1)
from mellow_cli.runtime import memory, precision
from mellow_cli.runtime.llama import LlamaForCausalLM, LMConfig
if sys.argv[1] == "keep":
    assert memory.keep_freed_blocks()
cfg = LMConfig(vocab_size=256, num_hidden_layers=2)
lm = LlamaForCausalLM(cfg).eval()
precision.apply(lm, precision.Precision("float16", "float16", "float16", "bfloat16"), fused=False)
x = torch.randn(8, 389, cfg.hidden_size)
with torch.inference_mode():
    for run in range(4):
        if run == 1:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        lm.setup_cache(8, 389)
        lm(inputs_embeds=x, start=0, logits_to_keep=1)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def prefill_faults(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", PREFILL_FAULTS, mode], capture_output=True, text=True,
                              check=True, timeout=300).stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_batched_prefill_reuses_freed_blocks_instead_of_faulting_pages_in_again():
    default, kept = prefill_faults("default"), prefill_faults("keep")
    # glibc maps each large block afresh and unmaps it when freed (tens of thousands of faults a
    # prefill); kept, the blocks of one prefill serve the next. How many faults remain depends on
    # the CPU's kernels (on an AVX512 CPU a quarter, on an AVX2 one, where torch's attention and
    # bfloat16 products allocate otherwise, about a third to two fifths): at most half, anywhere.
    assert kept * 2 < default, (kept, default)


def test_once_per_process_and_nothing_without_glibc(monkeypatch):
    calls = []

    class Libc:
        def __init__(self):
            self.mallopt = self

        def __call__(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(memory, "_done", [])
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a, **k: Libc())
    assert memory.keep_freed_blocks() and memory.keep_freed_blocks()
    assert calls == [(memory.M_MMAP_THRESHOLD, 32 << 20), (memory.M_TRIM_THRESHOLD, 256 << 20)]

    def no_libc(*args, **kwargs):
        raise OSError("no C library here")

    monkeypatch.setattr(memory, "_done", [])
    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.keep_freed_blocks() is False
