"""Self-distilled sequences (from `make-data`) as padded batches, in a reproducible order.

A sequence is prompt_ids + response_ids, cut to max_len. The order of batches depends only on
(seed, step), so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Sequence:
    ids: list[int]
    prompt_len: int


@dataclass
class Batch:
    ids: torch.Tensor         # [B, T] long, right-padded with pad_id
    lengths: torch.Tensor     # [B] long
    prompt_lens: torch.Tensor  # [B] long


def load_sequences(path: str | Path, max_len: int, min_response: int = 4,
                   max_lines: int | None = None) -> list[Sequence]:
    """The file's sequences (responses of at least `min_response` tokens), from its first
    `max_lines` lines only if given: a run on part of a file still being made stays reproducible."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: make it with `vllm-ht make-data`")
    if max_lines is not None and max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    out, n = [], -1
    with open(path) as f:
        for n, line in enumerate(itertools.islice(f, max_lines)):     # None: every line
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fewer = f"train on the {n} lines before it (--max-sequences {n}), or " if n else ""
                raise ValueError(f"{path}: line {n + 1} is not whole JSON ({e.msg}), as when make-data is still "
                                 f"writing it or was stopped mid-line: {fewer}let make-data finish its chunk "
                                 f"(or run it again: it trims a torn last line and resumes)") from e
            if len(row["response_ids"]) < min_response:
                continue
            ids = (row["prompt_ids"] + row["response_ids"])[:max_len]
            out.append(Sequence(ids=ids, prompt_len=min(len(row["prompt_ids"]), len(ids))))
    if not out:
        raise ValueError(f"{path} holds no usable sequences")
    if max_lines is not None and n + 1 < max_lines:
        raise ValueError(f"{path} has {n + 1} lines, fewer than the {max_lines} asked for: make more with "
                         f"`vllm-ht make-data` (same --num / --seed / --out), or ask for fewer")
    return out


def collate(seqs: list[Sequence], pad_id: int = 0) -> Batch:
    t = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
    return Batch(ids=ids, lengths=torch.tensor([len(s.ids) for s in seqs]),
                 prompt_lens=torch.tensor([s.prompt_len for s in seqs]))


def batch_for_step(seqs: list[Sequence], step: int, batch_size: int, seed: int) -> Batch:
    """Epoch e = step * B // N uses permutation(seed + e); step -> a fixed slice of it."""
    n = len(seqs)
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    picked = order[k * batch_size : (k + 1) * batch_size].tolist()
    return collate([seqs[i] for i in picked])


def sample_anchors(batch: Batch, num: int, num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """[B, A] anchor positions in each response region that have at least one valid target
    (anchor + 2 <= length - 1); A = min(num, fewest candidates in the batch), sorted."""
    lo = (batch.prompt_lens - 1).clamp(min=0)
    hi = batch.lengths - 3                       # last anchor with a step-1 target
    counts = (hi - lo + 1).clamp(min=1)
    a = int(min(num, counts.min()))
    rows = []
    for b in range(batch.ids.shape[0]):
        pick = torch.randperm(int(counts[b]), generator=generator)[:a] + lo[b]
        rows.append(pick.sort().values)
    return torch.stack(rows)
