"""The derived acceptance gauges, from counters shaped like vLLM's spec-decode counters."""
import pytest

prometheus_client = pytest.importorskip("prometheus_client", reason="comes with vLLM (make install)")
from prometheus_client import REGISTRY, Counter  # noqa: E402

from vllm_ht.vllm.prometheus import HTAcceptanceCollector  # noqa: E402


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


def test_per_source_counts_travel_from_engine_processes(tmp_path, monkeypatch):
    """Workers (other processes) publish their per-source counts to the folder; the collector sums
    them at scrape time as counters with a source label."""
    import json

    from vllm_ht.vllm import prometheus

    monkeypatch.setenv(prometheus.SOURCES_ENV, str(tmp_path))
    prometheus.publish_source_counts({"pseudo_drafted": 10, "pseudo_accepted": 3, "lookup_drafted": 4,
                                      "lookup_accepted": 4})
    (tmp_path / "99999.json").write_text(json.dumps({"lookup_drafted": 6, "lookup_accepted": 1}))   # a 2nd worker
    (tmp_path / "broken.json").write_text("{")                   # half-written by someone else: skipped
    families = {f.name: f for f in HTAcceptanceCollector().collect()}
    drafted = {s.labels["source"]: s.value for s in families["vllm:ht_draft_nodes"].samples}
    accepted = {s.labels["source"]: s.value for s in families["vllm:ht_accepted_nodes"].samples}
    assert drafted == {"pseudo": 10, "lookup": 10} and accepted == {"pseudo": 3, "lookup": 5}
    prometheus.publish_source_counts({"pseudo_drafted": 11, "pseudo_accepted": 3})   # replaced, not appended
    assert prometheus.read_source_counts()["pseudo_drafted"] == 11
