"""HellaSwag 20-shot: one select over the four endings per question, after a 20-example prefix.

Prefix: the first 20 validation items written out with their gold ending ("activity_label: ctx ending\n\n");
question: "activity_label: ctx", then select among " ending" x 4 (the space belongs to the choice, so the
prompt never ends in a space). The questions are the first validation items, which overlap the shots as in
the paper. Every program shares the whole prefix; the 4 choices of one question share its context.

Sizes: cpu = 20 questions; full (--full) = 200 (the paper's). 20 shots in both.
Gold: the label's ending; score: the selected ending is it.
"""

from __future__ import annotations

import bz2

from bench.programs import common

SIZES = {"cpu": dict(n=20, shots=20), "full": dict(n=200, shots=20)}
METRIC = "accuracy"
FILE = "hellaswag_val_full.txt.bz2"


def _items(data_dir: str, count: int) -> list[tuple[str, int, list[str]]]:
    """(context, label, endings) for the first `count` tasks; the file has 6 lines per task."""
    out = []
    with bz2.open(common.path(data_dir, FILE), "rt", encoding="utf-8") as f:
        while len(out) < count:
            lines = [f.readline() for _ in range(6)]
            if not lines[-1]:
                break
            lines = [x.rstrip("\n") for x in lines]
            out.append((lines[0].strip(), int(lines[1]), [e.strip() for e in lines[2:6]]))
    return out


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    sz = SIZES["full" if full else "cpu"]
    tasks = _items(data_dir, 10 ** 9 if n is None else max(n, sz["shots"]))
    prefix = "".join(f"{ctx} {endings[label]}\n\n" for ctx, label, endings in tasks[:sz["shots"]])
    return [{"prefix": prefix, "context": ctx, "choices": [" " + e for e in endings], "_gold": label}
            for ctx, label, endings in (tasks if n is None else tasks[:n])]


def build(sgl, full: bool = False):
    @sgl.function
    def hellaswag(s, prefix, context, choices):
        s += prefix + context
        s += sgl.select("answer", choices=choices)

    return hellaswag


def gold(args: dict) -> str:
    return args["choices"][args["_gold"]]


def score(state, args: dict) -> float:
    return float(state["answer"] == gold(args))
