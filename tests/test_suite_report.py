"""bench/suite_compile_report.py: the per-test compile report, on a two-test module run in a pytest subprocess."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULE = '''
import jax, jax.numpy as jnp

def test_compiles():
    assert float(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.float32(0.5))) > 0

def test_host_only():
    assert sum(range(4)) == 6
'''


@pytest.mark.timeout(120)
def test_report_counts_each_tests_compiles_beside_its_wall_time(tmp_path):
    (tmp_path / "test_two.py").write_text(MODULE)
    out = tmp_path / "report"
    env = dict(os.environ, SUITE_COMPILE_REPORT=str(out), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.join(ROOT, "bench") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "suite_compile_report",
                        "test_two.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout + p.stderr
    (report,) = out.iterdir()
    data = json.loads(report.read_text())
    jitted, host = data["test_two.py::test_compiles"], data["test_two.py::test_host_only"]
    assert jitted["n_compile"] >= 1 and jitted["compile"] > 0 and jitted["trace"] > 0
    assert jitted["wall"] >= jitted["compile"]
    assert "n_compile" not in host and host["wall"] > 0
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import suite_compile_report
    finally:
        sys.path.pop(0)
    table = suite_compile_report.summarize(str(out), 1)  # by module, then the slowest test
    assert "test_two.py " in table and table.splitlines()[-1].endswith("test_two.py::test_compiles")
