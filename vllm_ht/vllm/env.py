"""Environment defaults for vLLM's CPU build, applied before vLLM is imported.

- VLLM_CPU_NUM_OF_RESERVED_CPU=0: otherwise vLLM keeps one core for the front end (1 of 2 here).
- VLLM_HOST_IP=127.0.0.1: keep vLLM's internal message queues on loopback.
- VLLM_CPU_KVCACHE_SPACE=2 (GiB): a fixed KV space. Without it vLLM reserves a fraction of the
  NUMA node's memory and refuses to start when other processes hold some of it.
Values already set by the user win.
"""
from __future__ import annotations

import os

CPU_DEFAULTS = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "2"}


def apply_cpu_defaults() -> None:
    for key, value in CPU_DEFAULTS.items():
        os.environ.setdefault(key, value)
