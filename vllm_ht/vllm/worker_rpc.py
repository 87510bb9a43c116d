"""What every HT worker adds to vLLM's, shared by the CPU and GPU workers: the start-up self-check
(after vLLM's warm-up, so the probe runs the model as served), and the RPCs (`collective_rpc(name)`).

Each RPC reads its HT model runner's counters (HTRunnerMixin) and returns a plain dict, so the
result pickles across vLLM's worker processes.
"""
from __future__ import annotations


class HTWorkerRPCs:
    """Mixed into a vLLM worker whose `model_runner` mixes in HTRunnerMixin (runner.py)."""

    def compile_or_warm_up_model(self, *args, **kwargs):
        out = super().compile_or_warm_up_model(*args, **kwargs)
        self.ht_self_check_once()
        return out

    def ht_self_check_once(self) -> None:
        """The start-up self-check (vllm_ht/vllm/self_check.py), once: its probe writes KV blocks that
        only a cache no request holds yet may lend it (a later warm-up, e.g. elastic scaling, skips it)."""
        if not self.model_runner.ht_self_check:
            self.model_runner.ht_run_self_check()

    def ht_self_check(self) -> dict:
        """The start-up self-check's report (collective_rpc("ht_self_check")): passed, checks, seconds."""
        return dict(self.model_runner.ht_self_check)

    def ht_step_counts(self) -> dict:
        """HT steps by kind so far (collective_rpc("ht_step_counts")): plain, tree, pseudo, tree+pseudo, padded."""
        return dict(self.model_runner.ht_step_counts)

    def ht_kv_layout(self) -> dict:
        """The KV cache layout the engine really uses (collective_rpc("ht_kv_layout")): {"layout", "isa"}."""
        return dict(self.model_runner.ht_kv_layout)

    def ht_source_counts(self) -> dict:
        """Draft nodes by source so far (collective_rpc("ht_source_counts")): pseudo/lookup _drafted/_accepted."""
        return dict(self.model_runner.ht_source_counts)
