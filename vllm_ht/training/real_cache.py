"""A disk cache of the frozen model's real pass, one file per training sequence.

The real pass (passes.real_pass: every layer over the whole sequence, no grad) depends on the
sequence and the frozen model only, never on the projections, yet an uncached run repeats it each
time a sequence comes back in a later epoch. Measured on this CPU for the shipped config (k=3,
layer 15, batch 8, 64 anchors, ~2200 tokens a batch): 5.0 s a step uncached, 3.1 s cached
(benchmarks/train_step.py).

Per sequence the cache keeps what the pseudo pass and the loss read, nothing else:
  hidden  [n_join, T, d]                h^l at each distinct transfer (and fused) layer: the projections' input
  kv      [L - l_min, 2, Hkv, T, hd]    K/V of the layers the pseudo rows pass through
  final   [T, d]                        the final-normed states (the teacher's input)
A step's batch is assembled from the stored rows (zero-padded: pseudo rows only see real keys at
positions <= their anchor, so padding is never read); a batch with a missing sequence first runs
the real pass as uncached training does and stores the missing rows. Every step reads the stored
(rounded) values, cached before or just now, so a resumed run still equals an uninterrupted one.
In bf16 (the default) that rounding moves the loss slightly against uncached training (~1e-2
relative on a tiny model); float32 storage gives the uncached numbers.

Files are keyed by the token ids, so reordering, --max-len or a new data file reuse what matches;
`meta.json` names the model, the layers and the storage dtype, and a cache made for another
refuses with the fix. The cache is state on disk, outside the repo, like the run's state.pt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..backbone import Backbone
from ..config import HiddenTransferConfig
from .data import Batch
from .passes import RealPass, real_pass

# no float16: residual-stream values can overflow it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
META = "meta.json"
log = logging.getLogger(__name__)


def model_fingerprint(bb: Backbone) -> str:
    """Identity of the frozen model: its config, dtype and a digest of a few whole tensors."""
    h = hashlib.sha1(bb.model.config.to_json_string().encode())
    for t in (bb.embed.weight, bb.norm.weight, bb.layers[0].self_attn.q_proj.weight, bb.layers[-1].mlp.down_proj.weight):
        h.update(str(t.dtype).encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def bytes_per_token(config: HiddenTransferConfig, bb: Backbone, dtype: str) -> int:
    d, hkv = config.hidden_size, bb.layers[0].self_attn.k_proj.out_features // bb.head_dim
    values = len(config.input_layers) * d + d + (bb.num_layers - config.min_transfer_layer) * 2 * hkv * bb.head_dim
    return values * torch.finfo(DTYPES[dtype]).bits // 8


def _write_atomic(path: Path, write) -> None:
    """write(tmp) then rename: a killed run never leaves half a file (pid: runs may share a folder)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)


class RealPassCache:
    def __init__(self, folder: str | Path, bb: Backbone, config: HiddenTransferConfig, dtype: str = "bfloat16"):
        if dtype not in DTYPES:
            raise ValueError(f"real-pass cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        self.folder, self.bb, self.config, self.dtype = Path(folder), bb, config, DTYPES[dtype]
        self.layers = config.input_layers                    # the hidden states kept
        self.hits = self.misses = 0                          # sequences read from / written to the files
        meta = {"model": model_fingerprint(bb), "num_layers": bb.num_layers, "hidden_size": config.hidden_size,
                "transfer_layers": self.layers, "kv_from_layer": config.min_transfer_layer, "dtype": dtype}
        path = self.folder / META
        if path.is_file():
            try:
                have = json.loads(path.read_text())
            except json.JSONDecodeError:
                have = {}
            if have != meta:
                diff = {k: (have.get(k), v) for k, v in meta.items() if have.get(k) != v}
                raise ValueError(f"{self.folder} caches the real pass of another setup ({diff}, as cached vs "
                                 f"wanted): give another --real-cache folder, or delete this one")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        log.info("real-pass cache %s: %.1f KB per token (%s)", self.folder,
                 bytes_per_token(config, bb, dtype) / 1024, dtype)

    def _file(self, ids: list[int]) -> Path:
        key = hashlib.sha1(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()
        return self.folder / key[:2] / f"{key}.pt"

    def real_pass(self, batch: Batch) -> RealPass:
        """The batch's RealPass, always as stored (so a step's input depends only on its sequences,
        not on what the cache held): read from the files, after computing and storing the missing."""
        seqs = [batch.ids[b, : int(n)].tolist() for b, n in enumerate(batch.lengths)]
        files = [self._file(s) for s in seqs]
        missing = [b for b, f in enumerate(files) if not f.is_file()]
        items: dict[int, dict] = {}
        if missing:
            real = real_pass(self.bb, batch.ids, self.config)
            for b in missing:
                n = int(batch.lengths[b])
                item = {"hidden": torch.stack([real.hidden[j][b, :n] for j in self.layers]),
                        "kv": torch.stack([torch.stack([k[b, :, :n], v[b, :, :n]]) for _, (k, v) in sorted(real.kv.items())]),
                        "final": real.final[b, :n]}
                items[b] = {name: t.to(self.dtype).contiguous() for name, t in item.items()}
                files[b].parent.mkdir(exist_ok=True)
                _write_atomic(files[b], lambda tmp, it=items[b]: torch.save(it, tmp))
            self.misses += len(missing)
        for b, f in enumerate(files):
            if b not in items:
                items[b] = torch.load(f, weights_only=True)
                self.hits += 1
        return self._assemble([items[b] for b in range(len(files))], batch.ids.shape[1])

    def _assemble(self, items: list[dict], t: int) -> RealPass:
        dtype = self.bb.norm.weight.dtype

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[dim] = t - x.shape[dim]
            return torch.cat([x.to(dtype), x.new_zeros(shape, dtype=dtype)], dim=dim)

        hidden = torch.stack([pad(it["hidden"], 1) for it in items], dim=1)      # [n_join, B, T, d]
        kv = torch.stack([pad(it["kv"], 3) for it in items], dim=2)              # [layers, 2, B, Hkv, T, hd]
        low = self.config.min_transfer_layer
        return RealPass(kv={low + i: (kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])},
                        hidden={j: hidden[i] for i, j in enumerate(self.layers)},
                        final=torch.stack([pad(it["final"], 0) for it in items]))
