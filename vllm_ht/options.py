"""HT settings carried through vLLM: `additional_config["vllm_ht"]` (VllmConfig's slot for
out-of-tree options; SpeculativeConfig forbids unknown keys)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .policy import StepCost

KEY = "vllm_ht"
# Most tree rows (root + drafts) per step across the batch: a hard cap on top of the cost-based
# policy (vllm_ht/policy.py), which usually picks far fewer.
DEFAULT_ROW_BUDGET = 32
MAX_NODES = 64
MAX_LOOKUP_NODES = 8
CPU_CACHE_LAYOUTS = ("auto", "rows")
SELF_CHECK_MODES = ("on", "strict", "off")
SELF_CHECK_FAULTS = ("mask", "compact")


@dataclass
class HTOptions:
    checkpoint: str | None = None     # None -> identity projections (lossless, few accepted drafts)
    num_nodes: int | None = None      # fixed node budget; None -> chosen per step from the batch size
    row_budget: int = DEFAULT_ROW_BUDGET
    # Tree nodes that carry pseudo rows (the ones likeliest to end the accepted path); None ->
    # chosen with the tree by the policy. When the accepted node carries none, that request's
    # next step has no drafts.
    pseudo_nodes: int | None = None
    # What extra rows cost on this hardware, in units of a 1-request decode step (policy.StepCost).
    # None: from the calibration file (`vllm-ht calibrate`), else StepCost's cautious defaults.
    row_cost: float | None = None
    pseudo_row_cost: float | None = None
    step_overhead: float | None = None
    context_cost: float | None = None
    batch_row_cost: float | None = None
    # The calibration file; None -> the default path for this model and dtype (calibration.py)
    calibration: str | None = None
    # CPU KV cache layout: "auto" keeps vLLM CPU_ATTN's own packing where its ISA writes one we
    # read (then causal steps run vLLM's kernel), else "rows"; "rows" forces the plain layout.
    cpu_cache_layout: str = "auto"
    # Draft sources (hybrid trees, vllm_ht/hybrid.py): pseudo rows, and a prompt-lookup chain (the
    # longest lookup_min..lookup_max-token match of the request's last tokens in its prompt + output,
    # by vLLM's n-gram matcher). lookup_nodes: fixed chain length; None -> the policy's, from the
    # measured lookup acceptance (at most MAX_LOOKUP_NODES).
    pseudo: bool = True
    lookup: bool = True
    lookup_min: int = 1
    lookup_max: int = 3
    lookup_nodes: int | None = None
    # Test-only negative control: verification with a deliberately biased rule (vllm_ht.verify), so
    # the sampling test can show it detects a verifier that is not lossless. Never for serving.
    test_biased_verifier: bool = False
    # Start-up self-check (vllm_ht/vllm/self_check.py): "on" -> HT drafts only if its own step passes
    # the tree oracle, the pseudo-row isolation and the KV compaction checks, else serves as plain vLLM
    # and logs which check failed; "strict" -> a failure stops the engine; "off" -> skipped.
    self_check: str = "on"
    # Test-only: a fault the self-check must catch ("mask": a tree row sees a non-ancestor node;
    # "compact": K/V moved one slot off). Never for serving.
    test_self_check_fault: str | None = None

    def __post_init__(self) -> None:
        if self.num_nodes is not None and not 0 <= self.num_nodes <= MAX_NODES:
            raise ValueError(f"--ht-num-nodes {self.num_nodes}: choose 0..{MAX_NODES}")
        if self.pseudo_nodes is not None and self.pseudo_nodes < 1:
            raise ValueError(f"pseudo_nodes={self.pseudo_nodes} must be >= 1 (or None for every node)")
        if self.row_budget < 1:
            raise ValueError(f"row_budget={self.row_budget} must be >= 1")
        self.cost_with({})                                           # validates the explicit costs
        if not 1 <= self.lookup_min <= self.lookup_max:
            raise ValueError(f"lookup_min={self.lookup_min}, lookup_max={self.lookup_max}: need 1 <= lookup_min <= lookup_max")
        if self.lookup_nodes is not None and not 0 <= self.lookup_nodes <= MAX_LOOKUP_NODES:
            raise ValueError(f"lookup_nodes={self.lookup_nodes}: choose 0..{MAX_LOOKUP_NODES} (or None for the policy's)")
        if self.self_check not in SELF_CHECK_MODES:
            raise ValueError(f"self_check={self.self_check!r}: choose one of {SELF_CHECK_MODES}")
        if self.test_self_check_fault not in (None, *SELF_CHECK_FAULTS):
            raise ValueError(f"test_self_check_fault={self.test_self_check_fault!r}: choose one of {SELF_CHECK_FAULTS}")
        if self.cpu_cache_layout not in CPU_CACHE_LAYOUTS:
            raise ValueError(f"cpu_cache_layout={self.cpu_cache_layout!r}: choose one of {CPU_CACHE_LAYOUTS}")

    def cost_with(self, calibrated: dict | None) -> StepCost:
        """StepCost from the explicit options, then the calibrated values, then the defaults."""
        explicit = {"row": self.row_cost, "pseudo_row": self.pseudo_row_cost, "fixed": self.step_overhead,
                    "context": self.context_cost, "batch_row": self.batch_row_cost}
        merged = {**(calibrated or {}), **{k: v for k, v in explicit.items() if v is not None}}
        return StepCost(**merged)

    @property
    def cost(self) -> StepCost:
        return self.cost_with({})

    @property
    def max_nodes(self) -> int:
        """What vLLM must allow as num_speculative_tokens."""
        if self.num_nodes is not None:
            return max(self.num_nodes + self.max_lookup_nodes, 1)
        return min(MAX_NODES, max(self.row_budget - 1, 1))

    @property
    def max_lookup_nodes(self) -> int:
        if not self.lookup:
            return 0
        return MAX_LOOKUP_NODES if self.lookup_nodes is None else self.lookup_nodes

    def max_nodes_for_batch(self, batch_size: int) -> int:
        """Largest node budget N with (N + 1) * batch_size <= row_budget (0: not even one draft)."""
        return max(0, min(self.max_nodes, self.row_budget // max(batch_size, 1) - 1))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "HTOptions":
        extra = getattr(vllm_config, "additional_config", None) or {}
        return cls(**extra.get(KEY, {}))
