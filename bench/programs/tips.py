"""Tip suggestion (skeleton of thought): five short tips written in turn, each expanded into a paragraph
in a branch of its own while the next tip is being written.

The state writes "USER: ... tips for <topic> ... ASSISTANT: ..." and then the skeleton, one numbered tip per
gen (stop at "." or a newline). As soon as tip i exists the state forks once and the branch asks for tip i's
paragraph (stop at a blank line), so the expansions run in parallel with the rest of the skeleton and with
each other, each sharing the prompt written so far. When the five branches are done the paragraphs are
appended to the state. 10 calls per topic.

Sizes: cpu = 8 topics, tips 24 tokens, paragraphs 48; full (--full) = all 50 topics (the paper asked for 64;
the file has 50), tips 24, paragraphs 128.
No gold.
"""

from __future__ import annotations

from bench.programs import common

SIZES = {"cpu": dict(n=8, tip_tokens=24, paragraph_tokens=48), "full": dict(n=50, tip_tokens=24, paragraph_tokens=128)}
METRIC = None
FILE = "tip_suggestion_topic.jsonl"
NUM_TIPS = 5


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    return [{"topic": r["topic"]} for r in common.take(common.read_jsonl(common.path(data_dir, FILE)), n, seed)]


def build(sgl, full: bool = False):
    sz = SIZES["full" if full else "cpu"]

    @sgl.function
    def tips(s, topic):
        s += (f"USER: Give some tips for {topic}.\nASSISTANT: Okay. Here are {NUM_TIPS} short tips, each under "
              f"eight words, each followed by a paragraph that explains it.\n")
        branches = []
        for i in range(1, NUM_TIPS + 1):
            s += f"{i}." + sgl.gen(f"tip_{i}", max_tokens=sz["tip_tokens"], stop=[".", "\n"]) + "\n"
            b = s.fork(1)
            b += (f"Expand tip {i} into a detailed paragraph.\nParagraph {i}:"
                  + sgl.gen(f"paragraph_{i}", max_tokens=sz["paragraph_tokens"], stop="\n\n"))
            branches.append(b)
        for b in branches:
            b.join()
        s += "".join(f"\nParagraph {i}:{common.var(s, f'paragraph_{i}')}" for i in range(1, NUM_TIPS + 1))

    return tips
