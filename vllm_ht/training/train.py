"""`vllm-ht train`: fit the transfer projections on a frozen backbone (DESIGN §1 training).

Per step: one real pass under no_grad (or its rows from the disk cache, `--real-cache`), then the
pseudo rows of sampled anchors with grad, loss KL(p_real(. | x_<=i+s+1) || q_pseudo(i, s)). AdamW,
linear warmup, cosine decay. Optionally a Medusa-1 baseline trains in the same loop on the same
batches (its heads read the real pass's last hidden states, so it adds almost nothing to the cost).

Resume: `state.pt` in the output folder holds the step, the projections, the optimiser and the
scheduler; batches and anchors depend only on (seed, step), so a resumed run equals an
uninterrupted one.

Continue (`--init-from CHECKPOINT`): a new run starts from a checkpoint's projections (and its Medusa
heads) instead of the identity, with a fresh optimiser and schedule. Its anchors are counted on top
of the checkpoint's, so its learning curve goes on from where that one stopped.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from ..backbone import Backbone
from ..checkpoint import save_checkpoint
from ..config import HiddenTransferConfig
from ..projections import TransferProjections
from .data import batch_for_step, load_sequences, sample_anchors
from .loss import distill_loss, teacher_logprobs
from .medusa import MedusaHeads
from .passes import pseudo_pass, real_pass, targets_valid
from .real_cache import RealPassCache

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
# settings that shape the projections: a resumed run must keep them
SHAPE_FIELDS = ("num_steps", "transfer_layers", "bias", "fuse_layers")
SNAPSHOT_DIR = "snapshots"      # projections at every save, for the learning curve
CURVE_FILE = "learning_curve.json"   # the learning curve's rows (curve.py)
HISTORY_FILE = "history.jsonl"  # per-step training loss and top-1 (appended; a resumed run goes on)
MEDUSA_FILE = "medusa.safetensors"


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    num_steps: int = 3                       # k
    transfer_layers: list[int] | None = None  # None -> the middle layer
    bias: bool = False
    fuse_layers: list[int] = field(default_factory=list)   # fused projection input (config.fuse_layers)
    steps: int = 2000
    batch_size: int = 8
    anchors: int = 64                        # sampled anchors per sequence per step
    max_len: int = 384
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.0
    step_weights: list[float] | None = None
    medusa: bool = False
    save_every: int = 100
    seed: int = 0
    threads: int | None = None
    save_dtype: str = "float16"              # projection storage in the shipped checkpoint
    real_cache: str | None = None            # folder: the real pass per sequence on disk (real_cache.py)
    real_cache_dtype: str = "bfloat16"
    init_from: str | None = None             # checkpoint folder to continue from (a new run only)
    max_sequences: int | None = None         # train on the data file's first N lines only
    extra: dict = field(default_factory=dict)


def checkpoint_anchors(provenance: dict) -> int:
    """Anchors a checkpoint's projections were trained on, over every run that led to them."""
    if "anchors_seen" in provenance:
        return int(provenance["anchors_seen"])
    train = provenance.get("train") or {}
    if not train:
        return 0
    return int(train["steps"]) * int(train["batch_size"]) * int(train["anchors"])


