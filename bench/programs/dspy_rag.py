"""DSPy-style RAG on HotpotQA: retrieve 3 passages with BM25, then one chain-of-thought answer.

What DSPy's intro program (Retrieve(k=3) -> ChainOfThought("context, question -> answer"), compiled with
few-shot demos) sends to the model, written as an SGLang program: a task description and the field format, a
few demos, then the question's context ("[1] «title | passage»" x 3), the question, "Reasoning: Let's think
step by step in order to" + gen (one line), then "Answer:" + gen (one line). Every program shares the header
and demos; the second gen reuses the first call's prompt and output.

Retrieval: BM25 (bm25.py) over the Wikipedia passages that appear as Search observations in the ReAct traces
(one passage per searched title; in place of the paper's ColBERTv2 server over wiki17 abstracts), done in
`load`, so the program sees its context as an argument. Questions: the HotpotQA questions whose ReAct trace
reached the right answer (reward 1), so the trace's Finish answer is the gold; the first of them are the demos
(question, its retrieved context cut short, the trace's last thought as the reasoning, the answer) and never
evaluated.

Sizes: cpu = 8 questions, 2 demos, passages cut to 400 characters, 48 reasoning tokens; full (--full) = the
remaining 25 questions (the paper: 150 dev questions), 3 demos, passages uncut, 128 tokens.
Gold: the trace's answer; score: normalised exact match.
"""

from __future__ import annotations

from bench.programs import common, react
from bench.programs.bm25 import BM25

SIZES = {"cpu": dict(n=8, demos=2, passage_chars=400, max_tokens=48),
         "full": dict(n=None, demos=3, passage_chars=None, max_tokens=128)}
METRIC = "accuracy"
HEADER = ("Answer questions with short factoid answers.\n\n---\n\nFollow the following format.\n\n"
          "Context: may contain relevant facts\n\nQuestion: ${question}\n\n"
          "Reasoning: Let's think step by step in order to ${produce the answer}. We ...\n\n"
          "Answer: often between 1 and 5 words\n\n---\n\n")


def corpus(traces: list[dict]) -> list[str]:
    """One "title | passage" per searched title that returned a page, in order of first appearance."""
    docs, seen = [], set()
    for t in traces:
        for st in t["steps"]:
            act, obs = st["action"].strip(), st["observation"].strip()
            if not (act.startswith("Search[") and act.endswith("]")) or obs.startswith("Could not find"):
                continue
            title = act[len("Search["):-1].strip()
            if title.lower() not in seen:
                seen.add(title.lower())
                docs.append(f"{title} | {obs}")
    return docs


def _context(passages: list[str], limit: int | None) -> str:
    cut = [p if limit is None or len(p) <= limit else p[:limit].rstrip() + " ..." for p in passages]
    return "".join(f"[{i}] «{p}»\n" for i, p in enumerate(cut, 1))


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    sz = SIZES["full" if full else "cpu"]
    traces = react.traces(data_dir)
    docs = corpus(traces)
    bm25 = BM25(docs)

    def context(question: str, limit) -> str:
        return _context([docs[i] for i, _ in bm25.search(question, 3)], limit)

    good = [t for t in traces if t["correct"] and t["answer"]]
    demos, rest = good[:sz["demos"]], good[sz["demos"]:]
    prefix = HEADER + "".join(
        f"Context:\n{context(d['question'], 200)}\nQuestion: {_question(d)}\n\nReasoning: Let's think step by "
        f"step in order to {d['steps'][-1]['thought'].strip()}\n\nAnswer: {d['answer']}\n\n---\n\n" for d in demos)
    return [{"prefix": prefix, "context": context(t["question"], sz["passage_chars"]), "question": _question(t),
             "_gold": t["answer"]} for t in common.take(rest, n, seed)]


def _question(t: dict) -> str:
    q = t["question"]
    return q[len("Question:"):].strip() if q.startswith("Question:") else q


def build(sgl, full: bool = False):
    max_tokens = SIZES["full" if full else "cpu"]["max_tokens"]

    @sgl.function
    def rag(s, prefix, context, question):
        s += prefix + "Context:\n" + context + "\nQuestion: " + question + "\n\n"
        s += "Reasoning: Let's think step by step in order to" + sgl.gen("reasoning", max_tokens=max_tokens,
                                                                          stop="\n")
        s += "\n\nAnswer:" + sgl.gen("answer", max_tokens=16, stop="\n")

    return rag


def gold(args: dict) -> str:
    return args["_gold"]


def score(state, args: dict) -> float:
    return float(common.normalize_answer(state["answer"]) == common.normalize_answer(gold(args)))
