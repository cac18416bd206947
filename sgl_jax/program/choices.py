"""How `select` turns per-choice token logprobs into a decision: SGLang's three choice methods.

Every backend computes, for each choice, the logprobs of the choice's tokens given the prompt (a window that
starts two tokens before the prompt's end, so a choice that merges with the prompt's last token is scored on
the merged token -- "token healing"), then hands them to a method:

- `token_length_normalized` (the default): the highest mean logprob over the choice's scored tokens;
- `greedy_token_selection`: compare the choices token by token, keeping those with the best logprob at each
  position until one remains; a shorter choice is padded with its own mean logprob;
- `unconditional_likelihood_normalized`: the highest mean of (logprob given the prompt - logprob of the same
  tokens with no prompt), which discounts choices that are likely anywhere. The unconditional request asks
  for the server's default window, as upstream's client does: one entry (the choice's last token given its
  other tokens), which then applies to every token -- so the decisions agree with upstream's.

Ties go to the earliest choice. Input entries are `[logprob | None, token_id, token_text | None]`, as the native
API returns them. Host code: no jax import.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence


@dataclasses.dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict | None = None


def mean_logprob(entries: Sequence[Sequence[Any]]) -> float:
    """Mean of the entries' logprobs, skipping missing ones (None, and exactly 0.0, as upstream's client does)."""
    vals = [e[0] for e in entries if e[0]]
    if not vals:  # every entry unscored: nothing to prefer it by
        return float("-inf")
    return sum(vals) / len(vals)


def heal(prompt_text: str, entries: list) -> tuple[list, float]:
    """Drop the window's first entry unless it was merged with the choice (token healing); return the kept
    entries and their mean. The first entry is kept only when the prompt text does not end with its text."""
    norm = mean_logprob(entries)
    first_text = entries[0][2] if entries else None
    if entries and first_text is not None and prompt_text.endswith(first_text) and len(entries) > 1:
        first = entries[0][0] or 0.0
        n = len(entries)
        norm = (norm * n - first) / (n - 1)
        entries = entries[1:]
    return entries, norm


class ChoicesMethod:
    requires_unconditional_logprobs = False
    name = "method"

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


class TokenLengthNormalized(ChoicesMethod):
    name = "token_length_normalized"

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        i = _argmax(normalized_prompt_logprobs)
        return ChoicesDecision(choices[i], {"normalized_prompt_logprobs": list(normalized_prompt_logprobs),
                                            "input_token_logprobs": input_token_logprobs,
                                            "output_token_logprobs": output_token_logprobs})


class GreedyTokenSelection(ChoicesMethod):
    """Position by position, keep the choices whose logprob there is the best; the first left alone wins.

    "The best" within TIE: the windows' first entries are the shared prompt's tokens, and the same token's
    logprob computed in different engine steps (a batch of prompts split by the step's logits rows, a chunked
    prompt) differs in the last bits (~1e-5). Upstream's client compares exactly, which holds only when every
    choice was computed in one step; here such near-equal values stay ties (tests/test_program_e2e.py)."""

    name = "greedy_token_selection"
    TIE = 1e-4

    @staticmethod
    def matrix(input_token_logprobs) -> list[list[float]]:
        width = max(len(x) for x in input_token_logprobs)
        rows = []
        for entries in input_token_logprobs:
            vals = [e[0] if e[0] is not None else 0.0 for e in entries]
            pad = sum(vals) / len(vals) if vals else 0.0
            rows.append(vals + [pad] * (width - len(vals)))
        return rows

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        rows = self.matrix(input_token_logprobs)
        alive = list(range(len(choices)))
        for j in range(len(rows[0]) if rows else 0):
            best = max(rows[i][j] for i in alive)
            alive = [i for i in alive if rows[i][j] >= best - self.TIE]
            if len(alive) == 1:
                break
        return ChoicesDecision(choices[alive[0]], {"normalized_prompt_logprobs": list(normalized_prompt_logprobs),
                                                   "input_token_logprobs": input_token_logprobs,
                                                   "output_token_logprobs": output_token_logprobs,
                                                   "greedy_logprob_matrix": rows})


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    name = "unconditional_likelihood_normalized"
    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs the choices' unconditional logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            c = [e[0] if e[0] is not None else 0.0 for e in cond]
            u = [e[0] for e in uncond]
            if not c or not u:
                scores.append(float("-inf"))
                continue
            u[0] = u[0] or 0.0  # the first token has nothing before it: no unconditional logprob
            u = [x if x is not None else 0.0 for x in u]
            if len(u) == 1:  # one unconditional entry (a server's default window) applies to every token
                u = u * len(c)
            elif len(c) == 1:
                c = c * len(u)
            if len(u) != len(c):
                raise ValueError(f"unconditional logprobs for {len(u)} tokens, conditional for {len(c)}")
            scores.append(sum(a - b for a, b in zip(c, u)) / len(c))
        i = _argmax(scores)
        return ChoicesDecision(choices[i], {"normalized_prompt_logprobs": list(normalized_prompt_logprobs),
                                            "input_token_logprobs": input_token_logprobs,
                                            "output_token_logprobs": output_token_logprobs,
                                            "unconditional_token_logprobs": unconditional_token_logprobs,
                                            "normalized_unconditional_prompt_logprobs": scores})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()


def decide(method: ChoicesMethod, prompt_text: str, choices: Sequence[str], windows: list[list],
           outputs: list[list], unconditional=None) -> ChoicesDecision:
    """Heal each choice's logprob window (which starts at the prompt length - 2), then apply `method`.

    `unconditional(token_id_lists)` returns, for each list of the healed choices' token ids scored with no
    prompt, its input logprob entries; it is called only for methods that need them.
    """
    healed, norms = [], []
    for w in windows:
        entries, norm = heal(prompt_text, list(w))
        healed.append(entries)
        norms.append(norm)
    uncond = None
    if method.requires_unconditional_logprobs:
        if unconditional is None:
            raise ValueError(f"{method.name} needs unconditional logprobs, which this backend cannot compute")
        uncond = unconditional([[e[1] for e in entries] for entries in healed])
    return method(choices=list(choices), normalized_prompt_logprobs=norms, input_token_logprobs=healed,
                  output_token_logprobs=outputs, unconditional_token_logprobs=uncond)
