"""The start-up self-check: before serving, the HT engine runs a short probe through its own step.

Drafts are lossless only if verification reads the right numbers, and on a platform the project
cannot run end to end (vLLM's CUDA build) that is guarded here, where the user runs it. The probe
uses the engine's own model (compiled as served on CPU; on CUDA without graphs), attention backend, metadata builder, KV cache
and compaction kernel, on a few free blocks of the freshly allocated cache, and checks:

  tree     each tree row's logits equal a causal pass over its root-to-node path (the tree
           oracle: every path runs as its own causal request, prompt included, in one step);
  pseudo   adding pseudo rows to the tree step leaves the real rows' logits unchanged;
  compact  KV compaction moves each accepted node's K/V exactly (bit for bit) to the slot after
           its parent on the accepted path, in every layer, and leaves the other slots alone.

Logits are compared with a dtype-aware tolerance (`TOLERANCE`): the oracle and the tree step run
different row counts, so their matmuls round differently. A wrong mask bit moves a row's logits
by far more (measured by the fault-injection test, tests/e2e/test_self_check_e2e.py).

When a check fails, the runner's drafter refuses to draft (the engine serves as plain vLLM) and
the log names the check; with `self_check="strict"` the engine stops instead. An exception inside
the probe (a kernel that does not compile, a shape error) is a failed check named "error".

Not covered: CUDA graph replay. The probe's forwards run without graphs (the forward context's
default mode); HT steps that replay vLLM's piecewise graphs are checked only in pieces on CPU.

Words: the probe's *prompt* is PROMPT_LEN fixed token ids; its *tree* is TREE's paths below a
root token; a *request* here is one row range of the probe's forward with its own blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from vllm.forward_context import get_forward_context, set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_ht import kernels
from vllm_ht.kernels.cache_layout import read_slots

from ..tree import TokenTree
from .attention import STEP_KEY
from .step import HTStep

PROMPT_LEN = 12
# rank paths below the root: depth 1 x 3, depth 2 x 3, depth 3 x 1 (8 rows with the root)
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
ACCEPTED = (0, 2, 6)             # root, its child of rank 1, that child's child: not yet contiguous
# Largest per-row relative L2 difference of logits allowed, per dtype. Measured on the default model
# (CPU build, PROMPT_LEN 12): fp32 noise ~1e-6, one wrong mask bit 1.5e-2; bf16 noise up to ~2e-2
# (rows are rounded differently in steps of other sizes: bf16 is not batch-invariant), so in 16-bit
# dtypes the probe catches gross faults (wrong positions, masks, K/V reads, leaking pseudo rows), not
# a single wrong mask bit, which only an fp32 engine shows.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.1}


@dataclass
class Check:
    name: str
    ok: bool
    error: float | None = None       # max |difference| (logits) or mismatched values (K/V)
    tolerance: float | None = None
    detail: str = ""


@dataclass
class SelfCheckReport:
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None       # why the probe did not run (then nothing is claimed)
    exception: BaseException | None = field(default=None, repr=False)   # what the "error" check caught

    @property
    def passed(self) -> bool:
        return self.skipped is None and all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def summary(self) -> str:
        if self.skipped:
            return f"skipped ({self.skipped})"
        parts = [f"{c.name} {'ok' if c.ok else 'FAILED'}" + (f" (max error {c.error:.3g}, tolerance {c.tolerance:.3g})"
                                                              if c.error is not None and c.tolerance is not None else "")
                 + (f": {c.detail}" if c.detail else "") for c in self.checks]
        return "; ".join(parts) + f" in {self.seconds:.2f} s"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "skipped": self.skipped, "seconds": self.seconds,
                "checks": [vars(c) for c in self.checks]}

    @staticmethod
    def merge(reports: list["SelfCheckReport"]) -> "SelfCheckReport":
        """Every tensor-parallel rank's report -> one: a check fails if it failed on any rank (each
        rank compacts its own KV shard), with the largest error."""
        first = reports[0]
        out = SelfCheckReport(seconds=max(r.seconds for r in reports),
                              skipped=next((r.skipped for r in reports if r.skipped), None))
        names = list(dict.fromkeys(c.name for r in reports for c in r.checks))
        for name in names:
            mine = [c for r in reports for c in r.checks if c.name == name]
            errors = [c.error for c in mine if c.error is not None]
            bad = [c for c in mine if not c.ok]
            out.checks.append(Check(name, not bad, max(errors) if errors else None, mine[0].tolerance,
                                    bad[0].detail if bad else ""))
        out.exception = first.exception
        return out


@dataclass
class _Request:
    """One row range of a probe forward: `context` cached tokens, then `tokens` this step."""
    tokens: list[int]
    positions: list[int]
    context: int
    blocks: list[int]


class _Probe:
    """Runs probe forwards through the runner's model with hand-built attention metadata."""

    def __init__(self, runner, fault: str | None):
        self.runner, self.fault = runner, fault
        groups = [g for per_group in runner.attn_groups for g in per_group]
        if len(groups) != 1:
            raise _Skip(f"{len(groups)} attention groups (the probe handles models with one)")
        self.group = groups[0]
        self.builder = self.group.get_metadata_builder()
        self.kv = [runner.kv_caches[i] for i in range(len(runner.kv_caches))]
        self.block_size = self.kv[0].shape[2] if self.kv[0].dim() == 4 else self.group.kv_cache_spec.block_size
        self.device = runner.device
        self.dtype = runner.model_config.dtype
        self.num_blocks = self.kv[0].shape[0]
        self.max_rows = runner.max_num_tokens
        if PROMPT_LEN + 2 * len(TREE) + 2 > self.max_rows:
            raise _Skip(f"max_num_batched_tokens {self.max_rows} is below the probe's step")
        self.next_block = 1              # block 0 is vLLM's null block
        self.used: list[int] = []

    def blocks_for(self, tokens: int) -> list[int]:
        n = -(-tokens // self.block_size)
        if self.next_block + n > self.num_blocks:
            raise _Skip("the KV cache has too few blocks for the probe")
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        self.used += ids
        return ids

    def free_blocks(self) -> int:
        return self.num_blocks - self.next_block

    def batches(self, reqs: list[_Request], most: int) -> list[list[_Request]]:
        """Requests in forwards of at most `most` requests and the engine's max_num_batched_tokens rows
        (the row ranges the compiled model exists for; CUDA's piecewise backend asserts on larger ones)."""
        out, rows = [[]], 0
        for q in reqs:
            if out[-1] and (rows + len(q.tokens) > self.max_rows or len(out[-1]) >= most):
                out.append([])
                rows = 0
            out[-1].append(q)
            rows += len(q.tokens)
        return out

    def slots(self, req: _Request, rows: range) -> list[int]:
        return [req.blocks[p // self.block_size] * self.block_size + p % self.block_size for p in rows]

    def forward(self, reqs: list[_Request], step: HTStep | None, pseudo_anchors: dict[int, list[int]] | None = None):
        """One forward of the requests' rows (plus pseudo rows); returns the real rows' logits [T, V]
        and the attention metadata (for the cache layout)."""
        dev, r = self.device, self.runner
        q_lens = [len(q.tokens) for q in reqs]
        total = sum(q_lens)
        width = max(len(q.blocks) for q in reqs)
        table = torch.zeros(len(reqs), width, dtype=torch.int32)
        for i, q in enumerate(reqs):
            table[i, : len(q.blocks)] = torch.tensor(q.blocks, dtype=torch.int32)
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        seq_lens = torch.tensor([q.context + len(q.tokens) for q in reqs], dtype=torch.int32)
        slots = torch.tensor([s for q in reqs for s in self.slots(q, range(q.context, q.context + len(q.tokens)))],
                             dtype=torch.int64)
        common = CommonAttentionMetadata(
            query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl, seq_lens=seq_lens.to(dev), num_reqs=len(reqs),
            num_actual_tokens=total, max_query_len=max(q_lens), max_seq_len=int(seq_lens.max()),
            block_table_tensor=table.to(dev), slot_mapping=slots.to(dev), causal=True)
        md = self.builder.build(common_prefix_len=0, common_attn_metadata=common)
        step = step or HTStep.build(q_lens, {})
        ids = torch.tensor([t for q in reqs for t in q.tokens], dtype=torch.int32)
        pos = torch.tensor([p for q in reqs for p in q.positions], dtype=torch.int64)
        if pseudo_anchors:
            cfg = r.model.ht_config
            step.add_pseudo_rows(pseudo_anchors, cfg.num_steps, total, pos, cfg.joins)
            p = step.pseudo
            ids = torch.cat([ids, torch.zeros(p.num_rows, dtype=ids.dtype)])
            pos = torch.cat([pos, p.positions.clamp(max=r.model_config.max_model_len - 1)])
        names = self.group.layer_names
        with set_forward_context({n: md for n in names}, r.vllm_config, num_tokens=ids.numel(),
                                 slot_mapping={n: common.slot_mapping for n in names}):
            get_forward_context().additional_kwargs[STEP_KEY] = step
            hidden = r.model(input_ids=ids.to(dev), positions=pos.to(dev), intermediate_tensors=None,
                             inputs_embeds=None)
        return r._ht_lm_head(hidden[:total]).float(), md, table.to(dev)

    def release(self) -> None:
        """Zero the probe's blocks in every layer (the cache is as vLLM allocated it)."""
        if self.used:
            ids = torch.tensor(self.used, dtype=torch.long, device=self.kv[0].device)
            for kv in self.kv:
                kv.index_fill_(0, ids, 0)


class _Skip(Exception):
    pass


def run_self_check(runner, fault: str | None = None) -> SelfCheckReport:
    """The three checks through the runner's own step (see the module docstring)."""
    report, start = SelfCheckReport(), time.perf_counter()
    try:
        probe = _Probe(runner, fault)
    except _Skip as e:
        report.skipped = str(e)
        return report
    try:
        with torch.inference_mode():
            _checks(probe, report)
    except _Skip as e:
        report.skipped = str(e)
    except Exception as e:  # noqa: BLE001 - an error in HT's own step is a failed check, not a dead engine
        report.checks.append(Check("error", False, detail=f"{type(e).__name__}: {e}"))
        report.exception = e
    finally:
        probe.release()
        report.seconds = time.perf_counter() - start
    if report.exception is not None and probe.device.type == "cuda":
        torch.cuda.synchronize()         # a CUDA error that poisoned the context raises here: stop
    return report


def _checks(probe: _Probe, report: SelfCheckReport) -> None:
    vocab = probe.runner.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(1234)
    low, high = min(100, vocab // 4), min(vocab, 30000)         # ordinary tokens, clear of the special ones
    prompt = torch.randint(low, high, (PROMPT_LEN,), generator=gen).tolist()
    tree = TokenTree.from_paths(TREE)
    tokens = torch.randint(low, high, (tree.num_nodes,), generator=gen).tolist()
    tol = TOLERANCE.get(probe.dtype, 0.3)

    # the prompt, prefilled causally; then the tree step over its cached K/V
    blocks = probe.blocks_for(PROMPT_LEN + tree.num_nodes)
    probe.forward([_Request(prompt, list(range(PROMPT_LEN)), 0, blocks)], None)
    depths = tree.depths.tolist()
    tree_req = _Request(tokens, [PROMPT_LEN + d for d in depths], PROMPT_LEN, blocks)
    step = HTStep.build([tree.num_nodes], {0: tree})
    if probe.fault == "mask":             # the deepest node also sees a node off its path
        _see_extra(step, row=tree.num_nodes - 1, col=2)
    tree_logits, md, table = probe.forward([tree_req], step)

    # tree oracle: each root-to-node path as its own causal request, prompt included
    # (as many paths per forward as free blocks allow: a small KV cache runs them one at a time,
    # every forward reusing the same blocks)
    paths = [tree.path_to(n) for n in range(tree.num_nodes)]
    longest = PROMPT_LEN + tree.max_depth + 1
    per_path = -(-longest // probe.block_size)
    lanes = [probe.blocks_for(longest) for _ in range(max(1, min(len(paths), probe.free_blocks() // per_path)))]
    reqs = [_Request(prompt + [tokens[a] for a in path], list(range(PROMPT_LEN + len(path))), 0, [])
            for path in paths]
    outs = []
    for chunk in probe.batches(reqs, len(lanes)):
        for q, blocks in zip(chunk, lanes):
            q.blocks = blocks
        outs.append(probe.forward(chunk, None)[0][torch.tensor([len(q.tokens) for q in chunk]).cumsum(0) - 1])
    oracle = torch.cat(outs)
    err = _error(tree_logits, oracle)
    report.checks.append(Check("tree", err <= tol, err, tol, "" if err <= tol else
                               "tree rows differ from causal passes over their paths (tree mask or positions)"))

    # pseudo rows must not change the real rows (the same tree step again, every node anchored)
    step2 = HTStep.build([tree.num_nodes], {0: tree})
    if probe.fault == "mask":
        _see_extra(step2, row=tree.num_nodes - 1, col=2)
    with_pseudo, _, _ = probe.forward([tree_req], step2, {0: list(range(tree.num_nodes))})
    err = _error(with_pseudo, tree_logits)
    report.checks.append(Check("pseudo", err <= tol, err, tol, "" if err <= tol else
                               "pseudo rows change the real rows' logits"))

    # compaction: the accepted path's K/V to the slots after the root, exactly
    src = [PROMPT_LEN + a for j, a in enumerate(ACCEPTED) if a != j]
    dst = [PROMPT_LEN + j for j, a in enumerate(ACCEPTED) if a != j]
    layout = getattr(md, "cache_layout", kernels.ROWS)
    src_slots = torch.tensor(probe.slots(tree_req, src), device=probe.kv[0].device)
    dst_slots = torch.tensor(probe.slots(tree_req, dst), device=probe.kv[0].device)
    keep = [PROMPT_LEN + j for j in range(tree.num_nodes) if PROMPT_LEN + j not in dst]
    keep_slots = torch.tensor(probe.slots(tree_req, keep), device=probe.kv[0].device)
    before = [(read_slots(kv, src_slots, layout).clone(), read_slots(kv, keep_slots, layout).clone()) for kv in probe.kv]
    moved_to = [d + 1 for d in dst] if probe.fault == "compact" else dst
    dev = table.device
    kernels.compact_kv(probe.kv, table[:1], torch.tensor(src, dtype=torch.int32, device=dev),
                       torch.tensor(moved_to, dtype=torch.int32, device=dev),
                       torch.tensor([0, len(src)], dtype=torch.int32, device=dev), layout)
    bad = 0
    for kv, (want, kept) in zip(probe.kv, before):
        bad += int((read_slots(kv, dst_slots, layout) != want).sum())
        bad += int((read_slots(kv, keep_slots, layout) != kept).sum())
    report.checks.append(Check("compact", bad == 0, float(bad), 0.0, "" if bad == 0 else
                               f"{bad} K/V values not where compaction must put them ({layout} layout)"))


def _see_extra(step: HTStep, row: int, col: int) -> None:
    """Fault injection: set one mask bit (row sees window column col)."""
    word, bit = divmod(col, 32)
    step.real_mask_bits[row, word] |= (1 << bit) if bit < 31 else -(1 << 31)
    step.real_visible[row, col] = True


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest per-row relative L2 difference of two logit matrices [rows, V]."""
    return ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp(min=1e-6)).max().item()
