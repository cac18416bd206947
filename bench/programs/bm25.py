"""Okapi BM25 over a small in-memory corpus (the DSPy RAG workload's retriever, in place of ColBERTv2).

score(q, d) = sum over query terms t of idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))   (Lucene's form: never negative).
Terms are lower-cased alphanumeric runs minus a few stop words; a repeated query term counts once per
occurrence. Ties rank the earlier document first. Host code: no jax.
"""

from __future__ import annotations

import collections
import math
import re

STOP = frozenset("a an and are as at be by for from in is it of on or that the this to was were what which who "
                 "with did does do".split())


def terms(text: str) -> list[str]:
    return [t for t in re.findall(r"[a-z0-9]+", text.lower()) if t not in STOP]


class BM25:
    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75):
        self.docs, self.k1, self.b = list(docs), k1, b
        self.tf = [collections.Counter(terms(d)) for d in self.docs]
        self.len = [sum(c.values()) for c in self.tf]
        self.avgdl = sum(self.len) / max(len(self.docs), 1)
        df = collections.Counter(t for c in self.tf for t in c)
        n = len(self.docs)
        self.idf = {t: math.log(1.0 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def score(self, query: str, i: int) -> float:
        tf, norm = self.tf[i], self.k1 * (1 - self.b + self.b * self.len[i] / max(self.avgdl, 1e-9))
        s = 0.0
        for t in terms(query):
            f = tf.get(t, 0)
            if f:
                s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
        return s

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        """The k best (document index, score), best first; documents sharing no term are never returned."""
        scored = [(i, self.score(query, i)) for i in range(len(self.docs))]
        scored = [x for x in scored if x[1] > 0]
        scored.sort(key=lambda x: (-x[1], x[0]))
        return scored[:k]
