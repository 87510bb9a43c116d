"""The self-check's report logic without an engine (the probe itself runs in tests/e2e)."""
from types import SimpleNamespace

import torch

from vllm_ht.vllm.self_check import Check, SelfCheckReport, run_self_check


def _runner(build):
    group = SimpleNamespace(layer_names=["l0"], kv_cache_spec=SimpleNamespace(block_size=16),
                            get_metadata_builder=lambda: SimpleNamespace(build=build))
    kv = torch.ones(8, 1, 16, 8)
    return SimpleNamespace(attn_groups=[[group]], kv_caches=[kv], device=torch.device("cpu"), max_num_tokens=512,
                           model_config=SimpleNamespace(dtype=torch.float32, get_vocab_size=lambda: 1000))


def test_an_error_inside_the_probe_is_a_failed_check_and_the_blocks_are_zeroed():
    def build(**_):
        raise RuntimeError("kernel did not compile")

    runner = _runner(build)
    report = run_self_check(runner)
    assert not report.passed and report.failed == ["error"] and "kernel did not compile" in report.summary()
    assert isinstance(report.exception, RuntimeError)
    kv = runner.kv_caches[0]
    assert kv[0].eq(1).all() and kv[1:2].eq(0).all()       # block 0 (vLLM's null block) untouched; the probe's zeroed


def test_a_check_that_failed_on_any_rank_fails_the_merged_report():
    ok = SelfCheckReport([Check("tree", True, 1e-6, 1e-3), Check("compact", True, 0.0, 0.0)], seconds=0.4)
    bad = SelfCheckReport([Check("tree", True, 2e-6, 1e-3), Check("compact", False, 12.0, 0.0, "moved wrong")],
                          seconds=0.5)
    merged = SelfCheckReport.merge([ok, bad])
    assert not merged.passed and merged.failed == ["compact"] and merged.seconds == 0.5
    assert [c.error for c in merged.checks] == [2e-6, 12.0]
    assert SelfCheckReport.merge([ok, ok]).passed