def unique_teacher_logprobs(bb: Backbone, final: torch.Tensor, tpos: torch.Tensor,
                            valid: torch.Tensor) -> torch.Tensor:
    """[n, V] teacher log-probs of the valid rows, in distill_loss's row order, with the LM head run
    once per distinct teacher position: pseudo rows (i, s) and (i + 1, s - 1) share the teacher at
    i + s + 1. With 64 anchors a sequence, 29% of the rows repeat one (seed-1 training data, 30 steps).
    final [B, T, d], tpos / valid [B, A, k]."""
    b, t, d = final.shape
    flat = (torch.arange(b)[:, None, None] * t + tpos)[valid]                     # [n]
    uniq, inverse = torch.unique(flat, return_inverse=True)
    return teacher_logprobs(bb, final.reshape(b * t, d)[uniq])[inverse]


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module | None = None):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = model if model is not None else AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.bb = Backbone(self.model)
        self.ht_config = HiddenTransferConfig.for_model(
            self.model.config, base_model=Path(cfg.model).name, num_steps=cfg.num_steps,
            transfer_layers=cfg.transfer_layers, bias=cfg.bias, fuse_layers=cfg.fuse_layers,
            dtype=cfg.save_dtype)
        self.projections = TransferProjections(self.ht_config)
        self.medusa = MedusaHeads(cfg.num_steps, self.ht_config.hidden_size) if cfg.medusa else None
        params = list(self.projections.parameters()) + (list(self.medusa.parameters()) if self.medusa else [])
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps))
        self.step = 0
        self.seqs = load_sequences(cfg.data, cfg.max_len, max_lines=cfg.max_sequences)
        self.real_cache = (RealPassCache(cfg.real_cache, self.bb, self.ht_config, cfg.real_cache_dtype)
                           if cfg.real_cache else None)
        self.out = Path(cfg.out)
        self.anchors_before = 0            # anchors of the checkpoint this run continues (--init-from)

    @property
    def anchors_seen(self) -> int:
        return self.anchors_before + self.step * self.cfg.batch_size * self.cfg.anchors

    def init_from(self, folder: str) -> None:
        """Start from a checkpoint's projections (and Medusa heads, if both have them)."""
        from ..checkpoint import load_checkpoint

        config, projections = load_checkpoint(folder)
        config.check_model(self.model.config)        # vocab, width, depth, architecture: names the fix
        mine, theirs = asdict(self.ht_config), asdict(config)
        changed = {k: (theirs[k], mine[k]) for k in SHAPE_FIELDS if theirs[k] != mine[k]}
        if changed:
            raise ValueError(f"--init-from {folder}: its projections have other settings than this run's "
                             f"({changed}, checkpoint vs run); pass the checkpoint's --num-steps / "
                             f"--transfer-layers / --fuse-layers / --bias, or train without --init-from")
        self.projections.load_state_dict(projections.state_dict())
        heads = Path(folder) / MEDUSA_FILE
        if self.medusa is not None and heads.is_file():
            self.medusa.load_state_dict(MedusaHeads.load(str(heads)).state_dict())
        self.anchors_before = checkpoint_anchors(config.provenance or {})

    # ---- one step --------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, k = self.cfg, self.cfg.num_steps
        batch = batch_for_step(self.seqs, self.step, cfg.batch_size, cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        anchors = sample_anchors(batch, cfg.anchors, k, gen)                     # [B, A]
        real = (self.real_cache.real_pass(batch) if self.real_cache is not None
                else real_pass(self.bb, batch.ids, self.ht_config))
        valid = targets_valid(anchors, batch.lengths, k)                          # [B, A, k]
        t = batch.ids.shape[1]
        tpos = (anchors[:, :, None] + torch.arange(k) + 1).clamp(max=t - 1)        # teacher rows
        draft = pseudo_pass(self.bb, self.projections, self.ht_config, real, anchors)
        out = distill_loss(self.bb, draft, None, valid, cfg.step_weights,
                           logp=unique_teacher_logprobs(self.bb, real.final, tpos, valid))
        total = out.loss
        stats = {"loss": float(out.loss.detach()), **{f"top1_{s + 1}": a for s, a in enumerate(out.top1)}}
        if self.medusa is not None:
            h_last = real.final[torch.arange(anchors.shape[0])[:, None], anchors]  # [B, A, d]
            m = distill_loss(self.bb, self.medusa(h_last), None, valid, cfg.step_weights, logp=out.logp)
            total = total + m.loss
            stats.update({"medusa_loss": float(m.loss.detach()), **{f"medusa_top1_{s + 1}": a for s, a in enumerate(m.top1)}})
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1
        return stats

    # ---- persistence -----------------------------------------------------------------------
    def save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "projections": self.projections.state_dict(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "cfg": asdict(self.cfg),
                 "medusa": self.medusa.state_dict() if self.medusa else None,
                 "anchors_before": self.anchors_before}
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out / STATE_FILE)
        # the projections at this step, for the learning curve (`vllm-ht eval-drafts --curve`)
        snap = self.out / SNAPSHOT_DIR
        snap.mkdir(exist_ok=True)
        torch.save({"step": self.step, "anchors_seen": self.anchors_seen,
                    "projections": self.projections.state_dict()}, snap / f"step_{self.step:06d}.pt")

    def load_state(self) -> bool:
        path = self.out / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        mine = asdict(self.cfg)
        changed = {k: (state["cfg"].get(k), mine[k]) for k in SHAPE_FIELDS if state["cfg"].get(k, []) != mine[k]}
        if changed:
            raise ValueError(f"{path} was saved by a run with other projections ({changed}, as saved vs asked): "
                             f"resume with the same settings, or start afresh with another --out (or --no-resume)")
        if state["cfg"].get("max_sequences") != self.cfg.max_sequences:   # it picks every batch
            raise ValueError(f"{path} was saved by a run on {state['cfg'].get('max_sequences') or 'all'} lines of its "
                             f"data, not {self.cfg.max_sequences or 'all'}: resume with the same --max-sequences, "
                             f"or start afresh with another --out (or --no-resume)")
        if state["cfg"].get("init_from") != self.cfg.init_from:
            raise ValueError(f"{path} was saved by a run started from {state['cfg'].get('init_from') or 'the identity'}, "
                             f"not from {self.cfg.init_from or 'the identity'}: resume with the same --init-from, "
                             f"or start afresh with another --out (or --no-resume)")
        self.step = state["step"]
        self.projections.load_state_dict(state["projections"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.medusa is not None and state.get("medusa"):
            self.medusa.load_state_dict(state["medusa"])
        self.anchors_before = state.get("anchors_before", 0)
        return True

    def _trim_history(self, fresh: bool) -> None:
        """Drop history lines past the step this run starts from (a resumed run redoes them) and the
        snapshots past it. A run started afresh in an old folder drops every snapshot, step 0's
        included, and the learning curve evaluated from them (curve.py reuses rows by step)."""
        path = self.out / HISTORY_FILE
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in keep))
        for snap in (self.out / SNAPSHOT_DIR).glob("step_*.pt"):
            if fresh or int(snap.stem.split("_")[1]) > self.step:
                snap.unlink()
        if fresh:
            (self.out / CURVE_FILE).unlink(missing_ok=True)

    def export(self, provenance: dict) -> Path:
        """Write the checkpoint folder (config.json + projections.safetensors [+ medusa])."""
        self.ht_config.provenance = provenance
        save_checkpoint(self.out, self.ht_config, self.projections)
        if self.medusa is not None:
            self.medusa.save(str(self.out / MEDUSA_FILE), dtype=self.ht_config.dtype)
        return self.out

    def run(self, progress: bool = True, resume: bool = True) -> Path:
        if resume and self.load_state():
            log.info("resumed at step %d from %s", self.step, self.out / STATE_FILE)
            fresh = False
        else:
            fresh = True
            if self.cfg.init_from:
                self.init_from(self.cfg.init_from)
                log.info("continuing %s (%d anchors seen)", self.cfg.init_from, self.anchors_before)
        start, t0 = self.step, time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._trim_history(fresh)
        if fresh and self.cfg.init_from:
            self.save_state()          # step 0: the starting point of the learning curve
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", disable=not progress)
        history = []
        while self.step < self.cfg.steps:
            stats = self.train_step()
            history.append(stats)
            with open(self.out / HISTORY_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, "seconds": round(time.perf_counter() - t0, 2), **stats}) + "\n")
            bar.update(1)
            bar.set_postfix({n: f"{v:.3f}" for n, v in stats.items() if n in ("loss", "top1_1", "top1_2", "top1_3")})
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                self.save_state()
        bar.close()
        seconds = time.perf_counter() - t0
        last = history[-20:] or [{}]
        summary = {n: sum(h[n] for h in last) / len(last) for n in last[0]}
        return self.export({"train": asdict(self.cfg), "sequences": len(self.seqs),
                            "tokens": sum(len(s.ids) for s in self.seqs), "steps_this_run": self.step - start,
                            "seconds_this_run": round(seconds, 1), "last_20_steps": summary,
                            "hardware": f"{torch.get_num_threads()} CPU threads",
                            "anchors_seen": self.anchors_seen,
                            **({"init_from": {"checkpoint": self.cfg.init_from, "anchors_seen": self.anchors_before}}
                               if self.cfg.init_from else {}),
                            **({"real_cache": {"sequences_read": self.real_cache.hits,
                                               "sequences_written": self.real_cache.misses}}
                               if self.real_cache is not None else {})})
