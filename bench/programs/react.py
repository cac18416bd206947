"""ReAct agents on HotpotQA, replayed from recorded traces (thought / action / observation).

Prompt: an instruction (our wording of the ReAct task: Search / Lookup / Finish actions), k worked traces as
examples, then the question. For step i: "Thought i:" is appended, the state is forked once and the model
generates the step in the branch (stop "Observation"); the main state gets the trace's own thought, action
and observation. Because the main state never waits for the model's step, the steps of one question run
concurrently and each extends the previous one's prompt (the cache reuses all of it). The examples are traces
from the same file that reached the right answer (reward 1), never evaluated.

Sizes: cpu = 3 questions, 1 example trace with observations cut to 300 characters, 48 tokens per step (fits
the 2048-token context of the CPU preset); full (--full) = the 100 questions minus the examples, 6 example
traces uncut, 200 tokens per step (needs a 8192-token context: the runner raises it with --full).
Gold: the answer of the trace's Finish[...] action; score: the model's Finish[...] at the last step matches
it after normalisation (the trace's own answer is right for 28 of the 100 questions, so this measures
agreement with the recorded agent).
"""

from __future__ import annotations

import re

from bench.programs import common

SIZES = {"cpu": dict(n=3, shots=1, obs_chars=300, max_tokens=48),
         "full": dict(n=None, shots=6, obs_chars=None, max_tokens=200)}
METRIC = "accuracy"
FILE = "react_hotpotqa_100.jsonl"
INSTRUCTION = (
    "Answer a question by interleaving Thought, Action and Observation steps. A Thought reasons about what is "
    "known so far. An Action is one of:\n"
    "(1) Search[entity]: looks the entity up on Wikipedia and returns the start of its page, or similar "
    "entities to try if it has no page.\n"
    "(2) Lookup[keyword]: returns the next sentence with the keyword on the current page.\n"
    "(3) Finish[answer]: gives the answer and ends the task.\n"
    "Worked examples follow.\n\n")


def traces(data_dir: str) -> list[dict]:
    """Every trace: question, steps, the Finish answer, and whether it was right (reward 1)."""
    out = []
    for rec in common.read_jsonl(common.path(data_dir, FILE)):
        (question, steps), = rec.items()
        m = re.match(r"Finish\[(.*)\]\s*$", steps[-1]["action"].strip(), re.S)
        out.append({"question": question.strip(), "steps": steps, "answer": m.group(1) if m else "",
                    "correct": "reward = 1" in steps[-1]["observation"]})
    return out


def _cut(text: str, limit: int | None) -> str:
    text = text.strip()
    return text if limit is None or len(text) <= limit else text[:limit].rstrip() + " ..."


def format_step(i: int, step: dict, obs_chars: int | None = None) -> str:
    return (f" {step['thought'].strip()}\nAction {i}: {step['action'].strip()}\n"
            f"Observation {i}: {_cut(step['observation'], obs_chars)}\n")


def _example(t: dict, obs_chars: int | None) -> str:
    return t["question"] + "\n" + "".join(f"Thought {i}:" + format_step(i, st, obs_chars)
                                          for i, st in enumerate(t["steps"], 1)) + "\n"


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    sz = SIZES["full" if full else "cpu"]
    ts = traces(data_dir)
    shots = sorted((t for t in ts if t["correct"]), key=lambda t: len(_example(t, sz["obs_chars"])))[:sz["shots"]]
    prefix = INSTRUCTION + "".join(_example(t, sz["obs_chars"]) for t in shots)
    rest = [t for t in ts if all(t is not s for s in shots)]
    return [{"prefix": prefix, "question": t["question"], "steps": t["steps"], "_gold": t["answer"],
             "_correct": t["correct"]} for t in common.take(rest, n, seed)]


def build(sgl, full: bool = False):
    max_tokens = SIZES["full" if full else "cpu"]["max_tokens"]

    @sgl.function
    def react(s, prefix, question, steps):
        s += prefix + question + "\n"
        branches = []
        for i, step in enumerate(steps, 1):
            s += f"Thought {i}:"
            f = s.fork(1)
            f += sgl.gen(f"step_{i}", max_tokens=max_tokens, stop=["Observation"])
            branches.append(f)
            s += format_step(i, step)
        for f in branches:
            f.join()

    return react


def gold(args: dict) -> str:
    return args["_gold"]


def predicted(state, args: dict) -> str:
    m = re.search(r"Finish\[(.*?)\]", common.var(state, f"step_{len(args['steps'])}") or "")
    return m.group(1) if m else ""


def score(state, args: dict) -> float:
    return float(common.normalize_answer(predicted(state, args)) == common.normalize_answer(gold(args)))
