"""Helpers the workload modules share: data files, seeded sampling, answer normalisation.

Every workload module in this package has the same face (the runner relies on nothing else):

    SIZES = {"cpu": {...}, "full": {...}}   # the CPU-scaled and the paper's sizes: "n" = programs,
                                            # "threads" = run_batch's num_threads where the paper fixes it
    METRIC = "accuracy" | "json_valid" | None
    load(data_dir, n, seed=0, full=False) -> list of argument dicts (keys starting "_" are gold/metadata,
                                              stripped before the program sees them)
    build(sgl, full=False) -> the program   # `sgl` is sgl_jax.program or upstream's sglang: one source
    score(state, args) -> float             # where METRIC is set
    gold(args)                              # where there is a gold answer

Host code: no jax.
"""

from __future__ import annotations

import json
import os
import random
import re
import string

# The default data folder: the shared workload files beside the repository (never copied into it).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _default_data() -> str:
    """$SGL_JAX_WORKLOADS, else shared/workloads beside the checkout, else the workplace's /work/shared (a clone
    made elsewhere, e.g. CI's, still finds the data)."""
    env = os.environ.get("SGL_JAX_WORKLOADS")
    if env:
        return env
    for cand in (os.path.join(ROOT, "..", "shared", "workloads"), "/work/shared/workloads"):
        if os.path.isdir(cand):
            return cand
    return os.path.join(ROOT, "..", "shared", "workloads")


DEFAULT_DATA = _default_data()


def path(data_dir: str, name: str) -> str:
    p = os.path.join(data_dir, name)
    if not os.path.exists(p):
        raise FileNotFoundError(f"workload data file {p} not found (pass --data DIR; expected the files listed "
                                f"in shared/workloads/SOURCE.txt)")
    return p


def read_jsonl(p: str) -> list:
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def take(items: list, n: int | None, seed: int, shuffle: bool = False) -> list:
    """The first n items, or (shuffle=True) a seeded sample of n kept in file order; n None = all."""
    if n is None or n >= len(items):
        return list(items)
    if not shuffle:
        return list(items[:n])
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def program_args(args: dict) -> dict:
    """The arguments the program takes: everything but the "_"-prefixed gold and metadata keys."""
    return {k: v for k, v in args.items() if not k.startswith("_")}


def normalize_answer(s: str) -> str:
    """HotpotQA/SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def last_number(text: str) -> str | None:
    """The last number written in `text` (commas dropped, a trailing '.0' removed), or None."""
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text or "")
    if not nums:
        return None
    n = nums[-1].replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def var(state, name: str):
    """A variable gathered by join() is a list: its first element; otherwise the value itself."""
    v = state[name]
    return v[0] if isinstance(v, list) and v else v
