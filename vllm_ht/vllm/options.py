"""HT settings carried through vLLM: `additional_config["vllm_ht"]` (VllmConfig's slot for
out-of-tree options; SpeculativeConfig forbids unknown keys)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

KEY = "vllm_ht"
# Rows (root + drafts) per step across the batch. The tree shrinks as the batch grows: a large
# batch has no spare compute. 32 keeps the CPU verification pass near 1.2-1.4x a decode step.
DEFAULT_ROW_BUDGET = 32
MAX_NODES = 64


@dataclass
class HTOptions:
    checkpoint: str | None = None     # None -> identity projections (lossless, few accepted drafts)
    num_nodes: int | None = None      # fixed node budget; None -> chosen per step from the batch size
    row_budget: int = DEFAULT_ROW_BUDGET
    # Tree nodes that carry k pseudo rows (the ones likeliest to end the accepted path); None ->
    # every node. When the accepted node carries none, that request's next step has no drafts.
    pseudo_nodes: int | None = None

    def __post_init__(self) -> None:
        if self.num_nodes is not None and not 0 <= self.num_nodes <= MAX_NODES:
            raise ValueError(f"--ht-num-nodes {self.num_nodes}: choose 0..{MAX_NODES}")
        if self.pseudo_nodes is not None and self.pseudo_nodes < 1:
            raise ValueError(f"pseudo_nodes={self.pseudo_nodes} must be >= 1 (or None for every node)")
        if self.row_budget < 1:
            raise ValueError(f"row_budget={self.row_budget} must be >= 1")

    @property
    def max_nodes(self) -> int:
        """What vLLM must allow as num_speculative_tokens."""
        if self.num_nodes is not None:
            return max(self.num_nodes, 1)
        return min(MAX_NODES, max(self.row_budget - 1, 1))

    def nodes_for_batch(self, batch_size: int) -> int:
        """Node budget for a step with `batch_size` requests: a power of two with
        (N + 1) * batch_size <= row_budget (0 once even a 1-node tree does not fit)."""
        if self.num_nodes is not None:
            return self.num_nodes
        n = 0
        for cand in (1, 2, 4, 8, 16, 32, 64):
            if (cand + 1) * max(batch_size, 1) <= self.row_budget and cand <= self.max_nodes:
                n = cand
        return n

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "HTOptions":
        extra = getattr(vllm_config, "additional_config", None) or {}
        return cls(**extra.get(KEY, {}))
