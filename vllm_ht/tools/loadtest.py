"""Load against a real OpenAI-compatible server: concurrent streaming chats, cancellations, and a
summary. Used by the reliability tests (`tests/reliability`) and `scripts/soak.py`.

Words: a *request* is one chat completion; it ends
  completed  the answer ended as a finished answer does: finish_reason `stop` or `length`, the
             server's completion_tokens within max_tokens, no error event, and for a stream [DONE];
  cancelled  the client closed the stream on purpose after some chunks;
  failed     anything else, with the reason: an HTTP error, a broken stream, a timeout, an error
             event (vLLM sends one, then [DONE], when generation fails mid-stream), another or no
             finish_reason, a missing usage report, more tokens than asked for.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import preload_env


@dataclass
class LoadRequest:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    stream: bool = True
    cancel_after: int | None = None     # close the stream after this many content chunks


@dataclass
class LoadResult:
    request: LoadRequest
    status: str                         # "completed" | "cancelled" | "failed"
    text: str = ""
    chunks: int = 0
    error: str | None = None            # why it failed (None unless status is "failed")
    seconds: float = 0.0
    finish_reason: str | None = None    # as the server reported it
    completion_tokens: int | None = None  # the server's usage report


COMPLETE_REASONS = ("stop", "length")


def failure_reason(req: LoadRequest, finish_reason: str | None, completion_tokens: int | None,
                   error_event: str | None = None) -> str | None:
    """Why an answer that reached its end does not count as completed; None when it does."""
    if error_event is not None:
        return f"error event: {error_event}"
    if finish_reason not in COMPLETE_REASONS:
        return f"finish_reason {finish_reason!r}, not stop or length"
    if completion_tokens is None:
        return "no usage report (completion_tokens)"
    if req.max_tokens is not None and completion_tokens > req.max_tokens:
        return f"{completion_tokens} completion tokens > max_tokens {req.max_tokens}"
    return None


@dataclass
class LoadSummary:
    sent: int
    completed: int
    cancelled: int
    failed: int
    seconds: float
    completion_tokens: int             # reported by the server for completed requests (usage)
    errors: list[str] = field(default_factory=list)   # one reason per failed request

    def line(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        return (f"sent {self.sent}, completed {self.completed}, cancelled {self.cancelled}, failed {self.failed}, "
                f"{self.seconds:.1f} s, {rate:.1f} completion tokens/s")


def mixed_workload(prompts: list[str], count: int = 64, cancel_share: float = 0.25, seed: int = 0) -> list[LoadRequest]:
    """`count` requests over the prompts: half greedy, half sampled (T 0.5-1.0, seeded), max_tokens
    8-64, and about `cancel_share` of them cancelled after 1-6 chunks."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        greedy = i % 2 == 0
        out.append(LoadRequest(prompt=prompts[i % len(prompts)], max_tokens=rng.choice([8, 16, 32, 48, 64]),
                               temperature=0.0 if greedy else rng.choice([0.5, 0.8, 1.0]),
                               seed=None if greedy else rng.randrange(1 << 30),
                               cancel_after=rng.randint(1, 6) if rng.random() < cancel_share else None))
    return out


async def _one(session, base: str, model: str, req: LoadRequest, timeout: float) -> LoadResult:
    import aiohttp

    body = {"model": model, "messages": [{"role": "user", "content": req.prompt}], "max_tokens": req.max_tokens,
            "temperature": req.temperature, "stream": req.stream}
    if req.seed is not None:
        body["seed"] = req.seed
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    try:
        async with session.post(f"{base}/v1/chat/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return LoadResult(req, "failed", error=f"HTTP {resp.status}: {(await resp.text())[:200]}",
                                  seconds=time.perf_counter() - t0)
            if not req.stream:
                data = await resp.json()
                choice = data["choices"][0]
                finish, tokens = choice.get("finish_reason"), (data.get("usage") or {}).get("completion_tokens")
                why = failure_reason(req, finish, tokens, _error_message(data))
                return LoadResult(req, "failed" if why else "completed", text=choice["message"]["content"] or "",
                                  error=why, seconds=time.perf_counter() - t0, finish_reason=finish,
                                  completion_tokens=tokens)
            text, chunks, done = [], 0, False
            finish, tokens, error_event = None, None, None
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                error_event = _error_message(event) or error_event
                if event.get("usage"):
                    tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        text.append(piece)
                        chunks += 1
                if req.cancel_after is not None and chunks >= req.cancel_after:
                    resp.close()      # the client goes away mid-stream
                    return LoadResult(req, "cancelled", text="".join(text), chunks=chunks,
                                      seconds=time.perf_counter() - t0)
            why = failure_reason(req, finish, tokens, error_event) if done else "stream ended without [DONE]"
            return LoadResult(req, "failed" if why else "completed", text="".join(text), chunks=chunks, error=why,
                              seconds=time.perf_counter() - t0, finish_reason=finish, completion_tokens=tokens)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, none is lost
        return LoadResult(req, "failed", error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)


def _error_message(event: dict) -> str | None:
    """vLLM's error body, in a stream or not: {"error": {"message": ..., "type": ..., "code": ...}}."""
    err = event.get("error")
    if err is None:
        return None
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)


async def _run(base: str, model: str, requests: list[LoadRequest], timeout: float):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(_one(session, base, model, r, timeout) for r in requests))


def run_load(base: str, model: str, requests: list[LoadRequest], timeout: float = 600) -> tuple[list[LoadResult], LoadSummary]:
    """Send every request at once; wait for all; summarise."""
    t0 = time.perf_counter()
    results = asyncio.run(_run(base, model, requests, timeout))
    seconds = time.perf_counter() - t0
    count = {s: sum(r.status == s for r in results) for s in ("completed", "cancelled", "failed")}
    tokens = sum(r.completion_tokens or 0 for r in results if r.status == "completed")
    return list(results), LoadSummary(sent=len(requests), seconds=seconds, completion_tokens=tokens,
                                      errors=[r.error for r in results if r.status == "failed"], **count)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve MODEL ARGS...` on 127.0.0.1 in its own process group; a context manager."""

    def __init__(self, model: str, args: list[str], log: Path, env: dict | None = None, startup_timeout: float = 400):
        self.model, self.args, self.log, self.startup_timeout = model, args, log, startup_timeout
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # vLLM's recommended CPU runtime (tcmalloc + Intel OpenMP preloaded), as `vllm-ht serve` runs it
        self.env = {**preload_env(os.environ), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_HOST_IP": "127.0.0.1",
                    **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        exe = Path(sys.executable).parent / "vllm"
        cmd = [str(exe), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
            if self.healthy():
                return self
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"server not healthy after {self.startup_timeout} s:\n{self.log.read_text()[-4000:]}")

    def healthy(self) -> bool:
        try:
            urllib.request.urlopen(self.base + "/health", timeout=2)
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
