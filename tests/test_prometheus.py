"""The derived acceptance gauges, from counters shaped like vLLM's spec-decode counters."""
from prometheus_client import REGISTRY, Counter

from vllm_ht.vllm.prometheus import HTAcceptanceCollector


def test_mean_accepted_length_and_per_depth():
    labels = ["model_name", "engine"]
    drafts = Counter("vllm:spec_decode_num_drafts", "d", labels)
    accepted = Counter("vllm:spec_decode_num_accepted_tokens", "a", labels)
    per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "p", labels + ["position"])
    try:
        drafts.labels("m", "0").inc(10)
        accepted.labels("m", "0").inc(12)           # e.g. paths of depth 2,2,2,2,1,1,1,1,0,0
        per_pos.labels("m", "0", "0").inc(8)
        per_pos.labels("m", "0", "1").inc(4)
        families = {f.name: f for f in HTAcceptanceCollector().collect()}
        (tau,) = families["vllm:ht_mean_accepted_length"].samples
        assert tau.value == 2.2 and tau.labels == {"engine": "0", "model_name": "m"}
        depth = {s.labels["depth"]: s.value for s in families["vllm:ht_acceptance_per_depth"].samples}
        assert depth == {"1": 0.8, "2": 0.4}
    finally:
        for c in (drafts, accepted, per_pos):
            REGISTRY.unregister(c)


def test_no_spec_decode_no_gauges():
    assert HTAcceptanceCollector().collect() == []


def test_registering_does_not_deadlock():
    """REGISTRY.register() asks for names under its lock; describe() answers without collecting."""
    import threading

    from vllm_ht.vllm.prometheus import HTAcceptanceCollector as C

    collector = C()
    t = threading.Thread(target=REGISTRY.register, args=(collector,), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    REGISTRY.unregister(collector)
