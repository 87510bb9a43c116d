"""Derived Prometheus gauges: mean accepted length and per-depth acceptance.

Computed at scrape time from vLLM's own spec-decode counters, so `/metrics` and the offline
`LLM.get_metrics()` (both read the same registry) show them:
  vllm:ht_mean_accepted_length            1 + accepted_tokens / drafts (bonus included)
  vllm:ht_acceptance_per_depth{depth=d}   accepted_per_pos[d-1] / drafts
A verification step whose accepted path reaches depth a counts positions 0..a-1 in vLLM's
per-position counter, so per position is per depth for trees as well as chains.

Per draft source (hybrid trees, vllm_ht/hybrid.py), counted by the worker:
  vllm:ht_draft_nodes_total{source=pseudo|lookup}      draft nodes verified
  vllm:ht_accepted_nodes_total{source=pseudo|lookup}   of those, on the accepted path
The worker runs in the engine process, the registry in the API server's: the worker writes its
counts to a JSON file per process in SOURCES_ENV's folder (made by the plugin in the first process,
inherited by the processes it starts), read at scrape time.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

SOURCES_ENV = "VLLM_HT_METRICS_DIR"
SOURCES = ("pseudo", "lookup")

_DRAFTS, _ACCEPTED, _PER_POS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total",
                                "vllm:spec_decode_num_accepted_tokens_per_pos_total")


class HTAcceptanceCollector:
    def __init__(self) -> None:
        self._busy = threading.local()  # REGISTRY.collect() calls us too: no recursion

    def describe(self):
        """Names only: REGISTRY.register() calls this under its lock (calling collect() there,
        which reads the registry, would deadlock)."""
        return [GaugeMetricFamily("vllm:ht_mean_accepted_length", ""),
                GaugeMetricFamily("vllm:ht_acceptance_per_depth", ""),
                CounterMetricFamily("vllm:ht_draft_nodes", ""), CounterMetricFamily("vllm:ht_accepted_nodes", "")]

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
        out = _source_families()
        if not drafts:
            return out
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
        return [tau, depth] + out


def _key(labels: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "position"))


def publish_source_counts(counts: dict) -> None:
    """Worker side: this process's per-source counts, replaced atomically (no-op without the folder)."""
    folder = os.environ.get(SOURCES_ENV)
    if not folder:
        return
    path = Path(folder) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(dict(counts)))
        os.replace(tmp, path)
    except OSError:          # metrics must never stop a step
        pass


def read_source_counts() -> dict:
    """Summed over the engine processes: {"<source>_drafted": n, "<source>_accepted": n, ...}."""
    folder = os.environ.get(SOURCES_ENV)
    total: dict = {}
    for f in Path(folder).glob("*.json") if folder else ():
        try:
            counts = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return total


def _source_families() -> list:
    counts = read_source_counts()
    if not counts:
        return []
    drafted = CounterMetricFamily("vllm:ht_draft_nodes", "Draft nodes verified, by source (pseudo rows, "
                                  "prompt lookup)", labels=["source"])
    accepted = CounterMetricFamily("vllm:ht_accepted_nodes", "Draft nodes on the accepted path, by source",
                                   labels=["source"])
    for name in SOURCES:
        drafted.add_metric([name], counts.get(name + "_drafted", 0))
        accepted.add_metric([name], counts.get(name + "_accepted", 0))
    return [drafted, accepted]


def ensure_sources_dir() -> None:
    """The plugin, in the first vLLM process: a fresh folder for this server's per-source counts."""
    if not os.environ.get(SOURCES_ENV):
        os.environ[SOURCES_ENV] = tempfile.mkdtemp(prefix="vllm_ht_metrics_")


_REGISTERED = False


def register_collector() -> None:
    global _REGISTERED
    if not _REGISTERED:
        REGISTRY.register(HTAcceptanceCollector())
        _REGISTERED = True
