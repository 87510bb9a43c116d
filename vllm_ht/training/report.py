"""The checkpoint folder's README.md: how it was made and what it measures, from its own files.

    python -m vllm_ht.training.report CHECKPOINT_DIR [--command "the exact train command"]

Reads config.json (provenance: training settings, data size, time, last-steps statistics) and
metrics.json (held-out evaluation), so the numbers in the README are the recorded ones.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import HiddenTransferConfig


def _taus(table: dict, budgets) -> str:
    return " / ".join(f"{table.get(str(n), table.get(n, float('nan'))):.2f}" for n in budgets)


def _row(name: str, r: dict, budgets=(4, 8, 16, 32)) -> str:
    top1 = " / ".join(f"{a:.3f}" for a in r["top1"])
    top5 = " / ".join(f"{a:.3f}" for a in r["top5"])
    decoded = _taus(r["decoded_tau"], budgets) if "decoded_tau" in r else "not measured"
    return f"| {name} | {top1} | {top5} | {_taus(r['tau'], budgets)} | {decoded} |"


def render(folder: Path, command: str | None = None, extra: str = "") -> str:
    cfg = HiddenTransferConfig.load(folder)
    prov = cfg.provenance
    train = prov.get("train", {})
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else prov.get("eval", {})
    lines = [f"# Hidden Transfer checkpoint: {cfg.base_model}", "",
             f"k = {cfg.num_steps} draft steps, transfer layer(s) {cfg.transfer_layers} of {cfg.num_hidden_layers}, "
             f"plain linear maps{' with bias' if cfg.bias else ''} (identity-initialised), stored as {cfg.dtype}. "
             + (f"Fused input: the states of layers {cfg.fuse_layers} are mapped and added (zero-initialised); "
                f"training and offline evaluation only, vLLM serving refuses it. " if cfg.fuse_layers else "") +
             f"Tree templates calibrated for node budgets {sorted(cfg.tree_templates)}.", "",
             "## How it was made", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"- data: {prov.get('sequences', '?')} self-distilled sequences, {prov.get('tokens', '?')} tokens "
              f"(`vllm-ht make-data`, greedy bf16 answers of the model itself; prompts disjoint from MT-bench)",
              f"- training: {train.get('steps', '?')} steps x batch {train.get('batch_size', '?')} x "
              f"{train.get('anchors', '?')} anchors/sequence, AdamW lr {train.get('lr', '?')}, warmup "
              f"{train.get('warmup', '?')}, cosine; max length {train.get('max_len', '?')}",
              f"- time: {prov.get('seconds_this_run', '?')} s of training ({prov.get('wall_seconds', '?')} s with "
              f"calibration) on {prov.get('hardware', '?')}", ""]
    if metrics:
        lines += ["## Held-out draft accuracy (MT-bench first turns, the model's own greedy fp32 answers)", "",
                  "Top-1 / top-5 per depth, and tau (tokens per verification step, bonus included) of the "
                  "calibrated tree for node budgets 4 / 8 / 16 / 32 two ways: averaged over every response "
                  "position, and with greedy decoding replayed on the sequences (only the positions where a "
                  "step ends draft; this is what decoding sees).", "",
                  "| drafter | top-1 per depth | top-5 per depth | tau, all positions | tau, decoding replayed |",
                  "|---|---|---|---|---|"]
        lines += [_row({"ht": "Hidden Transfer", "medusa": "Medusa-1 baseline (same data, loss, steps)"}.get(n, n), r)
                  for n, r in metrics.items()]
        lines += ["", f"Held-out anchors: {next(iter(metrics.values())).get('anchors', '?')}.", ""]
    if (folder / "acceptance_per_depth.png").is_file():
        lines += ["![accuracy per depth](acceptance_per_depth.png)", ""]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--command", help="the exact command that trained the checkpoint")
    p.add_argument("--extra", default="", help="markdown appended at the end (e.g. measured decoding results)")
    a = p.parse_args()
    folder = Path(a.folder)
    (folder / "README.md").write_text(render(folder, a.command, a.extra))
    print(folder / "README.md")


if __name__ == "__main__":
    main()
