"""Where the test suite's time goes: a pytest plugin that adds up, for each test, jax's compile events (tracing to
a jaxpr, lowering to StableHLO, XLA's backend compile, persistent-cache reads) beside the test's wall time, and a
summary by module.

    SUITE_COMPILE_REPORT=/tmp/cr PYTHONPATH=bench python -m pytest -p suite_compile_report -n 2 tests/
    python bench/suite_compile_report.py /tmp/cr [N]     # by module, then the N slowest tests

Each process (each xdist worker) writes `<dir>/report_<worker>.json`. Events are jax.monitoring's duration events,
recorded in the pytest processes only: a subprocess's compiles (tests/tp_worker.py, a server, multi-host ranks)
show as wall time without compile time. Not a test module (pytest collects test_*.py only).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time

import pytest

_current = [f"<outside tests: {os.environ.get('PYTEST_XDIST_WORKER', 'main')}>"]  # collection, before the first test
_acc: dict = collections.defaultdict(lambda: collections.defaultdict(float))
EVENTS = {"jaxpr_trace_duration": "trace", "jaxpr_to_mlir_module_duration": "lower",
          "backend_compile_duration": "compile", "cache_retrieval_time_sec": "cache_read"}


def _listener(event: str, duration: float, **_kw) -> None:
    name = EVENTS.get(event.rsplit("/", 1)[-1])
    if name:
        _acc[_current[0]][name] += duration
        _acc[_current[0]]["n_" + name] += 1


def pytest_configure(config):
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Runs where the tests run (each xdist worker, not the controller): setup, call and teardown."""
    _current[0] = item.nodeid
    t0 = time.perf_counter()
    yield
    _acc[item.nodeid]["wall"] += time.perf_counter() - t0


def pytest_sessionfinish(session):
    out = os.environ.get("SUITE_COMPILE_REPORT", "")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"report_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json"), "w") as f:
        json.dump({k: dict(v) for k, v in _acc.items()}, f)


def summarize(directory: str, slowest: int = 0) -> str:
    per: dict = {}
    for path in sorted(glob.glob(os.path.join(directory, "report_*.json"))):
        with open(path) as f:
            per.update(json.load(f))
    cols = ("wall", "trace", "lower", "compile", "n_compile", "cache_read")
    mods: dict = collections.defaultdict(lambda: collections.defaultdict(float))
    for test, ev in per.items():
        for k, v in ev.items():
            mods[test.split("::")[0]][k] += v
    lines = [f"{'module':44s}" + "".join(f"{c:>11s}" for c in cols)]
    total: collections.Counter = collections.Counter()
    for mod, ev in sorted(mods.items(), key=lambda x: -x[1]["wall"]):
        lines.append(f"{mod[-44:]:44s}" + "".join(f"{ev.get(c, 0):11.1f}" for c in cols))
        total.update({c: ev.get(c, 0) for c in cols})
    lines.append(f"{'total':44s}" + "".join(f"{total[c]:11.1f}" for c in cols))
    for test, ev in sorted(per.items(), key=lambda x: -x[1].get("wall", 0))[:slowest]:
        lines.append("".join(f"{ev.get(c, 0):8.1f}" for c in cols) + "  " + test)
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
