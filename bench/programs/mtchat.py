"""Multi-turn chat, synthetic as in the paper: 4 turns of random alphanumeric text, short or long answers.

Each turn appends a user message of random letters and digits and generates an assistant answer with
ignore_eos, so every answer has exactly its drawn length. The conversation's earlier turns (prompts and the
model's own answers) are the prefix of the next turn. Two workloads: `chat_short` (answers of U[4, 8] tokens)
and `chat_long` (longer answers). Messages are drawn in tokens and written in characters at 1.25 characters
per token (what SmolLM2's tokenizer gives on random alphanumerics); seeded (`random.Random(seed)`).

Sizes: cpu = 8 conversations, messages U[64, 128] tokens, long answers U[32, 64]; full (--full) = 20
conversations, messages U[256, 512], long answers U[256, 512] (the paper's; needs the 8192-token context the
runner sets with --full). No gold.
"""

from __future__ import annotations

import random
import string

SIZES = {"cpu": dict(n=8, message=(64, 128), short=(4, 8), long=(32, 64)),
         "full": dict(n=20, message=(256, 512), short=(4, 8), long=(256, 512))}
METRIC = None
TURNS = 4
CHARS_PER_TOKEN = 1.25
ALPHABET = string.ascii_letters + string.digits


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False, long: bool = False) -> list[dict]:
    sz = SIZES["full" if full else "cpu"]
    rng = random.Random(seed)
    answer = sz["long"] if long else sz["short"]
    out = []
    for _ in range(sz["n"] if n is None else n):
        turns = ["".join(rng.choice(ALPHABET) for _ in range(round(rng.randint(*sz["message"]) * CHARS_PER_TOKEN)))
                 for _ in range(TURNS)]
        out.append({"turns": turns, "answer_tokens": [rng.randint(*answer) for _ in range(TURNS)]})
    return out


def build(sgl, full: bool = False):
    @sgl.function
    def chat(s, turns, answer_tokens):
        for i, (message, m) in enumerate(zip(turns, answer_tokens)):
            s += sgl.user(message)
            s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=m, ignore_eos=True))

    return chat
