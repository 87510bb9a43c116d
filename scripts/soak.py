"""Soak the HT server: rounds of 64 concurrent streaming chats (mixed lengths and temperatures,
about a quarter cancelled mid-stream) against `vllm serve` with HT, then the same load against
plain vLLM; prints what was sent, completed, cancelled and failed, and the speed ratio.

    .venv/bin/python scripts/soak.py [--rounds 5] [--dtype bfloat16] [--requests 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def soak(model: str, args: list[str], rounds: int, count: int, log: Path, label: str) -> list:
    from tqdm import tqdm

    from vllm_ht.tools.loadtest import Server, mixed_workload, run_load

    prompts = [json.loads(line)["prompt"] for line in (REPO / "benchmarks" / "prompts.jsonl").read_text().splitlines()]
    summaries = []
    with Server(model, args, log, env={"VLLM_CPU_KVCACHE_SPACE": "2"}) as server:
        for r in tqdm(range(rounds), desc=label, unit="round"):
            _, summary = run_load(server.base, model, mixed_workload(prompts, count, seed=r))
            summaries.append(summary)
            tqdm.write(f"{label} round {r + 1}: {summary.line()}")
        if not server.healthy():
            sys.exit(f"soak: the {label} server is not healthy after the soak; log tail:\n{log.read_text()[-3000:]}")
    return summaries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the prepared default model")
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "smollm2-135m-instruct"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--log-dir", default=tempfile.gettempdir(), help="server logs go here (ht.log, plain.log)")
    a = p.parse_args()
    from vllm_ht.models import prepare_default_model
    from vllm_ht.vllm.env import apply_cpu_defaults

    apply_cpu_defaults()
    model = a.model or str(prepare_default_model())
    common = ["--dtype", a.dtype, "--max-model-len", "2048"]
    logs = Path(a.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    ht = soak(model, common + ["--speculative-model", "hidden_transfer", "--ht-checkpoint", a.checkpoint],
              a.rounds, a.requests, logs / "vllm-ht-soak-ht.log", "ht")
    plain = soak(model, common, a.rounds, a.requests, logs / "vllm-ht-soak-plain.log", "plain")

    def total(s, key):
        return sum(getattr(x, key) for x in s)
    for label, s in (("ht", ht), ("plain", plain)):
        rate = total(s, "completion_tokens") / total(s, "seconds")
        print(f"{label:>5}: sent {total(s, 'sent')}, completed {total(s, 'completed')}, cancelled "
              f"{total(s, 'cancelled')}, failed {total(s, 'failed')}, {total(s, 'seconds'):.0f} s, {rate:.1f} tokens/s")
    ratio = (total(ht, "completion_tokens") / total(ht, "seconds")) / (total(plain, "completion_tokens") / total(plain, "seconds"))
    print(f"HT vs plain under the same load: {ratio:.2f}x completion tokens/s")
    if total(ht, "failed") or total(plain, "failed"):
        sys.exit("soak: some requests failed")


if __name__ == "__main__":
    main()
