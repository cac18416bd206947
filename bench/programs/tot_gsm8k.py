"""Tree of thought on GSM8K: four levels of fork(2) in chat turns, then a majority vote over 16 answers.

The user turn asks for a plan; the state forks 2 ways and each branch writes a plan (assistant turn). Each
branch then gets a user turn asking to carry the plan out, forks 2 ways, and so on: plan -> execute -> reflect
-> final answer, 2 + 4 + 8 + 16 = 30 calls per question. A level is expanded breadth first: every node's user
turn and fork are submitted before any child waits, so the calls of one level reach the backend together and
share the prefix of their parent (which fork holds in the cache). The 16 final answers vote; the winner is
the program's `answer`. Temperature 0.001 as in the paper (greedy in effect: the branches mostly agree).

Sizes: cpu = 2 questions, 32 tokens per call (the answer: 16); full (--full) = 32 questions (the paper's), 256.
Gold: the number after "####"; score: the majority answer equals it.
"""

from __future__ import annotations

import collections

from bench.programs import common

SIZES = {"cpu": dict(n=2, max_tokens=32, answer_tokens=16), "full": dict(n=32, max_tokens=256, answer_tokens=256)}
METRIC = "accuracy"
FILE = "gsm8k_test.jsonl"
TEMPERATURE = 0.001
PLAN = "\nBefore solving it, write a short plan: the quantities involved and the steps to combine them."
EXECUTE = "Now carry out your plan step by step and compute the result."
REFLECT = "Check your work: is every step right? Say which step is doubtful, if any, and rate your confidence 1-5."
ANSWER = "Give the final answer as a single number, with no units."


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    rows = common.take(common.read_jsonl(common.path(data_dir, FILE)), n, seed)
    return [{"question": r["question"], "_gold": r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")}
            for r in rows]


def majority(answers: list) -> str | None:
    nums = [common.last_number(a) for a in answers]
    nums = [x for x in nums if x is not None]
    return collections.Counter(nums).most_common(1)[0][0] if nums else None


def build(sgl, full: bool = False):
    sz = SIZES["full" if full else "cpu"]

    def expand(states, prompt, var, max_tokens):
        """Each state: a user turn, fork(2), an assistant gen per branch. Returns (groups, children)."""
        groups, children = [], []
        for st in states:
            st += sgl.user(prompt)
            g = st.fork(2)
            for b in g:
                b += sgl.assistant(sgl.gen(var, max_tokens=max_tokens, temperature=TEMPERATURE))
            groups.append(g)
            children.extend(g)
        return groups, children

    @sgl.function
    def tree_of_thought(s, question):
        levels, states = [], [s]
        for prompt, var, m in (("Question: " + question + PLAN, "plan", sz["max_tokens"]),
                               (EXECUTE, "execution", sz["max_tokens"]),
                               (REFLECT, "reflection", sz["max_tokens"]),
                               (ANSWER, "final", sz["answer_tokens"])):
            groups, states = expand(states, prompt, var, m)
            levels.append(groups)
        answers = [leaf["final"] for leaf in states]
        for groups in reversed(levels):
            for g in groups:
                g.join()
        s["answers"] = answers
        s["answer"] = majority(answers)

    return tree_of_thought


def gold(args: dict) -> str:
    return args["_gold"]


def score(state, args: dict) -> float:
    return float(state["answer"] is not None and state["answer"] == gold(args))
