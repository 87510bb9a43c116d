"""What every stage of the device check shares: its context (device, time budget, partial saves) and timers.

Timers, in milliseconds, median over the timed calls, warm-up calls excluded:
- CUDA: CUDA events around each call (device time); `flush` (a large buffer) is zeroed before
  each call when given, so every call reads its data from HBM, not from the 50 MB L2.
- CPU (the dry run): `time.perf_counter` around each call.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class StageContext:
    device: torch.device
    dry_run: bool
    deadline: float                 # time.monotonic() after which a stage starts no new work
    record: dict                    # this stage's entry of the JSON, filled as the stage goes
    results: dict                   # the whole JSON (a later stage may read an earlier one's numbers)
    save: Callable[[], None]        # rewrite the JSON file with what is known so far

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def skip(self, what: str) -> None:
        """Record work left out for lack of time (the stage is then marked truncated)."""
        self.record["truncated"] = True
        self.record.setdefault("skipped", []).append(what)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2,
            flush: torch.Tensor | None = None) -> float:
    """Median milliseconds of one `fn()` call (see the module docstring for what is timed)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    events = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_gbps(device: torch.device) -> dict:
    """A device-to-device copy of 1 GiB (64 MiB on CPU): bytes read + bytes written per second."""
    nbytes = 2**30 if device.type == "cuda" else 64 * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters=10 if device.type == "cuda" else 3)
    return {"copy_bytes": nbytes, "copy_ms": round(ms, 4), "copy_gbps": round(2 * nbytes / (ms * 1e-3) / 1e9, 1)}


def l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    """256 MiB to overwrite between timed calls on CUDA (None on CPU, where there is nothing to flush)."""
    if device.type != "cuda":
        return None
    return torch.empty(64 * 2**20, dtype=torch.int32, device=device)


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after two warm-up calls on a side stream (they compile Triton
    kernels and settle the allocator, neither of which may happen during capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
