"""vllm_ht/tools/server_metrics.py on a /metrics text shaped like vLLM 0.32's (two engines, HELP/TYPE lines,
counters by finished_reason): sums over engines, counter deltas, gauges as they are."""
import pytest

from vllm_ht.tools.server_metrics import ServerCounts, parse

BEFORE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 4.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 1.0
vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"} 2.0
vllm:request_success_total{engine="0",finished_reason="error",model_name="m"} 0.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.5
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 20.0
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 60.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 9.0
"""


def test_parse_keeps_labels_and_values():
    samples = parse(BEFORE)
    assert samples["vllm:num_requests_running"] == [({"engine": "0", "model_name": "m"}, 3.0),
                                                    ({"engine": "1", "model_name": "m"}, 1.0)]
    assert samples["vllm:time_to_first_token_seconds_count"][0][1] == 10.0


def test_a_snapshot_sums_engines_and_splits_finished_by_reason():
    c = ServerCounts.from_text(BEFORE)
    assert (c.running, c.waiting, c.kv_cache_usage, c.started) == (4.0, 2.0, 0.25, 10.0)
    assert c.finished == {"stop": 6.0, "length": 1.0, "error": 0.0}
    assert c.num_finished() == 7.0 and c.num_finished("length", "error") == 1.0
    assert (c.drafts, c.draft_tokens, c.accepted_tokens, c.preemptions) == (20.0, 60.0, 9.0, 0.0)


def test_since_subtracts_counters_and_keeps_gauges():
    after = (BEFORE.replace('"m"} 3.0', '"m"} 0.0').replace('running{engine="1",model_name="m"} 1.0',
                                                             'running{engine="1",model_name="m"} 0.0')
             .replace('finished_reason="stop",model_name="m"} 4.0', 'finished_reason="stop",model_name="m"} 9.0')
             .replace("drafts_total{engine=\"0\",model_name=\"m\"} 20.0", "drafts_total{engine=\"0\",model_name=\"m\"} 26.0"))
    d = ServerCounts.from_text(after).since(ServerCounts.from_text(BEFORE))
    assert d.running == 0.0 and d.kv_cache_usage == 0.25          # gauges: now
    assert d.finished == {"stop": 5.0, "length": 0.0, "error": 0.0}
    assert d.drafts == 6.0 and d.accepted_tokens == 0.0 and d.started == 0.0


def test_a_missing_metric_reads_as_zero_and_bad_text_is_an_error():
    assert ServerCounts.from_text("").num_finished() == 0.0
    with pytest.raises(ValueError):
        ServerCounts.from_text("vllm:num_requests_running{engine=0} notanumber\n")
