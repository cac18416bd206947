"""MMLU 5-shot: one 1-token gen per question after a per-subject few-shot prefix.

Prompt: "The following are multiple choice questions (with answers) about <subject>.\n\n", k dev examples
("question\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: X\n\n"), then the test question ending "Answer:" and a gen of
one token. k starts at 5 and drops until the prefix fits a length budget (the paper: 1536 tiktoken tokens; here
counted in characters, at 4 per token, since tiktoken is not a dependency). Questions of one subject share the
prefix, which the radix cache computes once.

Sizes: cpu = 40 questions, a seeded sample (kept in file order) from the first 10 subjects alphabetically, with
a 3000-character prefix budget (~750 tokens, so the 2048-token context of the CPU preset is never reached);
full (--full) = all 1369 questions of those 10 subjects (the paper's `--nsub 10`), 6144 characters.
Gold: the answer letter; score: the first letter generated matches it.
"""

from __future__ import annotations

import csv
import io
import tarfile

from bench.programs import common

SIZES = {"cpu": dict(n=40, subjects=10, prefix_chars=3000), "full": dict(n=None, subjects=10, prefix_chars=6144)}
METRIC = "accuracy"
FILE = "mmlu_dev_test_hfcsv.tar.gz"


def _rows(tar: tarfile.TarFile, name: str) -> list[list[str]]:
    text = tar.extractfile(name).read().decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    return rows[1:] if rows and rows[0][:1] == ["question"] else rows  # header: question,choice0..3,answer


def _example(row: list[str], with_answer: bool) -> str:
    q, choices, ans = row[0], row[1:5], row[5]
    s = q.strip() + "\n" + "".join(f"{letter}. {c}\n" for letter, c in zip("ABCD", choices)) + "Answer:"
    return s + f" {'ABCD'[int(ans)]}\n\n" if with_answer else s


def _prefix(subject: str, dev: list[list[str]], budget: int) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    for k in range(min(5, len(dev)), -1, -1):
        text = head + "".join(_example(r, True) for r in dev[:k])
        if len(text) <= budget or k == 0:
            return text
    return head


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    sz = SIZES["full" if full else "cpu"]
    items = []
    with tarfile.open(common.path(data_dir, FILE)) as tar:
        names = tar.getnames()
        subjects = sorted(n_.rsplit("/", 1)[1][:-len("_test.csv")] for n_ in names if n_.endswith("_test.csv"))
        for subject in subjects[:sz["subjects"]]:
            dev = _rows(tar, next(x for x in names if x.endswith(f"/dev/{subject}_dev.csv")))
            prefix = _prefix(subject, dev, sz["prefix_chars"])
            for row in _rows(tar, next(x for x in names if x.endswith(f"/test/{subject}_test.csv"))):
                items.append({"prefix": prefix, "question": _example(row, False), "_gold": "ABCD"[int(row[5])],
                              "_subject": subject})
    return common.take(items, n, seed, shuffle=True)


def build(sgl, full: bool = False):
    @sgl.function
    def mmlu(s, prefix, question):
        s += prefix + question
        s += sgl.gen("answer", max_tokens=1)

    return mmlu


def gold(args: dict) -> str:
    return args["_gold"]


def score(state, args: dict) -> float:
    return float(state["answer"].strip()[:1] == gold(args))
