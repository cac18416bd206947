"""`engine.retain_freed_memory`: freed CPU buffers stay in the process instead of being faulted in afresh.

The measure is the kernel's own count of minor page faults (getrusage) around allocating, touching and freeing
a block, the pattern of a compiled step's buffers: in a fresh process with glibc's defaults a 40 MB block is
mapped and unmapped each time (every page faults again), and after `retain_freed_memory()` the second and later
cycles reuse the pages -- on the main thread and on a second thread (the engine's steps run on one), with live
data beside the block (so on the thread it needs a second heap, which glibc deletes when it is all free).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from sgl_jax.engine import Engine
from sgl_jax.models.testing import write_tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CYCLES = r"""
import json, resource, sys, threading
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "retain":
    from sgl_jax.engine.host_memory import retain_freed_memory
    assert retain_freed_memory() and retain_freed_memory()  # idempotent

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def cycles(out, mb=40):
    resident = bytearray(48 << 20)  # live data before the block: a thread's block then needs a heap of its own
    for _ in range(3):
        f0 = faults()
        block = bytearray(mb << 20)  # zero-filled: every page touched
        del block
        out.append(faults() - f0)

main, thread = [], []
cycles(main)
t = threading.Thread(target=cycles, args=(thread,))
t.start()
t.join()
print(json.dumps({"main": main, "thread": thread}))
"""

PAGES_40MB = (40 << 20) // 4096


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CYCLES, mode, ROOT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.timeout(240)
def test_freed_blocks_are_reused_instead_of_faulted_again():
    if platform.libc_ver()[0] != "glibc":  # the documented no-op elsewhere
        from sgl_jax.engine.host_memory import retain_freed_memory

        assert retain_freed_memory() is False
        return
    default, retain = _faults("default"), _faults("retain")
    for where in ("main", "thread"):
        # glibc's defaults: a 40 MB block is its own mapping, every cycle faults all of its pages in again
        assert all(n >= PAGES_40MB // 2 for n in default[where]), default
        # retained: the first cycle faults the pages in, later ones reuse them
        assert all(n < PAGES_40MB // 20 for n in retain[where][1:]), retain


@pytest.mark.timeout(300)
@pytest.mark.parametrize("retain", [True, False])
def test_the_engine_applies_it_on_cpu_when_asked(tmp_path, monkeypatch, retain):
    from sgl_jax.engine import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(1) or True)
    path = write_tiny_gguf("llama", str(tmp_path / "tiny.gguf"))
    with Engine(model=path, progress=False, warmup=False, compile_cache_dir="", kv_memory_gb=0.01,
                max_context_len=64, page_size=4, retain_freed_memory=retain) as e:
        assert e.config.retain_freed_memory is retain
        out = e.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2, "temperature": 0})
        assert len(out["output_ids"]) == 2
    assert calls == ([1] if retain else [])
