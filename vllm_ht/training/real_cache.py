"""A disk cache of the frozen model's real pass, one file per training sequence.

The real pass (passes.real_pass: every layer over the whole sequence, no grad) depends on the
sequence and the frozen model only, never on the projections, yet an uncached run repeats it each
time a sequence comes back in a later epoch. Measured on this CPU for the shipped config (k=3,
layer 15, batch 8, 64 anchors, ~2200 tokens a batch): real pass ~2.0 s of a ~6.2 s step.

Per sequence the cache keeps what the pseudo pass and the loss read, nothing else:
  hidden  [n_join, T, d]                h^l at each distinct transfer layer (the projections' input)
  kv      [L - l_min, 2, Hkv, T, hd]    K/V of the layers the pseudo rows pass through
  final   [T, d]                        the final-normed states (the teacher's input)
A batch whose sequences are all cached is assembled from the files (zero-padded: pseudo rows only
see real keys at positions <= their anchor, so padding is never read); a batch with a missing one
runs the real pass as uncached training does and stores each sequence's rows.

Files are keyed by the token ids, so reordering, --max-len or a new data file reuse what matches;
`meta.json` names the model, the layers and the storage dtype, and a cache made for another
refuses with the fix. The cache is state on disk, outside the repo, like the run's state.pt.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..backbone import Backbone
from ..config import HiddenTransferConfig
from .data import Batch
from .passes import RealPass, real_pass

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
META = "meta.json"


def model_fingerprint(bb: Backbone) -> str:
    """Cheap identity of the frozen weights: a digest of a few whole tensors."""
    h = hashlib.sha1()
    for t in (bb.norm.weight, bb.layers[0].self_attn.q_proj.weight, bb.layers[-1].mlp.down_proj.weight):
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def bytes_per_token(config: HiddenTransferConfig, bb: Backbone, dtype: str) -> int:
    d, hkv = config.hidden_size, bb.layers[0].self_attn.k_proj.out_features // bb.head_dim
    values = len(set(config.transfer_layers)) * d + d + (bb.num_layers - config.min_transfer_layer) * 2 * hkv * bb.head_dim
    return values * torch.finfo(DTYPES[dtype]).bits // 8


class RealPassCache:
    def __init__(self, folder: str | Path, bb: Backbone, config: HiddenTransferConfig, dtype: str = "bfloat16"):
        if dtype not in DTYPES:
            raise ValueError(f"real-pass cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        self.folder, self.bb, self.config, self.dtype = Path(folder), bb, config, DTYPES[dtype]
        self.layers = sorted(set(config.transfer_layers))
        self.hits = self.misses = 0
        meta = {"model": model_fingerprint(bb), "num_layers": bb.num_layers, "hidden_size": config.hidden_size,
                "transfer_layers": self.layers, "kv_from_layer": config.min_transfer_layer, "dtype": dtype}
        path = self.folder / META
        if path.is_file():
            have = json.loads(path.read_text())
            if have != meta:
                diff = {k: (have.get(k), v) for k, v in meta.items() if have.get(k) != v}
                raise ValueError(f"{self.folder} caches the real pass of another setup ({diff}, as cached vs "
                                 f"wanted): give another --real-cache folder, or delete this one")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(meta, indent=1))

    def _file(self, ids: list[int]) -> Path:
        key = hashlib.sha1(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()
        return self.folder / key[:2] / f"{key}.pt"

    def real_pass(self, batch: Batch) -> RealPass:
        """The batch's RealPass: from the files when every sequence is cached, else computed
        (and the missing sequences stored)."""
        seqs = [batch.ids[b, : int(n)].tolist() for b, n in enumerate(batch.lengths)]
        files = [self._file(s) for s in seqs]
        if all(f.is_file() for f in files):
            self.hits += len(files)
            return self._assemble([torch.load(f, weights_only=True) for f in files], batch.ids.shape[1])
        real = real_pass(self.bb, batch.ids, self.config)
        for b, (f, n) in enumerate(zip(files, batch.lengths.tolist())):
            if f.is_file():
                continue
            self.misses += 1
            item = {"hidden": torch.stack([real.hidden[j][b, :n] for j in self.layers]),
                    "kv": torch.stack([torch.stack([k[b, :, :n], v[b, :, :n]])
                                       for _, (k, v) in sorted(real.kv.items())]),
                    "final": real.final[b, :n]}
            f.parent.mkdir(exist_ok=True)
            tmp = f.with_suffix(".tmp")
            torch.save({n_: t.to(self.dtype).contiguous() for n_, t in item.items()}, tmp)
            tmp.replace(f)                                  # a killed run never leaves half a file
        return real

    def _assemble(self, items: list[dict], t: int) -> RealPass:
        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[dim] = t - x.shape[dim]
            return torch.cat([x.float(), x.new_zeros(shape, dtype=torch.float32)], dim=dim)

        hidden = torch.stack([pad(it["hidden"], 1) for it in items], dim=1)      # [n_join, B, T, d]
        kv = torch.stack([pad(it["kv"], 3) for it in items], dim=2)              # [layers, 2, B, Hkv, T, hd]
        low = self.config.min_transfer_layer
        return RealPass(kv={low + i: (kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])},
                        hidden={j: hidden[i] for i, j in enumerate(self.layers)},
                        final=torch.stack([pad(it["final"], 0) for it in items]))
