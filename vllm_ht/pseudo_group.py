"""The pseudo rows' group rule, in one place (training's pseudo pass and vLLM's step use it; the
reference engine keeps its own copy as the independent oracle).

Pseudo row (a, s), the step-s pseudo state of anchor a, sees what its anchor sees (the real keys up
to the anchor) plus the pseudo rows (a, s') of its own group with s' <= s: the Hidden Transfer
inference mask. This module holds the second part.
"""
from __future__ import annotations

import torch


def group_visible(query_steps: torch.Tensor, key_steps: torch.Tensor) -> torch.Tensor:
    """[Q] steps of pseudo queries, [K] steps of pseudo keys of the same group -> [Q, K] bool:
    key step <= query step.   group_visible([0, 1], [0, 1]) -> [[T, F], [T, T]]"""
    return key_steps[None, :] <= query_steps[:, None]
