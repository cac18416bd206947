"""The SGLang paper's workloads as a benchmark suite on `sgl_jax.program` (and on upstream's frontend).

    python -m bench.programs --workloads all --backend engine            # in-process engine, CPU sizes
    python -m bench.programs --workloads mmlu,json --backend http --json out.json
    python -m bench.programs --backend upstream --full                   # upstream's frontend, paper sizes
    python -m bench.programs --workloads mmlu,react --ablations          # radix, schedule policy, jump-forward
    python -m bench.programs --workloads judge,tot --ablations radix     # only the radix cache off beside it
    python -m bench.programs --workloads hellaswag --backend engine,http --rounds 3   # frontends, alternated

One module per workload (its docstring states the data, the program, the CPU and the paper sizes, the gold);
`common.py` says what every module provides. The programs are written against a module parameter `sgl`
(`build(sgl)`), so the same source runs on `sgl_jax.program` and on `sglang` (0.5.10). `runner.py` runs them
with `run_batch`, records every request's token ids below the frontend (`recording.py`) to compute the
optimal cache hit rate, and reads the achieved one from the runtime's counters. `bm25.py` is the RAG
workload's retriever. Host code throughout: no jax import except through the engine.
"""

from __future__ import annotations

import importlib

# workload name -> (module, extra keyword arguments of its load())
WORKLOADS = {
    "mmlu": ("mmlu", {}),
    "hellaswag": ("hellaswag", {}),
    "react": ("react", {}),
    "gen_agents": ("gen_agents", {}),
    "tot": ("tot_gsm8k", {}),
    "tips": ("tips", {}),
    "judge": ("llm_judge", {}),
    "json": ("json_decode", {}),
    "chat_short": ("mtchat", {"long": False}),
    "chat_long": ("mtchat", {"long": True}),
    "rag": ("dspy_rag", {}),
}
ALIASES = {"chat": ["chat_short", "chat_long"], "mtchat": ["chat_short", "chat_long"], "gsm8k": ["tot"],
           "sot": ["tips"], "llm_judge": ["judge"], "dspy": ["rag"], "agents": ["gen_agents"]}


def module(name: str):
    """(workload module, its load() keyword arguments) for a workload name."""
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    mod, kw = WORKLOADS[name]
    return importlib.import_module(f"bench.programs.{mod}"), dict(kw)


def parse_workloads(spec: str) -> list[str]:
    """'all' (the registry's order) or a comma list of names (aliases allowed), in the order given, each once."""
    if spec.strip() == "all":
        return list(WORKLOADS)
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        for n in ALIASES.get(part, [part]):
            if n not in WORKLOADS:
                raise SystemExit(f"unknown workload {part!r}; known: {', '.join(WORKLOADS)} (or 'all')")
            if n not in names:
                names.append(n)
    return names
