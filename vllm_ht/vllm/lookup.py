"""Prompt lookup for hybrid trees: vLLM's own n-gram matcher over a request's prompt + output.

Reused from vLLM (vllm/v1/spec_decode/ngram_proposer.py, `_find_longest_matched_ngram_and_propose_tokens`,
numba-compiled): the longest suffix of the request's tokens (min_n..max_n long) that occurred
before, and the tokens that followed it there. vLLM's NgramProposer wraps it for a batch with its
own buffers sized to num_speculative_tokens; HT needs it per request with a per-step length.
"""
from __future__ import annotations

import numpy as np
from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens


class PromptLookup:
    def __init__(self, min_n: int, max_n: int, max_model_len: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"lookup n-gram sizes {min_n}..{max_n}: need 1 <= lookup_min <= lookup_max")
        self.min_n, self.max_n, self.max_model_len = min_n, max_n, max_model_len
        self.propose(np.zeros(8, dtype=np.int32), 1)          # numba compiles on the first call

    def propose(self, tokens: np.ndarray, k: int) -> list[int]:
        """Up to k tokens continuing the longest earlier match of the suffix of `tokens` ([] if none)."""
        if k <= 0:
            return []
        out = _find_longest_matched_ngram_and_propose_tokens(tokens, self.min_n, self.max_n, self.max_model_len, k)
        return out.tolist()
