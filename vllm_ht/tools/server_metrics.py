"""What a running vLLM server says about itself on `/metrics` (Prometheus text), read into one
dataclass, for the reliability tests and `scripts/soak.py`.

Words: a *gauge* is a value now (requests running, KV usage); a *counter* only grows, so what
happened during a test is the difference of two snapshots (`after.since(before)`).

The names are vLLM 0.32's (`vllm/v1/metrics/loggers.py`, `vllm/v1/spec_decode/metrics.py`). vLLM
counts a request as *finished* (`vllm:request_success_total`, by `finished_reason`) when the engine
ends it; a request the client abandons is aborted without being counted there (the output processor
drops it), so there is no abort counter. Every request that reached the engine and produced a token
is counted once in `vllm:time_to_first_token_seconds_count`: those are the *started* requests, and
`started - finished` are the ones aborted after their first token.
"""
from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field, fields

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"                      # a fraction, 0-1, despite the name
FINISHED = "vllm:request_success_total"                   # label finished_reason: stop, length, abort, error, repetition
STARTED = "vllm:time_to_first_token_seconds_count"
DRAFTS = "vllm:spec_decode_num_drafts_total"               # verification steps with drafts
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens_total"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
PREEMPTIONS = "vllm:num_preemptions_total"


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {sample name: [(labels, value), ...]}.

    'vllm:num_requests_running{engine="0",model_name="m"} 2.0' -> {"vllm:num_requests_running": [({"engine": "0", "model_name": "m"}, 2.0)]}
    """
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


@dataclass(frozen=True)
class ServerCounts:
    """One snapshot, summed over engines. Gauges: running, waiting, kv_cache_usage. The rest are
    counters: compare two snapshots with `since`."""
    running: float
    waiting: float
    kv_cache_usage: float
    started: float
    finished: dict[str, float] = field(default_factory=dict)   # by finished_reason
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted_tokens: float = 0.0
    preemptions: float = 0.0

    GAUGES = ("running", "waiting", "kv_cache_usage")

    @classmethod
    def from_text(cls, text: str) -> ServerCounts:
        samples = parse(text)

        def total(name: str) -> float:
            return sum(v for _, v in samples.get(name, []))

        finished: dict[str, float] = {}
        for labels, v in samples.get(FINISHED, []):
            reason = labels.get("finished_reason", "?")
            finished[reason] = finished.get(reason, 0.0) + v
        return cls(running=total(RUNNING), waiting=total(WAITING), kv_cache_usage=total(KV_USAGE),
                   started=total(STARTED), finished=finished, drafts=total(DRAFTS),
                   draft_tokens=total(DRAFT_TOKENS), accepted_tokens=total(ACCEPTED),
                   preemptions=total(PREEMPTIONS))

    def since(self, before: ServerCounts) -> ServerCounts:
        """Counters as differences from `before`; gauges as they are now."""
        values = {}
        for f in fields(self):
            now = getattr(self, f.name)
            if f.name in self.GAUGES:
                values[f.name] = now
            elif f.name == "finished":
                values[f.name] = {k: v - before.finished.get(k, 0.0) for k, v in now.items()}
            else:
                values[f.name] = now - getattr(before, f.name)
        return ServerCounts(**values)

    def num_finished(self, *reasons: str) -> float:
        """Finished requests with these reasons (all reasons when none are given)."""
        return sum(v for k, v in self.finished.items() if not reasons or k in reasons)


def scrape(base: str, timeout: float = 30) -> ServerCounts:
    with urllib.request.urlopen(base + "/metrics", timeout=timeout) as r:
        return ServerCounts.from_text(r.read().decode())
