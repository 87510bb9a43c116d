"""Derived Prometheus gauges: mean accepted length and per-depth acceptance.

Computed at scrape time from vLLM's own spec-decode counters, so `/metrics` and the offline
`LLM.get_metrics()` (both read the same registry) show them:
  vllm:ht_mean_accepted_length            1 + accepted_tokens / drafts (bonus included)
  vllm:ht_acceptance_per_depth{depth=d}   accepted_per_pos[d-1] / drafts
A verification step whose accepted path reaches depth a counts positions 0..a-1 in vLLM's
per-position counter, so per position is per depth for trees as well as chains.
"""
from __future__ import annotations

import threading

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

_DRAFTS, _ACCEPTED, _PER_POS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total",
                                "vllm:spec_decode_num_accepted_tokens_per_pos_total")


class HTAcceptanceCollector:
    def __init__(self) -> None:
        self._busy = threading.local()  # REGISTRY.collect() calls us too: no recursion

    def describe(self):
        """Names only: REGISTRY.register() calls this under its lock (calling collect() there,
        which reads the registry, would deadlock)."""
        return [GaugeMetricFamily("vllm:ht_mean_accepted_length", ""),
                GaugeMetricFamily("vllm:ht_acceptance_per_depth", "")]

    def collect(self):
        if getattr(self._busy, "on", False):
            return []
        self._busy.on = True
        try:
            drafts, accepted, per_pos = {}, {}, {}
            for family in REGISTRY.collect():
                for s in family.samples:
                    if s.name == _DRAFTS:
                        drafts[_key(s.labels)] = s.value
                    elif s.name == _ACCEPTED:
                        accepted[_key(s.labels)] = s.value
                    elif s.name == _PER_POS:
                        per_pos.setdefault(_key(s.labels), {})[int(s.labels["position"])] = s.value
        finally:
            self._busy.on = False
        if not drafts:
            return []
        names = [n for n, _ in next(iter(drafts))]
        tau = GaugeMetricFamily("vllm:ht_mean_accepted_length",
                                "Tokens emitted per verification step with drafts, bonus included", labels=names)
        depth = GaugeMetricFamily("vllm:ht_acceptance_per_depth",
                                  "Share of draft steps whose accepted path reaches this depth",
                                  labels=names + ["depth"])
        for key, n in drafts.items():
            if n <= 0:
                continue
            values = [v for _, v in key]
            tau.add_metric(values, 1.0 + accepted.get(key, 0.0) / n)
            for pos, count in sorted(per_pos.get(key, {}).items()):
                depth.add_metric(values + [str(pos + 1)], count / n)
        return [tau, depth]


def _key(labels: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "position"))


_REGISTERED = False


def register_collector() -> None:
    global _REGISTERED
    if not _REGISTERED:
        REGISTRY.register(HTAcceptanceCollector())
        _REGISTERED = True
