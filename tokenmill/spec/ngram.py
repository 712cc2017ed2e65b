"""N-gram (prompt lookup) speculative proposer: find the latest earlier occurrence of the sequence's
last n tokens and propose the tokens that followed it. Pure Python, no model."""
from __future__ import annotations


class NgramProposer:
    def __init__(self, n_min: int = 1, n_max: int = 4, num_tokens: int = 4, window: int = 4096):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {n_min}, {n_max}")
        self.n_min, self.n_max, self.k, self.window = n_min, n_max, num_tokens, window

    def propose(self, token_ids: list[int]) -> list[int]:
        """Up to k draft tokens continuing token_ids, longest n-gram match first ([] if none)."""
        toks = token_ids[-self.window:]
        L = len(toks)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            tail = toks[L - n:]
            # search right to left for an earlier occurrence of the tail
            for start in range(L - n - 1, -1, -1):
                if toks[start:start + n] == tail:
                    follow = toks[start + n:start + n + self.k]
                    if follow:
                        return follow
        return []
