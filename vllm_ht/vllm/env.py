"""Environment defaults for vLLM's CPU build, applied before vLLM is imported.

- VLLM_CPU_NUM_OF_RESERVED_CPU=0: otherwise vLLM keeps one core for the front end (1 of 2 here).
- VLLM_HOST_IP=127.0.0.1: keep vLLM's internal message queues on loopback.
- VLLM_CPU_KVCACHE_SPACE=2 (GiB): a fixed KV space. Without it vLLM reserves a fraction of the
  NUMA node's memory and refuses to start when other processes hold some of it.
- VLLM_CPU_OMP_THREADS_BIND, with several workers (tensor/pipeline parallel) on fewer allowed NUMA
  nodes than workers: vLLM's automatic binding wants one NUMA node per worker and refuses to
  start; we split this process's physical cores evenly instead ("0|1" for 2 workers on 2 cores).
  `vllm-ht serve` and the offline tools set it; `vllm serve --speculative-model hidden_transfer`
  sets it while expanding the HT flags (before the engine starts). Data parallelism is not
  covered (vLLM wants DP x TP lists): set the variable yourself there.
Values already set by the user win.
"""
from __future__ import annotations

import os
from pathlib import Path

CPU_DEFAULTS = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "2"}
_WORLD_FLAGS = {"--tensor-parallel-size": 1, "--tensor_parallel_size": 1, "-tp": 1,
                "--pipeline-parallel-size": 2, "--pipeline_parallel_size": 2, "-pp": 2}


def apply_cpu_defaults(world_size: int = 1) -> None:
    for key, value in CPU_DEFAULTS.items():
        os.environ.setdefault(key, value)
    apply_thread_binding(world_size)


def apply_thread_binding(world_size: int) -> None:
    """Several workers on fewer allowed NUMA nodes: give each an equal share of the physical cores."""
    if world_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and _numa_nodes() < world_size:
        binding = split_cores(_physical_cores(), world_size)
        if binding:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding


def split_cores(cores: list[int], world_size: int) -> str | None:
    """vLLM's binding string giving each worker an equal, contiguous share of `cores`.

    [0, 1], 2 -> "0|1"; [0, 1, 2, 3, 4], 2 -> "0,1|2,3"; [0], 2 -> None (fewer cores than workers)
    """
    per = len(cores) // world_size
    if per == 0:
        return None
    return "|".join(",".join(str(c) for c in cores[r * per : (r + 1) * per]) for r in range(world_size))


def world_size_from_argv(argv: list[str]) -> int:
    """Workers per node asked for on a vLLM command line (tensor x pipeline parallel)."""
    sizes = [1, 1, 1]
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in _WORLD_FLAGS:
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if value.isdigit():
                sizes[_WORLD_FLAGS[name]] = int(value)
    return sizes[1] * sizes[2]


def _numa_nodes() -> int:
    """NUMA nodes this process may allocate on (what vLLM's automatic binding counts)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Mems_allowed_list:"):
                return max(len(_parse_id_list(line.split(":", 1)[1].strip())), 1)
    except OSError:
        pass
    return max(len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))), 1)


def _physical_cores() -> list[int]:
    """Allowed logical CPUs, one per physical core (hyper-thread siblings share a core id)."""
    seen, cores = set(), []
    for cpu in sorted(os.sched_getaffinity(0)):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except OSError:
            key = ("?", str(cpu))
        if key not in seen:
            seen.add(key)
            cores.append(cpu)
    return cores


def _parse_id_list(text: str) -> list[int]:
    """"0-2,5" -> [0, 1, 2, 5]"""
    ids = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        ids += range(int(lo), int(hi or lo) + 1)
    return ids
