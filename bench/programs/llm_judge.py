"""LLM judge (branch-solve-merge): an article judged on six dimensions in parallel, then one overall score.

The state holds a system prompt and the article; it forks six ways, one branch per dimension (content,
organization, argument, clarity, grammar, citation), each asking for a judgement on that dimension only (stop
"END"). The judgements are joined back and a final gen gives the 1-10 score. 7 calls per article; the six
branches share the article, which fork computes once and holds in the cache.

Sizes: cpu = 4 articles, 48 tokens per judgement; full (--full) = all 25 articles, 256 tokens (the paper's),
8 programs at a time (the paper's parallelism; the CPU size runs them all at once).
No gold.
"""

from __future__ import annotations

from bench.programs import common

SIZES = {"cpu": dict(n=4, max_tokens=48, threads=None), "full": dict(n=25, max_tokens=256, threads=8)}
METRIC = None
FILE = "llm_judge_articles.jsonl"
SYSTEM = ("You are a strict writing teacher. You read an article and judge one aspect of it at a time, briefly "
          "and concretely, quoting the text where it helps. End each judgement with the word END.\n\n")
DIMENSIONS = [
    ("content", "Are the claims accurate, relevant and substantial?"),
    ("organization", "Is the order of ideas logical, with clear transitions?"),
    ("argument", "Is the main argument supported by reasons and evidence?"),
    ("clarity", "Is the language precise and easy to follow?"),
    ("grammar", "Are grammar, spelling and punctuation correct?"),
    ("citation", "Are sources named where claims need them?"),
]


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    return [{"article": a} for a in common.take(common.read_jsonl(common.path(data_dir, FILE)), n, seed)]


def build(sgl, full: bool = False):
    max_tokens = SIZES["full" if full else "cpu"]["max_tokens"]

    @sgl.function
    def judge(s, article):
        s += SYSTEM + "ARTICLE:\n```\n" + article.strip() + "\n```\n"
        forks = s.fork(len(DIMENSIONS))
        for f, (dim, question) in zip(forks, DIMENSIONS):
            f += (f"USER: Judge the article on {dim} only. {question}\nJUDGE:"
                  + sgl.gen("judgement", max_tokens=max_tokens, stop="END"))
        forks.join()
        s += "".join(f"{dim}: {j.strip()}\n" for (dim, _), j in zip(DIMENSIONS, s["judgement"]))
        s += "USER: From these judgements, score the article from 1 to 10.\nSCORE:" + sgl.gen("score", max_tokens=2)

    return judge
